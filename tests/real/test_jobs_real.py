"""The state-dir source refuses records a user owns (needs root to chown)."""

from __future__ import annotations

import os

import pytest

from pruned.jobs.statedir import StateDirSource, write_job_record


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_records_owned_by_a_user_are_not_trusted(tmp_path) -> None:
    os.chmod(tmp_path, 0o700)
    path = write_job_record(str(tmp_path), "1", 30001, 5.0)
    os.chown(path, 30001, 30001)
    view = StateDirSource(str(tmp_path)).read()
    assert view.jobs == {} and "owned by uid 30001" in view.problems[0]

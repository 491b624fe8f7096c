"""pruned.log: one line on stderr, or a journald entry when stderr is the journal stream."""

from __future__ import annotations

import os
import sys

import pytest

from pruned import log


def test_stderr_line_without_a_journal(monkeypatch, capsys) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    log.warning("cannot write metrics /x: Permission denied\nsecond line")
    err = capsys.readouterr().err
    assert err == "pruned: cannot write metrics /x: Permission denied second line\n"


def test_journal_stream_that_is_not_our_stderr_is_ignored(monkeypatch, capsys) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # inherited from a parent, not ours
    sent = []
    monkeypatch.setattr(log, "_journal_send", lambda *a: sent.append(a) or True)
    log.error("boom")
    assert sent == [] and capsys.readouterr().err == "pruned: boom\n"


def test_our_journal_stream_gets_priority(monkeypatch, tmp_path, capfd) -> None:
    st = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    sent = []
    monkeypatch.setattr(log, "_journal_send", lambda msg, prio: sent.append((msg, prio)) or True)
    log.error("self-check failed")
    log.warning("degraded")
    assert sent == [("self-check failed", log.Priority.ERR), ("degraded", log.Priority.WARNING)]
    # journald refuses: the line still reaches stderr
    monkeypatch.setattr(log, "_journal_send", lambda msg, prio: False)
    log.info("fallback")
    assert capfd.readouterr().err.endswith("pruned: fallback\n")


@pytest.mark.parametrize("prio", list(log.Priority))
def test_priorities_are_syslog_levels(prio) -> None:
    assert {"ERR": 3, "WARNING": 4, "NOTICE": 5, "INFO": 6}[prio.name] == int(prio)

"""The command line as a table: arguments -> exit code -> expected text. Never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.fixtures.paths import REPO

BAD = REPO / "tests" / "policies_bad"
DEFAULT = str(REPO / "policies" / "default.yaml")


def run(*args: str, user: str | None = None, env: dict | None = None):
    argv = [sys.executable, "-m", "pruned.cli", *args]
    if user:
        argv = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, **(env or {})})


CASES = [
    # (args, exit code, text expected in stdout+stderr)
    (("check-config", DEFAULT), 0, "ok (mode report"),
    (("check-config", str(BAD / "01-duplicate-key.yaml")), 78, "01-duplicate-key.yaml:5: "
                                                              "actions.stray: duplicate key"),
    (("check-config", "/nonexistent/policy.yaml"), 78, "/nonexistent/policy.yaml"),
    (("scan", "--policy", str(BAD / "01-duplicate-key.yaml")), 78, "duplicate key"),
    (("sweep", "--once", "--policy", str(BAD / "01-duplicate-key.yaml")), 78, "duplicate key"),
    (("run", "--policy", str(BAD / "01-duplicate-key.yaml")), 78, "duplicate key"),
    (("scan", "--class", "nonsense"), 2, "invalid choice"),
    (("explain", "abc"), 2, "not a pid"),
    (("explain", "0"), 2, "not a pid"),
    (("explain", "4194304", "--policy", DEFAULT), 1, "no process 4194304"),
    (("sweep", "--uid", "no-such-user-xyz"), 2, "no such user"),
    (("frobnicate",), 2, "invalid choice"),
    ((), 2, "required"),
    (("epilog", "--policy", DEFAULT, "--dry-run"), 2, "no job id"),
    (("epilog", "--policy", DEFAULT, "--job", "5", "--dry-run"), 2, "no uid"),
    (("--version",), 0, "pruned 0.1.0"),
]


@pytest.mark.parametrize(("args", "code", "text"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_cli_table(args, code, text):
    r = run(*args, env={"SLURM_JOB_ID": "", "SLURM_JOB_UID": ""})
    out = r.stdout + r.stderr
    assert r.returncode == code, out
    assert text in out, out
    assert "Traceback" not in out


def test_every_bad_policy_exits_78_without_traceback():
    for path in sorted(BAD.glob("*.yaml")):
        r = run("check-config", str(path))
        assert r.returncode == 78, (path, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        for line in r.stderr.strip().splitlines():
            assert line.startswith(str(path)), line  # every error names the file


def test_scan_json_fields_and_class_filter():
    r = run("scan", "--json", "--class", "system", "--policy", DEFAULT)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert rows and all(x["class"] == "system" for x in rows)
    one = next(x for x in rows if x["pid"] == 1)
    for key in ("pid", "starttime", "ppid", "uid", "user", "comm", "class", "rule", "action",
                "job", "reason"):
        assert key in one


def test_explain_shows_the_chain_of_evidence():
    r = run("explain", str(os.getpid()), "--policy", DEFAULT)
    assert r.returncode == 0, r.stderr
    for text in ("ancestry (nearest first):", "cgroup (/proc/PID/cgroup):", "job lookup:",
                 "class: system", "rule: system.uid_rail", "action: ignore"):
        assert text in r.stdout, r.stdout


@pytest.mark.root
def test_non_root_says_what_it_could_not_read():
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to nobody")
    r = run("scan", "--policy", DEFAULT, user="nobody")
    assert r.returncode == 0, r.stderr
    assert "not readable" in r.stderr and "Traceback" not in r.stderr
    r = run("sweep", "--once", "--policy", str(REPO / "policies" / "slurm.yaml"), user="nobody")
    assert r.returncode == 77 and "needs root" in r.stderr, r.stderr

"""systemd/pruned.service: `systemd-analyze verify` is silent on it, and it keeps the
promises the daemon relies on (Type=notify, watchdog, exit 78 not restarted, the real /tmp
and writable cgroups, and a reason for every capability it keeps)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pruned.exitcodes import EX_CONFIG
from tests.fixtures.paths import REPO

UNIT = REPO / "systemd" / "pruned.service"
VENV_PRUNED = REPO / ".venv" / "bin" / "pruned"
SHIPPED_EXEC = "/usr/sbin/pruned"


def directives(text: str) -> list[tuple[str, str]]:
    """(key, value) of every directive line, in order; comments and sections left out."""
    out = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith(("#", ";", "[")):
            continue
        key, _, value = s.partition("=")
        out.append((key.strip(), value.strip()))
    return out


def one(text: str, key: str) -> str:
    values = [v for k, v in directives(text) if k == key]
    assert len(values) == 1, f"{key}= must be set exactly once, found {values}"
    return values[0]


def verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    unit = tmp_path / "pruned.service"
    unit.write_text(text)
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


@pytest.fixture
def local_unit() -> str:
    """The shipped unit with ExecStart pointing at this checkout's venv."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    if not VENV_PRUNED.exists():
        pytest.skip(f"{VENV_PRUNED} missing (run scripts/setup.sh)")
    text = UNIT.read_text()
    execs = [v.split()[0] for k, v in directives(text) if k.startswith("Exec")]
    assert execs and all(e == SHIPPED_EXEC for e in execs), execs  # one pruned for all
    return text.replace(SHIPPED_EXEC, str(VENV_PRUNED))


def test_systemd_analyze_verify_is_silent(tmp_path, local_unit):
    r = verify(tmp_path, local_unit)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_verify_does_catch_a_broken_unit(tmp_path, local_unit):
    """The check above can fail: verify here does complain about a bad directive."""
    r = verify(tmp_path, local_unit.replace("Type=notify", "Type=notifyy"))
    assert r.stdout + r.stderr, "systemd-analyze verify accepted Type=notifyy"


def test_unit_promises():
    text = UNIT.read_text()
    assert one(text, "Type") == "notify"
    exec_start = one(text, "ExecStart").split()
    assert exec_start[:2] == [SHIPPED_EXEC, "run"], exec_start
    assert re.fullmatch(r"\d+(s|min)?", one(text, "WatchdogSec")), "WatchdogSec= needs a value"
    assert str(EX_CONFIG) in one(text, "RestartPreventExitStatus").split()
    assert one(text, "Restart") == "on-failure"
    keys = {k for k, _ in directives(text)}
    # pruned cleans the real /tmp and writes job cgroups: neither may be sandboxed away.
    assert "PrivateTmp" not in keys
    assert "ProtectControlGroups" not in keys


def test_reload_waits_for_the_daemons_verdict():
    """`systemctl reload` must fail on a rejected policy: ExecReload= is `pruned reload`,
    which waits for the daemon's answer (tests/real/test_daemon.py runs this very line)."""
    text = UNIT.read_text()
    assert one(text, "ExecReload") == f"{SHIPPED_EXEC} reload $MAINPID"


def test_every_kept_capability_is_explained():
    text = UNIT.read_text()
    caps = one(text, "CapabilityBoundingSet").split()
    assert caps and all(c.startswith("CAP_") for c in caps), caps
    comments = [ln.lstrip("# ").rstrip() for ln in text.splitlines() if ln.startswith("#")]
    # A reason line: "# CAP_A, CAP_B: why ..." naming the capability before the colon.
    explained = set()
    for c in comments:
        head, sep, why = c.partition(":")
        if sep and why.strip():
            explained |= {w.strip() for w in head.split(",") if w.strip().startswith("CAP_")}
    missing = [c for c in caps if c not in explained]
    assert not missing, f"capabilities kept without a comment saying why: {missing}"

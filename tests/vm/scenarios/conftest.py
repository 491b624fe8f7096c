"""Session fixtures of the VM lane's scenarios (run inside the guest by guest/run-scenarios.sh),
and their order: the node runs the shipped report-mode policy first (the scene's strays must
live while they are classified), then an enforcing one, and the package is upgraded and purged
last."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import scene as scene_mod
from vmlib import RESULTS, Scan, journal_after, journal_cursor, pruned_scan, sh, wait_for

# Module -> phase; modules not listed are report-mode scenarios (phase 1).
PHASES = {
    "test_package": 0,  # what the installation left (before anything changes it)
    "test_epilog": 2,  # enforce policy, the daemon stopped: the epilog alone
    "test_enforce": 3,  # the daemon enforcing under its unit: kill, freeze, adopt, journald
    "test_cleanup": 4,
    "test_pam_systemd": 5,
    "test_watchdog": 6,
    "test_upgrade": 9,  # upgrade, remove, purge: nothing of pruned is left to test after it
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: PHASES.get(item.module.__name__, 1))  # stable within a phase


@pytest.fixture(scope="session")
def scene() -> scene_mod.Scene:
    """The node with every kind of process at once (scene.py); built once."""
    return scene_mod.build()


@pytest.fixture(scope="session")
def scan(scene: scene_mod.Scene) -> Scan:
    """One `pruned scan --json` of the scene, as a site admin would run it."""
    result = pruned_scan()
    (RESULTS / "scan.jsonl").write_text(
        "\n".join(json.dumps(r, sort_keys=True) for r in result.records.values()) + "\n")
    (RESULTS / "scan.stderr").write_text(result.stderr)
    return result


HERE = Path(__file__).parent
POLICY_D = Path("/etc/pruned/policy.d")
ENFORCE = POLICY_D / "60-vm-enforce.yaml"
DROPIN = Path("/etc/systemd/system/pruned.service.d/50-vm-watchdog.conf")
# A watchdog test must not wait the shipped WatchdogSec=180 (three minutes per image): the
# mechanism is the same at 10 s (pruned then sweeps every 5 s, half of it), and RestartSec
# only delays the restart that test_watchdog waits for.
DROPIN_TEXT = "[Service]\nWatchdogSec=10s\nRestartSec=2s\n"


@pytest.fixture(scope="session")
def enforce_policy(scene: scene_mod.Scene) -> Path:
    """The node's policy switched to enforce (policy-enforce.yaml as a drop-in), checked as an
    admin checks it: `pruned check-config` as root also keeps it as the last good policy that
    pruned-epilog falls back to. Requested only once the report-mode scenarios are done."""
    shutil.copy(HERE / "policy-enforce.yaml", ENFORCE)
    out = sh("pruned", "check-config")
    assert "kept as the last good policy" in out.stdout + out.stderr, out
    return ENFORCE


@dataclass(frozen=True)
class Daemon:
    cursor: str  # the journal before the enforcing daemon started
    pid: int


def main_pid() -> int:
    return int(sh("systemctl", "show", "-p", "MainPID", "--value", "pruned.service").stdout)


@pytest.fixture(scope="session")
def enforcing(enforce_policy: Path) -> Daemon:
    """pruned.service (re)started with the enforce policy and the watchdog drop-in."""
    DROPIN.parent.mkdir(parents=True, exist_ok=True)
    DROPIN.write_text(DROPIN_TEXT)
    sh("systemctl", "daemon-reload")
    sh("systemctl", "reset-failed", "pruned.service", check=False)
    cursor = journal_cursor()
    sh("systemctl", "restart", "pruned.service", timeout=300)
    started = wait_for("the enforcing daemon's daemon_started", lambda: journal_after(
        cursor, SYSLOG_IDENTIFIER="pruned", PRUNED_EVENT="daemon_started"), timeout=120)
    assert "mode enforce" in started[-1]["MESSAGE"], started[-1]["MESSAGE"]
    return Daemon(cursor, main_pid())

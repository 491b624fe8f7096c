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
    "test_job_container": 7,  # Slurm reconfigured: job_container/tmpfs, then set back
    "test_runinjob": 8,  # Slurm reconfigured: PrologFlags=Contain,RunInJob, then set back
    "test_upgrade": 9,  # upgrade, remove, purge: nothing of pruned is left to test after it
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: PHASES.get(item.module.__name__, 1))  # stable within a phase


_config: list[pytest.Config] = []


def pytest_configure(config: pytest.Config) -> None:
    _config.append(config)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A failure's traceback right away, not only in the summary at the end: the output
    streams to the host, and a VM its watchdog kills (tests/vm/run.sh) never reaches the end."""
    if report.failed and _config:
        tr = _config[0].pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"\n--- {report.nodeid} ({report.when}) failed:\n"
                          f"{report.longreprtext[-6000:]}\n---")


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
# The watchdog must not wait the shipped WatchdogSec=180 (three minutes per image). pruned pings
# after each completed sweep, so the limit must outlast a sweep that kills (grace 2 s, freeze,
# TCG on a loaded host: 10 s was missed there, and the kill's records with it): 60 s for the
# enforcing phases, 10 s only while test_watchdog waits for it to fire (watchdog_dropin).
# RestartSec only delays the restart that test_watchdog waits for.
def watchdog_dropin(seconds: int) -> None:
    """pruned.service restarted under WatchdogSec=seconds (RestartSec=2s)."""
    DROPIN.parent.mkdir(parents=True, exist_ok=True)
    DROPIN.write_text(f"[Service]\nWatchdogSec={seconds}s\nRestartSec=2s\n")
    sh("systemctl", "daemon-reload")
    sh("systemctl", "reset-failed", "pruned.service", check=False)
    sh("systemctl", "restart", "pruned.service", timeout=300)


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
    cursor = journal_cursor()
    watchdog_dropin(60)
    started = wait_for("the enforcing daemon's daemon_started", lambda: journal_after(
        cursor, SYSLOG_IDENTIFIER="pruned", PRUNED_EVENT="daemon_started"), timeout=120)
    assert "mode enforce" in started[-1]["MESSAGE"], started[-1]["MESSAGE"]
    return Daemon(cursor, main_pid())

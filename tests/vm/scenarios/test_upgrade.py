"""Last: the package's upgrade, removal and purge, as a site admin runs them.

- upgrade to the same tree rebuilt as a higher version (run.sh: build-deb.sh --version): the
  admin's edit of the conffile /etc/pruned/policy.d/00-default.yaml survives, the running
  daemon is restarted (try-restart) with the new version;
- `apt-get remove`: the daemon stopped, the conffiles and /var/lib/pruned (job history, last
  good policies) kept;
- `apt-get purge`: the unit, the conffiles and /var/lib/pruned, /var/log/pruned gone; files the
  admin added to /etc/pruned/policy.d (not the package's) are left, as dpkg leaves any file it
  does not own -- so /etc/pruned stays exactly while such files are there."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DROPIN, main_pid
from vmlib import sh, wait_for

CONFFILE = Path("/etc/pruned/policy.d/00-default.yaml")
UPGRADE = Path("/run/pruned-vm/deb/upgrade")
EDIT = "\n# vm lane: the admin edited this conffile\n"
APT = ("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y",
       "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold")


def version() -> str:
    return sh("dpkg-query", "-W", "-f=${Version}", "pruned").stdout


def active() -> str:
    return sh("systemctl", "is-active", "pruned.service", check=False).stdout.strip()


@pytest.fixture(scope="module")
def upgraded() -> tuple[str, int, str]:
    """(version before, daemon pid before, apt's output)."""
    before, pid = version(), main_pid()
    assert active() == "active" and pid
    CONFFILE.write_text(CONFFILE.read_text() + EDIT)
    [deb] = UPGRADE.glob("pruned_*_all.deb")
    out = sh(*APT, "install", str(deb), timeout=600)
    return before, pid, out.stdout + out.stderr


def test_upgrade_keeps_the_edited_conffile(upgraded) -> None:
    before, _pid, out = upgraded
    assert version() != before and version().startswith(before), (before, version(), out)
    assert CONFFILE.read_text().endswith(EDIT), out
    assert sh("pruned", "--version").stdout.split()[-1] == before.split("+")[0]


def test_upgrade_restarts_the_running_daemon(upgraded) -> None:
    _before, pid, out = upgraded
    wait_for("pruned active again", lambda: active() == "active", timeout=120)
    assert main_pid() != pid, out
    sh("pruned", "check-config")


def test_remove_stops_it_and_keeps_config_and_state(upgraded) -> None:
    sh(*APT, "remove", "pruned", timeout=600)
    assert active() != "active"
    assert not Path("/usr/sbin/pruned").exists()
    assert CONFFILE.read_text().endswith(EDIT)  # conffiles stay until purge
    assert Path("/var/lib/pruned").is_dir()
    assert sh("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "pruned").stdout.startswith("rc")


def test_purge_removes_unit_config_and_state() -> None:
    DROPIN.unlink()  # the lane's own drop-in, not the package's
    sh(*APT, "purge", "pruned", timeout=600)
    sh("systemctl", "daemon-reload")
    assert sh("dpkg-query", "-W", "pruned", check=False).returncode != 0
    unit = sh("systemctl", "show", "pruned.service", "-p", "LoadState", "-p",
              "UnitFileState").stdout
    assert "LoadState=not-found" in unit, unit
    assert not list(Path("/etc/systemd/system").glob("*/pruned.service")), "enable link left"
    assert not CONFFILE.exists()
    assert not Path("/var/lib/pruned").exists() and not Path("/var/log/pruned").exists()
    left = sorted(p.name for p in Path("/etc/pruned").rglob("*") if p.is_file())
    assert left and all(n.startswith(("50-vm", "60-vm")) for n in left), left

"""The node really is what the lane claims: systemd as PID 1, pure cgroup v2, every daemon
from its own unit, no network but loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from vmlib import read_proc, sh


def test_pid1_is_systemd() -> None:
    assert os.readlink("/proc/1/exe").endswith("/systemd")
    assert Path("/run/systemd/system").is_dir()


def test_pure_cgroup_v2() -> None:
    assert Path("/sys/fs/cgroup/cgroup.controllers").is_file()
    assert sh("stat", "-fc", "%T", "/sys/fs/cgroup").stdout.strip() == "cgroup2fs"
    fstypes = [line.split(" - ", 1)[1].split()[0]
               for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    assert "cgroup" not in fstypes, "a cgroup v1 hierarchy is mounted"
    assert Path("/proc/self/cgroup").read_text().startswith("0::/")
    assert len(Path("/proc/self/cgroup").read_text().splitlines()) == 1


@pytest.mark.parametrize("unit", ["systemd-journald", "munge", "slurmctld", "slurmd", "ssh"])
def test_daemon_runs_from_its_own_unit(unit: str) -> None:
    assert sh("systemctl", "is-active", unit, check=False).stdout.strip() == "active"
    pid = int(sh("systemctl", "show", "-p", "MainPID", "--value", unit).stdout)
    p = read_proc(pid)
    assert p is not None, f"{unit}: MainPID {pid} is gone"
    assert p.cgroup_path.startswith(f"/system.slice/{unit}.service"), p.label()


def test_no_network_but_loopback() -> None:
    links = {line.split(":")[1].strip().split("@")[0]
             for line in sh("ip", "-o", "link", "show").stdout.splitlines()}
    assert links <= {"lo", "dummy0"}, links
    addrs = {line.split()[3] for line in sh("ip", "-o", "addr", "show").stdout.splitlines()}
    # IPv6 link-local (fe80::/64) addresses cannot be routed off an interface either.
    addrs = {a for a in addrs if not a.startswith("fe80:")}
    assert addrs <= {"127.0.0.1/8", "::1/128", "192.0.2.1/32"}, addrs
    assert sh("ip", "route", "show", "default").stdout.strip() == ""

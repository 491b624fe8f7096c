"""rules.trust: what a user cannot fake, on built processes (pure)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pruned.model import KnownExes, Policy
from pruned.rules.trust import (
    exe_in,
    in_ranges,
    is_genuine_root,
    is_kernel,
    is_root_daemon,
    is_system_uid,
    root_exe_matches,
)
from tests.unit.test_classify import P

STEPD = frozenset({"/usr/sbin/slurmstepd", "/usr/sbin/slurmstepd-wlm"})


@pytest.mark.parametrize(
    ("proc", "genuine"),
    [
        (P(10, 1, 0, "d", exact=True), True),
        (P(10, 1, 0, "d", exact=False), False),  # root-owned /proc, status unread or unreadable
        (P(10, 1, 0, "d", exact=True, state="Z"), False),
        (P(10, 1, 1007, "d", exact=True), False),
        # a root daemon that lowered its effective uid for a moment is still root
        (replace(P(10, 1, 0, "d", exact=True), euid=1007), True),
        # a setuid-root program a user started keeps the user's real uid
        (replace(P(10, 1, 1007, "d", exact=True), euid=0), False),
    ],
)
def test_is_genuine_root(proc, genuine) -> None:
    assert is_genuine_root(proc) is genuine


def test_is_root_daemon_needs_both_root_and_the_binary() -> None:
    assert is_root_daemon(P(5, 1, 0, "x", "/usr/sbin/slurmstepd-wlm (deleted)"), STEPD)
    assert is_root_daemon(P(5, 1, 0, "x", "/opt/slurm/24.11/sbin/slurmstepd"), STEPD)
    assert not is_root_daemon(P(5, 1, 1007, "slurmstepd", "/usr/sbin/slurmstepd"), STEPD)
    assert not is_root_daemon(P(5, 1, 0, "slurmstepd", "/usr/bin/sleep"), STEPD)
    assert not root_exe_matches(None, STEPD) and not root_exe_matches("", STEPD)


def test_exe_in_is_exact() -> None:
    wl = {"/opt/site/bin/agent"}
    assert exe_in(P(5, 1, 1007, "a", "/opt/site/bin/agent"), wl)
    assert exe_in(P(5, 1, 1007, "a", "/opt/site/bin/agent (deleted)"), wl)
    assert not exe_in(P(5, 1, 1007, "a", "/home/u/agent"), wl)  # same name elsewhere: no
    assert not exe_in(P(5, 1, 1007, "a"), wl)


def test_kernel_and_uid_ranges() -> None:
    assert is_kernel(P(1, 0, 0, "init")) and is_kernel(P(2, 0, 0, "kthreadd"))
    assert is_kernel(P(77, 2, 0, "kworker")) and is_kernel(P(77, 5, 0, "k", kthread=True))
    assert not is_kernel(P(77, 1, 0, "sshd"))
    assert in_ranges(64030, ((60000, 64999),)) and not in_ranges(59999, ((60000, 64999),))
    assert is_system_uid(98, ()) and not is_system_uid(99, ()) and is_system_uid(500, ((100, 999),))


def test_known_exes_of_a_policy_without_resolving() -> None:
    exes = KnownExes.of(Policy())
    assert "/usr/sbin/slurmstepd" in exes.daemons and "/usr/sbin/sshd" in exes.sshd
    assert exes.whitelist == frozenset()
    resolved = KnownExes.of(Policy(), lambda ps: frozenset(p + "!" for p in ps))
    assert "/usr/sbin/sshd!" in resolved.sshd

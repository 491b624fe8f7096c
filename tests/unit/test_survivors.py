"""The memory of SIGKILL survivors (act/kill.Survivors) and the blocked-syscall parser."""

from __future__ import annotations

from pruned.act.kill import Survivors
from pruned.linux.blocked import parse_syscall
from pruned.model import ProcKey


def test_survivor_reminded_at_the_interval_and_forgotten_when_gone() -> None:
    now = [0.0]
    s = Survivors(remind_every=3600.0, clock=lambda: now[0])
    key, reused = ProcKey(4242, 1000), ProcKey(4242, 2000)
    s.remember(key)
    assert key in s and reused not in s, "identity is (pid, starttime)"
    now[0] = 3599.0
    assert not s.reminder_due(key)
    now[0] = 3600.0
    assert s.reminder_due(key)
    assert not s.reminder_due(key), "one reminder per interval"
    s.retain({reused})
    assert key not in s


def test_parse_syscall() -> None:
    line = "262 0xffffff9c 0x7f1244107350 0x7ffd1b58ea60 0x0 0x0 0x0 0x7ffd1b58e9d8 0x7f12442"
    assert parse_syscall(line, "x86_64") == ("newfstatat", [0xFFFFFF9C, 0x7F1244107350,
                                                            0x7FFD1B58EA60, 0, 0, 0])
    assert parse_syscall("79 0x3 0x10 0x0 0x0 0x0 0x0 0x0 0x0", "aarch64")[0] == "newfstatat"
    assert parse_syscall("running", "x86_64") is None
    assert parse_syscall("", "x86_64") is None
    assert parse_syscall("9999 0x0", "x86_64") is None

"""The memory of SIGKILL survivors (act/kill.Survivors) and the blocked-syscall parser."""

from __future__ import annotations

from pruned.act.kill import Survivors
from pruned.linux.blocked import parse_syscall
from pruned.model import Action, ProcKey, Result


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


def test_audit_sweep_first_report_and_reminder() -> None:
    """First time: kill_failed and process_survived; a reminder: process_survived only."""
    from dataclasses import replace

    from pruned.act.audit import ListSink
    from pruned.sweep import SweepReport, audit_sweep
    from tests.unit.test_epilog_exit import outcome
    from tests.unit.test_epilog_targets import observe

    base = outcome(Action.KILL, Result.FAILED)
    first = replace(base, fields=(("PRUNED_SURVIVED", "first"), ("PRUNED_STATE", "D"),
                                  ("PRUNED_WCHAN", "request_wait_answer")))
    reminder = replace(base, fields=(("PRUNED_SURVIVED", "reminder"),))
    got = {}
    for name, o in (("first", first), ("reminder", reminder)):
        sink = ListSink()
        audit_sweep(SweepReport("s1", 0.0, 0.1, False, observe(), [o]), sink)
        got[name] = [(r.event, r.fields.get("PRUNED_REMINDER")) for r in sink.records
                     if r.event != "sweep_summary"]
        if name == "first":
            [surv] = [r for r in sink.records if r.event == "process_survived"]
            assert surv.fields["PRUNED_WCHAN"] == "request_wait_answer"
            assert surv.fields["PRUNED_PID"] == "4242" and surv.priority == 4
            [failed] = [r for r in sink.records if r.event == "kill_failed"]
            assert "PRUNED_SURVIVED" not in failed.fields
    assert got["first"] == [("process_survived", "no"), ("kill_failed", None)]
    assert got["reminder"] == [("process_survived", "yes")]

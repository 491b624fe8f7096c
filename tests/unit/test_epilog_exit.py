"""The epilog's exit code and its failing-safe paths, without touching a process.

Slurm drains the node on any non-zero Epilog exit. `epilog_exit` is pure: only a kill that
FAILED (a process alive after SIGKILL and the freeze path) under epilog.drain_on_survivor makes
it 1. The survivor outcomes here are made up: a process that really survives SIGKILL (D state)
cannot be made on demand; tests/real/test_epilog_real.py runs the real kill and fakes only its
verdict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import pytest

from pruned import epilog
from pruned.act.audit import ListSink
from pruned.exitcodes import EX_FAILED, EX_OK
from pruned.model import (
    Action,
    Decision,
    Outcome,
    Policy,
    Proc,
    ProcClass,
    Result,
    Verdict,
)


def outcome(action: Action, result: Result, pid: int = 4242) -> Outcome:
    proc = Proc(pid, 1000, 1, 30001, "leftover", "D")
    verdict = Verdict(ProcClass.STRAY, "stray.default", "no running job")
    return Outcome(Decision(proc, verdict, action, "kill"), result, "SURVIVED: 4242")


DRAIN = Policy()
NO_DRAIN = dataclasses.replace(Policy(), epilog_drain_on_survivor=False)


@pytest.mark.parametrize(
    ("outcomes", "policy", "code"),
    [
        ([], DRAIN, EX_OK),
        ([outcome(Action.KILL, Result.DONE)], DRAIN, EX_OK),
        ([outcome(Action.KILL, Result.GONE)], DRAIN, EX_OK),
        ([outcome(Action.KILL, Result.SKIPPED)], DRAIN, EX_OK),  # the brake held it
        ([outcome(Action.KILL, Result.WOULD)], DRAIN, EX_OK),  # report mode
        ([outcome(Action.KILL, Result.FAILED)], DRAIN, EX_FAILED),
        ([outcome(Action.KILL, Result.DONE), outcome(Action.KILL, Result.FAILED, 4243)],
         DRAIN, EX_FAILED),
        ([outcome(Action.KILL, Result.FAILED)], NO_DRAIN, EX_OK),
        ([outcome(Action.ADOPT, Result.FAILED)], DRAIN, EX_OK),  # not a survivor of SIGKILL
    ],
)
def test_only_a_survivor_drains_and_only_if_the_policy_says(outcomes, policy, code) -> None:
    assert epilog.epilog_exit(outcomes, policy) == code


def test_internal_error_while_running_exits_0_with_a_record(tmp_path, monkeypatch) -> None:
    sink = ListSink()
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text("version: 1\nmode: report\n")
    monkeypatch.setattr(epilog, "_sink_for", lambda _p: sink)

    def boom(*_a, **_k):
        raise KeyError("a bug deep inside")

    monkeypatch.setattr(epilog, "run_epilog", boom)
    lines: list[str] = []
    code = epilog.epilog_command(str(policy_file), "21", 30001, "u", dry_run=True,
                                 need_root=lambda _w: None, print_fn=lines.append)
    assert code == EX_OK
    [rec] = [r for r in sink.records if r.event == "epilog_error"]
    assert rec.priority == 4 and rec.fields["PRUNED_JOB_ID"] == "21"
    assert "KeyError" in rec.fields["PRUNED_REASON"] and "exiting 0" in rec.message
    assert any("internal error" in line for line in lines)


def test_not_root_is_an_installation_error_not_swallowed(tmp_path, monkeypatch) -> None:
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text("version: 1\nmode: enforce\n")
    monkeypatch.setattr(epilog, "_sink_for", lambda _p: ListSink())

    def need_root(what: str) -> None:
        raise PermissionError(f"{what} needs root")

    with pytest.raises(PermissionError):
        epilog.epilog_command(str(policy_file), "22", 30001, "u", dry_run=False,
                              need_root=need_root, print_fn=lambda _s: None)


def test_own_timeout_exits_0_with_a_record(monkeypatch) -> None:
    """A real SIGALRM ends an epilog that hangs (here: in its observation of the node)."""
    sink = ListSink()
    monkeypatch.setattr(epilog, "EPILOG_SLACK", 0.0)

    def hang(*_a, **_k):
        time.sleep(10)

    monkeypatch.setattr(epilog, "observe", hang)
    policy = dataclasses.replace(Policy(), kill_grace=1.0)
    t0 = time.monotonic()
    code = epilog.run_epilog(policy, "23", 30001, "u", dry_run=True, sink=sink,
                             print_fn=lambda _s: None)
    assert code == EX_OK
    assert time.monotonic() - t0 < 5
    [rec] = [r for r in sink.records if r.event == "epilog_timeout"]
    assert rec.priority == 4 and rec.fields["PRUNED_JOB_ID"] == "23"
    assert "exiting 0" in rec.message


def test_timeout_is_not_swallowed_by_except_oserror() -> None:
    """TimeoutError is an OSError; the epilog's own timeout must get past `except OSError`."""
    assert not issubclass(epilog.EpilogTimeout, Exception)
    with pytest.raises(epilog.EpilogTimeout), contextlib.suppress(OSError):
        epilog._alarm(0, None)

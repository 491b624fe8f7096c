"""audit: record builders pinned against logs/ golden samples; sinks against real sockets.

The journald fallback is tested with the unmodified libsystemd in a private mount
namespace where /run is a fresh tmpfs: the journal socket is absent, a regular file, a
socket nobody listens on, or a fake journald the test reads the native protocol from.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from pruned.act.audit import (
    IDENTIFIER,
    INFO,
    MESSAGE_IDS,
    NOTICE,
    PRIORITIES,
    WARNING,
    AuditRecord,
    JournalSink,
    JsonlSink,
    ListSink,
    default_fallback_path,
    event_record,
    files_record,
    group_held,
    held_record,
    make_sink,
    record_for_outcome,
    summary_record,
    tally,
)
from pruned.model import (
    Action,
    Decision,
    HeldBy,
    Outcome,
    Proc,
    ProcClass,
    ProcKey,
    Result,
    Verdict,
)
from tests.fixtures.paths import REPO

LOGS = REPO / "logs"
BOOT = 1795305600.0  # 2026-11-22T00:00:00Z
SWEEP = "5f1c2a9e"


def stray_outcome(
    action: Action,
    result: Result,
    detail: str = "",
    held: str | None = None,
    job: str | None = None,
) -> Outcome:
    proc = Proc(
        pid=4242,
        starttime=1_116_000,
        ppid=1,
        uid=30012,
        comm="sleep",
        state="S",
        exe="/usr/bin/sleep",
    )
    verdict = Verdict(
        ProcClass.STRAY,
        "stray.default",
        "not in any job cgroup, no batch-daemon ancestor",
        evidence=("freezer:/", "ppid 1 (reparented)"),
    )
    reason = "strays are killed" if action == Action.KILL else f"newest job of uid 30012 is {job}"
    decision = Decision(proc, verdict, action, reason, target_job=job, held=held)
    return Outcome(decision, result, detail, (ProcKey(4242, 1_116_000), ProcKey(4250, 1_116_050)))


BRAKE = (
    "mass-kill brake: kills of 4 uids (30012, 30013, 30014, 30015) exceed "
    "kill.brake.max_uids=3; nothing was killed"
)


def brake_held() -> list[Outcome]:
    """What the brake held of uid 30012 in one sweep: a stray tree of three processes."""
    root = stray_outcome(Action.KILL, Result.SKIPPED, BRAKE, held=BRAKE)
    d = replace(root.decision, held_by=HeldBy.BRAKE)
    out = [replace(root, decision=d)]
    for pid, ppid in ((4250, 4242), (4251, 4250)):
        proc = replace(d.proc, pid=pid, ppid=ppid, starttime=d.proc.starttime + pid - 4242)
        out.append(Outcome(replace(d, proc=proc), Result.SKIPPED, BRAKE))
    return out


def samples() -> dict[str, AuditRecord]:
    """Every golden sample, built from fixed inputs."""
    kill = stray_outcome(Action.KILL, Result.DONE, "SIGTERM to 2, exited within grace (10s)")
    return {
        "sample-kill.json": record_for_outcome(
            kill,
            SWEEP,
            False,
            "bob",
            boot_time=BOOT,
            extra={"PRUNED_SIGNAL": "SIGTERM", "PRUNED_COUNT": "2", "PRUNED_SURVIVORS": "0"},
        ),
        "sample-would-kill.json": record_for_outcome(
            stray_outcome(
                Action.KILL, Result.WOULD, "would send SIGTERM to 2 process(es), SIGKILL after 10s"
            ),
            SWEEP,
            True,
            "bob",
            boot_time=BOOT,
        ),
        "sample-kill-failed.json": record_for_outcome(
            stray_outcome(
                Action.KILL,
                Result.FAILED,
                "SIGTERM to 2, 0 exited within grace (10s), SIGKILL to 2; SURVIVED: 4250",
            ),
            SWEEP,
            False,
            "bob",
            boot_time=BOOT,
        ),
        "sample-adopt.json": record_for_outcome(
            stray_outcome(
                Action.ADOPT,
                Result.DONE,
                "moved 2 process(es) into /sys/fs/cgroup/freezer/slurm_vm/uid_30012/"
                "job_17/step_extern, /sys/fs/cgroup/cpuset/slurm_vm/uid_30012/job_17/"
                "step_extern",
                job="17",
            ),
            SWEEP,
            False,
            "bob",
            boot_time=BOOT,
        ),
        "sample-held.json": held_record(brake_held(), SWEEP, False, "bob", boot_time=BOOT),
        "sample-sweep.json": summary_record(
            SWEEP,
            dry_run=False,
            procs=812,
            jobs=2,
            elapsed=0.084,
            counts={"process_killed": 3, "process_adopted": 1, "process_gone": 1},
        ),
        "sample-files.json": files_record(
            SWEEP,
            path="/tmp/slurm-17",
            files=120,
            nbytes=5_242_880,
            dry_run=False,
            reason="job 17 ended 2026-11-22T02:00:00Z, more than 3600s ago",
            rule="files.job_dir",
            uid=30012,
            user="bob",
            job_id="17",
            names=("out.dat", "core.1234"),
        ),
        "sample-config-rejected.json": event_record(
            "config_rejected",
            "rejected /etc/pruned/pruned.yaml: 12: kill_grace: 'soon' is not a number; "
            "keeping the previous policy",
            path="/etc/pruned/pruned.yaml",
            reason="12: kill_grace: 'soon' is not a number",
        ),
    }


# ---------------------------------------------------------------- pure builders


@pytest.mark.parametrize("name", sorted(samples()))
def test_golden_samples(name: str) -> None:
    """record builders print exactly what logs/ documents (regenerate on purpose only)."""
    golden = json.loads((LOGS / name).read_text())
    assert samples()[name].journal_fields() == golden


def test_kill_message_carries_every_fact() -> None:
    r = samples()["sample-kill.json"]
    assert r.message == (
        "killed stray pid 4242 (sleep, uid 30012 bob, started 2026-11-22T03:06:00Z): rule "
        "stray.default — not in any job cgroup, no batch-daemon ancestor [freezer:/; ppid 1 "
        "(reparented)]; strays are killed; SIGTERM to 2, exited within grace (10s)"
    )
    assert r.priority == NOTICE and r.fields["PRUNED_TREE"] == "4242 4250"
    assert r.journal_fields()["SYSLOG_IDENTIFIER"] == IDENTIFIER == "pruned"


@pytest.mark.parametrize(
    ("action", "result", "dry", "event", "prio"),
    [
        (Action.KILL, Result.DONE, False, "process_killed", NOTICE),
        (Action.KILL, Result.WOULD, True, "would_kill", NOTICE),
        (Action.KILL, Result.FAILED, False, "kill_failed", WARNING),
        (Action.KILL, Result.GONE, False, "process_gone", INFO),
        (Action.KILL, Result.SKIPPED, False, "action_held", INFO),
        (Action.ADOPT, Result.DONE, False, "process_adopted", NOTICE),
        (Action.ADOPT, Result.WOULD, True, "would_adopt", NOTICE),
        (Action.ADOPT, Result.FAILED, False, "adopt_failed", WARNING),
        (Action.IGNORE, Result.DONE, False, "process_ignored", INFO),
    ],
)
def test_event_table(action: Action, result: Result, dry: bool, event: str, prio: int) -> None:
    r = record_for_outcome(stray_outcome(action, result, job="9"), "s1", dry, None)
    assert (r.event, r.priority, r.message_id) == (event, prio, MESSAGE_IDS[event])
    assert r.fields["PRUNED_DRY_RUN"] == ("yes" if dry else "no")
    assert r.fields["PRUNED_RESULT"] == result.value and "PRUNED_USER" not in r.fields
    assert "started tick 1116000" in r.message  # no boot time given: raw ticks
    assert (" (dry run)" in r.message) == dry


def test_ids_unique_and_complete() -> None:
    assert len(set(MESSAGE_IDS.values())) == len(MESSAGE_IDS) == len(PRIORITIES)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in MESSAGE_IDS.values())


def test_event_record_names_and_errors() -> None:
    r = event_record("brake_tripped", "brake", count=51, PRUNED_LIMIT=50, sweep_id="x", path=None)
    assert r.fields == {
        "PRUNED_EVENT": "brake_tripped",
        "PRUNED_COUNT": "51",
        "PRUNED_LIMIT": "50",
        "PRUNED_SWEEP_ID": "x",
    }
    assert r.priority == WARNING
    with pytest.raises(ValueError, match="unknown audit event"):
        event_record("nope", "x")
    with pytest.raises(ValueError, match="invalid journal field"):
        event_record("resync", "x", **{"bad-name": 1})


def test_tally_feeds_summary() -> None:
    recs = [
        record_for_outcome(stray_outcome(Action.KILL, r), "s", False, None)
        for r in (Result.DONE, Result.DONE, Result.GONE)
    ]
    s = summary_record(
        "s",
        dry_run=True,
        procs=10,
        jobs=0,
        counts=tally(recs),
        elapsed=0.5,
        report_only="job source unreadable",
    )
    assert s.fields["PRUNED_KILLED"] == "2" and s.fields["PRUNED_GONE"] == "1"
    assert "report-only: job source unreadable" in s.message and s.message.endswith("(dry run)")


def test_what_the_brake_holds_is_one_record_per_uid() -> None:
    """A held tree is one record per sweep (not one per process), naming its oldest root."""
    first = brake_held()[0]
    proc = replace(first.decision.proc, pid=5000, uid=30013)
    other = replace(first, decision=replace(first.decision, proc=proc))
    gone = stray_outcome(Action.KILL, Result.GONE, "gone before acting")
    rail = stray_outcome(Action.KILL, Result.SKIPPED, "now in job 9's cgroup")  # a re-check
    single, groups = group_held([*brake_held(), other, gone, rail])
    assert single == [gone, rail]
    assert [[o.decision.proc.pid for o in g] for g in groups] == [[4242, 4250, 4251], [5000]]
    r = held_record(groups[0], "s", False, "bob")
    assert (r.event, r.fields["PRUNED_PID"]) == ("action_held", "4242")
    assert r.fields["PRUNED_HELD"] == BRAKE and r.fields["PRUNED_UID"] == "30012"
    assert (r.fields["PRUNED_COUNT"], r.fields["PRUNED_TREES"]) == ("3", "1")
    assert r.fields["PRUNED_TREE"] == "4242 4250 4251"
    assert "one record for 3 processes of uid 30012 in 1 tree" in r.message
    alone = held_record(groups[1], "s", False, None)
    assert alone.fields["PRUNED_COUNT"] == "1" and "PRUNED_DETAIL" not in alone.fields
    # the summary still counts processes
    assert tally([r, alone])["action_held"] == 4


def test_a_held_group_names_its_oldest_root() -> None:
    a, b = brake_held()[0], brake_held()[1]  # b: the child of a, now made a root of its own
    b = replace(b, decision=replace(b.decision, proc=replace(b.decision.proc, ppid=1)))
    older = replace(b.decision.proc, starttime=a.decision.proc.starttime - 1)
    b = replace(b, decision=replace(b.decision, proc=older))
    r = held_record([a, b], "s", False, None)
    assert r.fields["PRUNED_PID"] == "4250" and r.fields["PRUNED_TREES"] == "2"


def test_default_fallback_path_in_checkout() -> None:
    assert default_fallback_path() == str(LOGS / "audit.jsonl")


# ---------------------------------------------------------------- sinks


def test_jsonl_sink_writes_valid_lines(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "audit.jsonl"
    sink = JsonlSink(str(path))
    recs = list(samples().values())
    for r in recs:
        sink.emit(r)
    lines = path.read_text().splitlines()
    assert len(lines) == len(recs) == sink.written
    for line, r in zip(lines, recs, strict=True):
        obj = json.loads(line)
        assert {k: obj[k] for k in r.journal_fields()} == r.journal_fields()
        assert int(obj["__REALTIME_TIMESTAMP"]) > 0 and obj["_PID"] == str(os.getpid())
    assert oct(path.stat().st_mode & 0o777) == "0o640"


def test_jsonl_sink_unwritable_goes_to_stderr(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    sink = JsonlSink(str(blocker / "audit.jsonl"))  # parent is a regular file
    sink.emit(samples()["sample-kill.json"])
    assert sink.failures == 1 and "audit.jsonl" in sink.last_error
    assert json.loads(capsys.readouterr().err)["PRUNED_PID"] == "4242"


def test_make_sink_shape(tmp_path: Path) -> None:
    s = make_sink(str(tmp_path / "a.jsonl"))
    assert isinstance(s, JournalSink) and s.fallback.path == str(tmp_path / "a.jsonl")
    lst = ListSink()
    lst.emit(samples()["sample-kill.json"])
    assert lst.records[0].event == "process_killed"



"""The audit trail: one structured journald record per decision that acted (or would have).

Records are built by pure functions (`record_for_outcome`, `summary_record`,
`files_record`, `event_record`) and written by a sink. `JournalSink` sends to journald
and falls back to a JSON-lines file whenever the journal socket is missing or refuses:
libsystemd silently drops a record when /run/systemd/journal/socket is absent, so the
socket is checked before every send. Audit never goes through `logging`: no log level can
drop it.

Event kinds and their fixed MESSAGE_IDs are in `MESSAGE_IDS`. Dry-run decisions have their
own events (`would_kill`, `would_adopt`, `would_remove_files`) so that
`journalctl MESSAGE_ID=<process_killed>` lists real kills only; every record also carries
PRUNED_DRY_RUN=yes|no.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from pruned.model import Action, HeldBy, Outcome, Result
from pruned.text import clip, printable

IDENTIFIER = "pruned"
JOURNAL_SOCKET = "/run/systemd/journal/socket"  # hard-coded in libsystemd too
SYSTEM_FALLBACK = "/var/log/pruned/audit.jsonl"

# syslog priorities
WARNING, NOTICE, INFO = 4, 5, 6

# One fixed id per event kind: `journalctl MESSAGE_ID=<id>` finds every record of a kind.
MESSAGE_IDS: Mapping[str, str] = {
    "process_killed": "8b6b49f477d6450896653fc66324a2a2",
    "process_adopted": "646fd65cd8c6426f943c0b675a134576",
    "kill_failed": "eaf3c077f89741c0a56f361dc575dbc8",
    "adopt_failed": "a806ceb5903e48be808f80bfe72c631d",
    "would_kill": "6c8a401e0be44a9d914d9a2c8578f682",
    "would_adopt": "5ad6d290b206422ca625c98b97b3c396",
    "process_gone": "93e184da886549fb81c20f36b96c9c53",
    "action_held": "3f1b6770e6674bc7b8d0388dcde656ef",
    "process_ignored": "7380a6e67e42434dbaccb82deb2acff3",
    "sweep_summary": "208ffdd56ad84836ad7959212cea26d5",
    "files_removed": "9019151a52484fb9b7a211fc9f0daf40",
    "would_remove_files": "c676412ac634470cb8fa8542881c408f",
    "remove_failed": "1b9e8a42d57f441f915749987183f59d",
    "config_rejected": "e3435123dd5a4c419607a429752f63a1",
    "config_loaded": "8f6f7e975cc448159c620466488fed12",
    "brake_tripped": "e83a3c5e62514abc96ef2b3467c201e3",
    "report_only": "55eb6630c7a8498696215279c6b1001d",
    "resync": "42efc98ebb4244d4ad516a0e5b1d0c95",
    "daemon_started": "0b593cff4611442aac3ab8d293d99f2c",
    "daemon_stopped": "383e699744584e10bc22bde66ce7e83e",
    "policy_fallback": "91d37876e92a495784a4303b130215ce",
    "epilog_error": "b25999160fa540df91d0ce94eeb64cca",
    "epilog_timeout": "4f0e98bc036d43e9b47af85b057dfe5a",
    "process_survived": "46c3c69205e046659ef887e37a449f85",
    "file_sweep_stuck": "d6653e13ba7a45c0bae17ac9d3ce34e6",
    "file_sweep_returned": "ccbd50ce18ae4594b38c43d8f21f97ea",
    "internal_error": "a98d3ff78eb048b5994595b320ae2ce5",
}

PRIORITIES: Mapping[str, int] = {
    "process_killed": NOTICE,
    "process_adopted": NOTICE,
    "would_kill": NOTICE,  # same priority as the real act: `-p notice` shows what would happen
    "would_adopt": NOTICE,
    "files_removed": NOTICE,
    "would_remove_files": NOTICE,
    "kill_failed": WARNING,
    "adopt_failed": WARNING,
    "remove_failed": WARNING,
    "config_rejected": WARNING,
    "brake_tripped": WARNING,
    "report_only": WARNING,
    "policy_fallback": WARNING,  # the epilog could not use the policy: last good one, or nothing
    "epilog_error": WARNING,  # the epilog hit an internal error and exited 0 anyway
    "epilog_timeout": WARNING,  # the epilog ran out of its own time and exited 0
    "process_survived": WARNING,  # outlived SIGKILL (D state): reported once, not re-killed
    "file_sweep_stuck": WARNING,  # a file walk blocked in the kernel (hung NFS/FUSE): once
    "file_sweep_returned": INFO,  # the stuck file walk came back; file sweeps go on
    "internal_error": WARNING,  # a bug stopped one item (a process, a file, a batch): skipped
    "process_gone": INFO,
    "action_held": INFO,
    "process_ignored": INFO,
    "sweep_summary": INFO,
    "config_loaded": INFO,
    "resync": INFO,
    "daemon_started": INFO,
    "daemon_stopped": INFO,
}

_EVENT_FOR: Mapping[tuple[Action, Result], str] = {
    (Action.KILL, Result.DONE): "process_killed",
    (Action.KILL, Result.WOULD): "would_kill",
    (Action.KILL, Result.FAILED): "kill_failed",
    (Action.ADOPT, Result.DONE): "process_adopted",
    (Action.ADOPT, Result.WOULD): "would_adopt",
    (Action.ADOPT, Result.FAILED): "adopt_failed",
}

_VERBS: Mapping[str, str] = {
    "process_killed": "killed",
    "would_kill": "would kill",
    "kill_failed": "FAILED to kill",
    "process_adopted": "adopted",
    "would_adopt": "would adopt",
    "adopt_failed": "FAILED to adopt",
}

_FIELD_NAME = re.compile(r"^[A-Z0-9][A-Z0-9_]*$")  # journald: no lower case, no leading '_'


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit entry: event kind, syslog priority, PRUNED_* fields and the derived MESSAGE."""

    event: str
    priority: int
    fields: Mapping[str, str]
    message: str

    def __post_init__(self) -> None:
        # The one boundary where user-chosen bytes (a comm, an exe or cwd path, a file name)
        # become text for journald and JSON: escaped here, so no sink can fail to encode a
        # record and none is lost (the kill already happened).
        object.__setattr__(self, "message", printable(self.message))
        object.__setattr__(self, "fields", {k: printable(v) for k, v in self.fields.items()})

    @property
    def message_id(self) -> str:
        return MESSAGE_IDS[self.event]

    def journal_fields(self) -> dict[str, str]:
        """Every field as journald stores it (what `journalctl -o json` shows of ours)."""
        return {
            "MESSAGE": self.message,
            "MESSAGE_ID": self.message_id,
            "PRIORITY": str(self.priority),
            "SYSLOG_IDENTIFIER": IDENTIFIER,
            **self.fields,
        }


class AuditSink(Protocol):
    def emit(self, record: AuditRecord) -> None: ...


# What decides, kept when a record cannot be written in full: what happened to whom, by
# which rule, in which sweep. Everything else is dropped; these are escaped and clipped.
_DECIDING = (
    "PRUNED_EVENT", "PRUNED_PID", "PRUNED_STARTTIME", "PRUNED_UID", "PRUNED_USER", "PRUNED_COMM",
    "PRUNED_EXE", "PRUNED_CLASS", "PRUNED_RULE", "PRUNED_ACTION", "PRUNED_RESULT",
    "PRUNED_JOB_ID", "PRUNED_PATH", "PRUNED_FILES", "PRUNED_DRY_RUN", "PRUNED_SWEEP_ID",
)  # fmt: skip
_REDUCED_FIELD = 512  # characters: a path or comm escaped four-fold still fits
_REDUCED_MESSAGE = 1024


def reduced(record: AuditRecord, why: str) -> AuditRecord:
    """The record cut down to its deciding fields, each escaped and clipped, plus
    PRUNED_REDUCED=why: what a sink writes when the full record would not go."""
    fields = {k: clip(printable(str(record.fields[k])), _REDUCED_FIELD)
              for k in _DECIDING if k in record.fields}  # fmt: skip
    fields["PRUNED_REDUCED"] = clip(printable(why), _REDUCED_FIELD)
    event = record.event if record.event in MESSAGE_IDS else "internal_error"
    return AuditRecord(event, record.priority, fields,
                       clip(printable(record.message), _REDUCED_MESSAGE))  # fmt: skip


def error_text(e: BaseException) -> str:
    """`Type: message` of an exception, escaped (its message may quote a user's bytes)."""
    return clip(printable(f"{type(e).__name__}: {e}"), _REDUCED_MESSAGE)


def outcome_fallback_record(
    outcome: Outcome, sweep_id: str, dry_run: bool, e: BaseException
) -> AuditRecord:
    """The record of an outcome whose full record could not be built (a bug in a builder):
    the identity, the verdict and the result, and why the rest is missing. Pure."""
    d = outcome.decision
    p = d.proc
    try:
        event = event_for(outcome)
    except Exception:
        event = "internal_error"
    fields = {
        "PRUNED_EVENT": event,
        "PRUNED_PID": str(p.pid),
        "PRUNED_STARTTIME": str(p.starttime),
        "PRUNED_UID": str(p.uid),
        "PRUNED_COMM": clip(printable(str(p.comm)), _REDUCED_FIELD),
        "PRUNED_CLASS": str(d.verdict.cls.value),
        "PRUNED_RULE": str(d.verdict.rule),
        "PRUNED_ACTION": str(d.action.value),
        "PRUNED_RESULT": str(outcome.result.value),
        "PRUNED_DRY_RUN": _yn(dry_run),
        "PRUNED_SWEEP_ID": sweep_id,
        "PRUNED_REDUCED": f"record not built: {error_text(e)}",
    }
    msg = (f"{event} pid {p.pid} ({fields['PRUNED_COMM']}, uid {p.uid}): {d.action.value} "
           f"{outcome.result.value}, rule {d.verdict.rule}; full record not built: "
           f"{error_text(e)}")
    return AuditRecord(event, PRIORITIES.get(event, WARNING), fields, msg)


# ---------------------------------------------------------------- pure builders


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


def _clean(fields: Mapping[str, object]) -> dict[str, str]:
    """Drop None/empty values; stringify the rest; check names are valid journald fields."""
    out = {}
    for k, v in fields.items():
        if not _FIELD_NAME.match(k):
            raise ValueError(f"invalid journal field name {k!r}")
        if v is None or v == "":
            continue
        out[k] = str(v)
    return out


def event_for(outcome: Outcome) -> str:
    """The event kind of one outcome (pure)."""
    d = outcome.decision
    if outcome.result == Result.GONE:
        return "process_gone"
    if outcome.result == Result.SKIPPED:
        return "action_held"
    if d.action == Action.IGNORE:
        return "process_ignored"
    return _EVENT_FOR[(d.action, outcome.result)]


def record_for_outcome(
    outcome: Outcome,
    sweep_id: str,
    dry_run: bool,
    user: str | None,
    *,
    boot_time: float | None = None,
    clk_tck: int = 100,
    extra: Mapping[str, str] | None = None,
) -> AuditRecord:
    """The audit record of one acted (or would-have) decision. Pure.

    `boot_time` (epoch) lets the MESSAGE give the start date. `outcome.fields` and then
    `extra` add fields from the action (e.g. `KillResult.audit_fields()`: PRUNED_SIGNAL,
    PRUNED_COUNT, PRUNED_TREE), overriding the defaults.
    """
    d = outcome.decision
    p, v = d.proc, d.verdict
    event = event_for(outcome)
    job = d.target_job or v.job_id
    started = _iso(boot_time + p.starttime / clk_tck) if boot_time is not None else None
    fields = _clean(
        {
            "PRUNED_EVENT": event,
            "PRUNED_PID": p.pid,
            "PRUNED_STARTTIME": p.starttime,
            "PRUNED_STARTED": started,
            "PRUNED_PPID": p.ppid,
            "PRUNED_UID": p.uid,
            "PRUNED_USER": user,
            "PRUNED_COMM": p.comm,
            "PRUNED_EXE": p.exe,
            "PRUNED_CLASS": v.cls.value,
            "PRUNED_RULE": v.rule,
            "PRUNED_REASON": v.reason,
            "PRUNED_EVIDENCE": "; ".join(v.evidence),
            "PRUNED_DECIDER": v.decider,
            "PRUNED_ACTION": d.action.value,
            "PRUNED_DECISION": d.reason if d.reason != v.reason else None,
            "PRUNED_RESULT": outcome.result.value,
            "PRUNED_HELD": d.held,
            "PRUNED_DETAIL": outcome.detail,
            "PRUNED_JOB_ID": job,
            "PRUNED_TREE": " ".join(str(k.pid) for k in outcome.signalled[:50]),
            "PRUNED_DRY_RUN": _yn(dry_run),
            "PRUNED_SWEEP_ID": sweep_id,
            **dict(outcome.fields),  # what the action reported (KillResult.audit_fields())
            **(extra or {}),
        }
    )
    return AuditRecord(event, PRIORITIES[event], fields, _process_message(event, fields))


# Guards that hold back a whole sweep: they hold the same processes again on every sweep
# until an admin acts, so their held outcomes are written as one record per uid.
NODE_GUARDS = (HeldBy.BRAKE, HeldBy.REPORT_ONLY)


def group_held(outcomes: Sequence[Outcome]) -> tuple[list[Outcome], list[list[Outcome]]]:
    """(outcomes recorded one by one, groups recorded one record each). Pure.

    A group: the outcomes a node-wide guard (NODE_GUARDS) held, of one uid, one action and
    one reason. A fork bomb of 400 held by the brake is one record per sweep, not 400.
    """
    single: list[Outcome] = []
    groups: dict[tuple[int, Action, str | None], list[Outcome]] = {}
    for o in outcomes:
        d = o.decision
        if o.result is Result.SKIPPED and d.held_by in NODE_GUARDS:
            groups.setdefault((d.proc.uid, d.action, d.held), []).append(o)
        else:
            single.append(o)
    return single, list(groups.values())


def held_record(
    group: Sequence[Outcome],
    sweep_id: str,
    dry_run: bool,
    user: str | None,
    *,
    boot_time: float | None = None,
    clk_tck: int = 100,
) -> AuditRecord:
    """The one action_held record of a group from `group_held`. Pure.

    It names the group's oldest topmost process (the stray root a human looks for first);
    PRUNED_COUNT says how many processes were held, PRUNED_TREES in how many trees, and
    PRUNED_TREE lists up to 50 of their pids.
    """
    pids = sorted(o.decision.proc.pid for o in group)
    members = set(pids)
    roots = [o for o in group if o.decision.proc.ppid not in members] or list(group)
    first = min(roots, key=lambda o: (o.decision.proc.starttime, o.decision.proc.pid))
    uid = first.decision.proc.uid
    trees = f"{len(roots)} tree" + ("s" if len(roots) > 1 else "")
    detail = f"one record for {len(group)} processes of uid {uid} in {trees}"
    if len(group) == 1:
        detail = ""
    fields = {
        "PRUNED_COUNT": str(len(group)),
        "PRUNED_TREES": str(len(roots)),
        "PRUNED_TREE": " ".join(map(str, pids[:50])),
    }
    return record_for_outcome(
        Outcome(first.decision, Result.SKIPPED, detail),
        sweep_id,
        dry_run,
        user,
        boot_time=boot_time,
        clk_tck=clk_tck,
        extra=fields,
    )


def _process_message(event: str, f: Mapping[str, str]) -> str:
    action = f["PRUNED_ACTION"]
    if event in _VERBS:
        verb = _VERBS[event]
    elif event == "process_gone":
        verb = f"did not {action} (gone or pid reused)"
    elif event == "action_held":
        verb = f"held back {action} of"
    else:
        verb = "ignored"
    who = f"{f['PRUNED_COMM']}, uid {f['PRUNED_UID']}"
    if "PRUNED_USER" in f:
        who += f" {f['PRUNED_USER']}"
    who += f", started {f.get('PRUNED_STARTED') or 'tick ' + f['PRUNED_STARTTIME']}"
    into = ""
    if action == Action.ADOPT.value and "PRUNED_JOB_ID" in f:
        into = f" into job {f['PRUNED_JOB_ID']}"
    msg = f"{verb} {f['PRUNED_CLASS']} pid {f['PRUNED_PID']} ({who}){into}: "
    msg += f"rule {f['PRUNED_RULE']} — {f['PRUNED_REASON']}"
    if "PRUNED_EVIDENCE" in f:
        msg += f" [{f['PRUNED_EVIDENCE']}]"
    if "PRUNED_DECISION" in f:
        msg += f"; {f['PRUNED_DECISION']}"
    if "PRUNED_HELD" in f:
        msg += f"; held: {f['PRUNED_HELD']}"
    if "PRUNED_DETAIL" in f:
        msg += f"; {f['PRUNED_DETAIL']}"
    if f["PRUNED_DRY_RUN"] == "yes":
        msg += " (dry run)"
    return msg


def tally(records: Iterable[AuditRecord]) -> dict[str, int]:
    """Count records by event kind (for `summary_record`); a `held_record` counts as the
    processes it stands for."""
    out: dict[str, int] = {}
    for r in records:
        n = int(r.fields.get("PRUNED_COUNT", "1")) if r.event == "action_held" else 1
        out[r.event] = out.get(r.event, 0) + n
    return out


_SUMMARY_ORDER = (
    ("process_killed", "killed", "PRUNED_KILLED"),
    ("process_adopted", "adopted", "PRUNED_ADOPTED"),
    ("would_kill", "would kill", "PRUNED_WOULD_KILL"),
    ("would_adopt", "would adopt", "PRUNED_WOULD_ADOPT"),
    ("kill_failed", "kill failed", "PRUNED_KILL_FAILED"),
    ("adopt_failed", "adopt failed", "PRUNED_ADOPT_FAILED"),
    ("process_gone", "gone", "PRUNED_GONE"),
    ("action_held", "held", "PRUNED_HELD_COUNT"),
)


def summary_record(
    sweep_id: str,
    *,
    dry_run: bool,
    procs: int,
    jobs: int,
    counts: Mapping[str, int],
    elapsed: float,
    report_only: str | None = None,
) -> AuditRecord:
    """The one INFO record closing a process sweep: what was seen and done. Pure."""
    fields = {
        "PRUNED_EVENT": "sweep_summary",
        "PRUNED_PROCS": procs,
        "PRUNED_JOBS": jobs,
        "PRUNED_ELAPSED_MS": round(elapsed * 1000),
        "PRUNED_DRY_RUN": _yn(dry_run),
        "PRUNED_SWEEP_ID": sweep_id,
        "PRUNED_REPORT_ONLY": report_only,
    }
    parts = []
    for event, label, name in _SUMMARY_ORDER:
        fields[name] = counts.get(event, 0)
        parts.append(f"{label} {counts.get(event, 0)}")
    msg = f"sweep {sweep_id}: {procs} processes, {jobs} running jobs; " + ", ".join(parts)
    msg += f"; {elapsed:.3f}s"
    if report_only:
        msg += f"; report-only: {report_only}"
    if dry_run:
        msg += " (dry run)"
    return AuditRecord("sweep_summary", INFO, _clean(fields), msg)


def files_record(
    sweep_id: str,
    *,
    path: str,
    files: int,
    nbytes: int,
    dry_run: bool,
    reason: str,
    rule: str,
    uid: int | None = None,
    user: str | None = None,
    job_id: str | None = None,
    failed: int = 0,
    names: Sequence[str] = (),
) -> AuditRecord:
    """One record per removed (or would-remove) directory or batch of loose files. Pure."""
    event = "would_remove_files" if dry_run else ("remove_failed" if failed else "files_removed")
    fields = _clean(
        {
            "PRUNED_EVENT": event,
            "PRUNED_PATH": path,
            "PRUNED_FILES": files,
            "PRUNED_BYTES": nbytes,
            "PRUNED_FAILED": failed or None,
            "PRUNED_UID": uid,
            "PRUNED_USER": user,
            "PRUNED_JOB_ID": job_id,
            "PRUNED_RULE": rule,
            "PRUNED_REASON": reason,
            "PRUNED_NAMES": " ".join(names),
            "PRUNED_RESULT": "would" if dry_run else ("failed" if failed else "done"),
            "PRUNED_DRY_RUN": _yn(dry_run),
            "PRUNED_SWEEP_ID": sweep_id,
        }
    )
    verb = {"would_remove_files": "would remove", "remove_failed": "partly removed"}.get(
        event, "removed"
    )
    owner = f"uid {uid}" + (f" {user}" if user else "") if uid is not None else "unknown owner"
    msg = f"{verb} {files} file(s), {nbytes} bytes under {path} ({owner}"
    msg += f", job {job_id})" if job_id else ")"
    msg += f": rule {rule} — {reason}"
    if failed:
        msg += f"; {failed} could not be removed"
    if names:
        msg += f"; e.g. {', '.join(names[:5])}"
    if dry_run:
        msg += " (dry run)"
    return AuditRecord(event, PRIORITIES[event], fields, msg)


def event_record(event: str, message: str, **fields: object) -> AuditRecord:
    """Any other event (config_rejected, brake_tripped, daemon_started, ...). Pure.

    Field names may be given bare (`path=...` -> PRUNED_PATH) or in full (`PRUNED_PATH=...`).
    """
    if event not in MESSAGE_IDS:
        raise ValueError(f"unknown audit event {event!r}")
    named = {
        (k if k.startswith("PRUNED_") else f"PRUNED_{k.upper()}"): v for k, v in fields.items()
    }
    return AuditRecord(event, PRIORITIES[event], _clean({"PRUNED_EVENT": event, **named}), message)


# ---------------------------------------------------------------- sinks


def default_fallback_path() -> str:
    """logs/audit.jsonl when running from a checkout (pruned/ next to logs/), else /var/log."""
    checkout_logs = Path(__file__).resolve().parents[2] / "logs"
    if checkout_logs.is_dir():
        return str(checkout_logs / "audit.jsonl")
    return SYSTEM_FALLBACK


class ListSink:
    """Keeps records in memory (tests, `pruned scan`)."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    def emit(self, record: AuditRecord) -> None:
        self.records.append(record)


@dataclass
class JsonlSink:
    """Appends one JSON object per record (journalctl -o json keys) to a file."""

    path: str
    written: int = 0
    failures: int = 0
    last_error: str = ""

    def line(self, record: AuditRecord, reason: str | None = None) -> bytes:
        obj = {
            "__REALTIME_TIMESTAMP": str(time.time_ns() // 1000),
            "_PID": str(os.getpid()),
            "_HOSTNAME": socket.gethostname(),
            **record.journal_fields(),
        }
        if reason:
            obj["PRUNED_FALLBACK_REASON"] = reason
        return (json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n").encode()

    def emit(self, record: AuditRecord, reason: str | None = None) -> None:
        try:
            data = self.line(record, reason)
        except Exception as e:  # cannot happen for an escaped record; if it does, keep the facts
            data = self.line(reduced(record, f"full record not serialisable: {error_text(e)}"),
                             reason)
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o750, exist_ok=True)
            # One write() of one line to an O_APPEND fd: lines never interleave.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.written += 1
        except OSError as e:
            # Last resort: stderr (the service manager keeps it). Never lose the record.
            self.failures += 1
            self.last_error = f"{self.path}: {e.strerror}"
            sys.stderr.write(data.decode())
            sys.stderr.flush()


@dataclass
class JournalSink:
    """Sends to journald; any record the journal cannot take goes to `fallback`."""

    fallback: JsonlSink
    socket_path: str = JOURNAL_SOCKET
    sent: int = 0
    fallbacks: int = 0
    last_error: str = ""
    _send: object = field(default=None, repr=False)

    def _journal_send(self):  # -> callable or None
        if self._send is None:
            try:
                from systemd import journal
            except ImportError:
                self._send = False
            else:
                self._send = journal.send
        return self._send or None

    def usable(self) -> str | None:
        """None if the journal socket looks alive, else why not."""
        try:
            st = os.stat(self.socket_path)
        except OSError as e:
            return f"{self.socket_path}: {e.strerror}"
        if not stat.S_ISSOCK(st.st_mode):
            return f"{self.socket_path} is not a socket"
        return None

    def emit(self, record: AuditRecord) -> None:
        why = self.usable()
        send = self._journal_send()
        if why is None and send is None:
            why = "systemd-python is not installed"
        if why is None:
            try:
                self._send_one(send, record)
                return
            except OSError as e:  # ECONNREFUSED: stale socket; ENOENT: gone meanwhile
                why = f"journal send failed: {e.strerror or e}"
            except Exception as e:  # a field the binding or journald will not take
                small = reduced(record, f"journal refused the full record: {error_text(e)}")
                try:
                    self._send_one(send, small)
                    return
                except Exception as e2:
                    why = f"journal send failed: {error_text(e2)}"
                    record = small
        self.fallbacks += 1
        self.last_error = why
        self.fallback.emit(record, reason=why)

    def _send_one(self, send, record: AuditRecord) -> None:
        f = record.journal_fields()
        msg = f.pop("MESSAGE")
        send(msg, **f)
        self.sent += 1


def make_sink(fallback_path: str | None) -> JournalSink:
    """The daemon's sink: journald, falling back to JSON lines at fallback_path (or default)."""
    return JournalSink(fallback=JsonlSink(fallback_path or default_fallback_path()))

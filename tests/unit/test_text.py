"""pruned.text and the edges it guards: bytes that are not UTF-8 and control characters are
carried exactly and shown escaped; a record that cannot be written in full goes out reduced;
a log line or an audit record never fails on what a user named."""

from __future__ import annotations

import io
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from pruned import log, text
from pruned.act.audit import (
    AuditRecord,
    JournalSink,
    JsonlSink,
    ListSink,
    event_record,
    outcome_fallback_record,
    record_for_outcome,
    reduced,
)
from pruned.model import Action, Result
from tests.unit.test_audit import SWEEP, stray_outcome

BAD = os.fsdecode(b"a\xff\x1b[2J\n\x7f")  # a name as os.scandir / os.readlink give it


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain ünïcode", "plain ünïcode"),
        (BAD, "a\\xff\\x1b[2J\\x0a\\x7f"),
        ("tab\there\rcr", "tab\\x09here\\x0dcr"),
        ("c1 \x85 next line", "c1 \\u0085 next line"),
        ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
        ("literal \\xff stays", "literal \\xff stays"),
    ],
)
def test_printable(raw: str, shown: str) -> None:
    assert text.printable(raw) == shown
    shown.encode("utf-8")  # always encodable
    assert shown.isprintable()


def test_decode_is_lossless() -> None:
    raw = b"comm\xff\xfe(x)"
    assert os.fsencode(text.decode(raw)) == raw
    assert text.decode(b"a\xff") != text.decode(b"a\xfe")  # "replace" made these equal


def test_escaping_writer_keeps_lines() -> None:
    out = io.StringIO()
    w = text.EscapingWriter(out)
    print(f"pid 1 ({BAD})", "next", sep="\n", file=w)
    assert out.getvalue() == "pid 1 (a\\xff\\x1b[2J\n\\x7f)\nnext\n"
    assert w.getvalue() == out.getvalue()  # everything else reaches the stream


def test_clip() -> None:
    assert text.clip("abc", 5) == "abc"
    assert text.clip("abcdefgh", 3) == "abc...(5 more)"


def test_log_line_with_bad_bytes(monkeypatch, capsys) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    log.warning(f"cannot read {BAD}")
    assert capsys.readouterr().err == "pruned: cannot read a\\xff\\x1b[2J \\x7f\n"


def test_log_journal_binding_that_raises_falls_back_to_stderr(monkeypatch, capfd) -> None:
    import sys
    import types

    st = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")

    def send(*_a, **_k):
        raise ValueError("embedded null byte")

    monkeypatch.setitem(sys.modules, "systemd", types.SimpleNamespace(journal=None))
    monkeypatch.setitem(sys.modules, "systemd.journal", types.SimpleNamespace(send=send))
    monkeypatch.setattr(sys.modules["systemd"], "journal", sys.modules["systemd.journal"])
    log.error("still said")
    assert "pruned: still said" in capfd.readouterr().err


def test_log_bug_names_type_message_and_where(monkeypatch, capsys) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    try:
        raise ValueError(BAD)
    except ValueError as e:
        log.bug("adopt of pid 7 failed", e)
    err = capsys.readouterr().err
    assert err.startswith("pruned: adopt of pid 7 failed: ValueError: a\\xff\\x1b[2J \\x7f")
    assert "(at test_text.py:" in err and "test_log_bug_names_type_message_and_where" in err


# ------------------------------------------------------------------ audit records


def test_record_fields_and_message_are_escaped() -> None:
    o = stray_outcome(Action.KILL, Result.DONE)
    o = replace(o, decision=replace(o.decision, proc=replace(o.decision.proc, comm=BAD,
                                                             exe=f"/tmp/{BAD}/x")))
    r = record_for_outcome(o, SWEEP, False, "alice")
    assert r.fields["PRUNED_COMM"] == "a\\xff\\x1b[2J\\x0a\\x7f"
    assert r.fields["PRUNED_EXE"] == "/tmp/a\\xff\\x1b[2J\\x0a\\x7f/x"
    assert "\n" not in r.message and "\x1b" not in r.message
    assert all(v.isprintable() for v in (*r.fields.values(), r.message))


def test_reduced_keeps_what_decides() -> None:
    r = record_for_outcome(stray_outcome(Action.KILL, Result.DONE), SWEEP, False, "alice")
    big = AuditRecord(r.event, r.priority, {**r.fields, "PRUNED_EVIDENCE": "e" * 100_000,
                                            "PRUNED_EXE": "/x" * 1000}, r.message)
    small = reduced(big, "journal refused it")
    for k in ("PRUNED_EVENT", "PRUNED_PID", "PRUNED_STARTTIME", "PRUNED_UID", "PRUNED_CLASS",
              "PRUNED_RULE", "PRUNED_RESULT", "PRUNED_SWEEP_ID", "PRUNED_DRY_RUN"):
        assert small.fields[k] == r.fields[k], k
    assert "PRUNED_EVIDENCE" not in small.fields
    assert small.fields["PRUNED_EXE"].endswith("(1488 more)")
    assert small.fields["PRUNED_REDUCED"] == "journal refused it"
    assert small.event == r.event and small.message_id == r.message_id


def test_outcome_fallback_record_when_a_builder_fails() -> None:
    o = stray_outcome(Action.KILL, Result.DONE)
    o = replace(o, decision=replace(o.decision, proc=replace(o.decision.proc, comm=BAD)))
    r = outcome_fallback_record(o, SWEEP, False, ValueError(f"bad field {BAD}"))
    assert r.event == "process_killed" and r.fields["PRUNED_PID"] == "4242"
    assert r.fields["PRUNED_COMM"] == "a\\xff\\x1b[2J\\x0a\\x7f"
    assert "ValueError: bad field a\\xff" in r.fields["PRUNED_REDUCED"]


class _Journal:
    """A stand-in for systemd.journal.send: refuses records with a field over `limit`."""

    def __init__(self, limit: int, error: type[Exception] = ValueError) -> None:
        self.limit, self.error, self.got = limit, error, []

    def __call__(self, message: str, **fields: str) -> None:
        if any(len(v) > self.limit for v in (message, *fields.values())):
            raise self.error("field too big")
        self.got.append({"MESSAGE": message, **fields})


def _live_sink(tmp_path: Path, send) -> JournalSink:
    sock = tmp_path / "sock"
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(sock))
    sink = JournalSink(JsonlSink(str(tmp_path / "fb.jsonl")), socket_path=str(sock))
    sink._send = send
    return sink


def test_journal_refusing_a_record_gets_it_reduced(tmp_path: Path) -> None:
    send = _Journal(limit=2000)
    sink = _live_sink(tmp_path, send)
    r = record_for_outcome(stray_outcome(Action.KILL, Result.DONE), SWEEP, False, "alice")
    sink.emit(AuditRecord(r.event, r.priority, {**r.fields, "PRUNED_DETAIL": "d" * 5000},
                          r.message))
    [got] = send.got
    assert got["PRUNED_PID"] == "4242" and got["PRUNED_EVENT"] == "process_killed"
    assert "ValueError: field too big" in got["PRUNED_REDUCED"]
    assert sink.sent == 1 and sink.fallbacks == 0 and not (tmp_path / "fb.jsonl").exists()


def test_journal_refusing_even_the_reduced_record_falls_back_to_the_file(tmp_path: Path) -> None:
    sink = _live_sink(tmp_path, _Journal(limit=0, error=TypeError))
    sink.emit(event_record("resync", f"resync of {BAD}", path=BAD))
    [line] = (tmp_path / "fb.jsonl").read_text().splitlines()
    obj = json.loads(line)
    assert obj["PRUNED_EVENT"] == "resync" and obj["PRUNED_PATH"] == "a\\xff\\x1b[2J\\x0a\\x7f"
    assert "TypeError: field too big" in obj["PRUNED_FALLBACK_REASON"]
    assert "PRUNED_REDUCED" in obj  # the file got the reduced one


def test_sweep_audit_survives_a_builder_and_a_sink_that_raise(monkeypatch) -> None:
    """audit_sweep: a record that cannot be built goes out reduced; a sink that raises on
    one record does not cost the records after it."""
    from pruned import sweep

    good = stray_outcome(Action.KILL, Result.DONE)
    bad = replace(good, fields=(("not a valid field", "x"),))  # _clean raises ValueError

    class Flaky(ListSink):
        def emit(self, record: AuditRecord) -> None:
            if record.event == "process_killed" and "PRUNED_REDUCED" not in record.fields:
                raise OSError("disk full")
            super().emit(record)

    class Snap:
        boot_time, clk_tck, procs = 0.0, 100, {}

    class Jobs:
        def running(self):
            return []

    class Plan:
        brake, report_only = None, ()

    class Obs:
        snap, jobs, plan = Snap(), Jobs(), Plan()

    report = sweep.SweepReport("s1", 0.0, 0.1, False, Obs(), [good, bad])  # type: ignore[arg-type]
    sink = Flaky()
    sweep.audit_sweep(report, sink)
    events = [(r.event, "PRUNED_REDUCED" in r.fields) for r in sink.records]
    assert events == [("process_killed", True), ("sweep_summary", False)]
    assert sink.records[-1].fields["PRUNED_KILLED"] == "2"  # both kills counted


def test_own_state_files_keep_bad_bytes(tmp_path: Path) -> None:
    """The job history (JSON, \\u escapes) gives back exactly the id it was given."""
    from pruned.jobs.history import JobHistory

    job = os.fsdecode(b"J\xff\x1b")
    h = JobHistory.load(str(tmp_path))
    h.mark_ended(job, 31000, 100.0, start=50.0)
    h.save()
    (tmp_path / "history.json").read_bytes().decode("ascii")  # plain ASCII on disk
    assert [r.job_id for r in JobHistory.load(str(tmp_path)).ended()] == [job]

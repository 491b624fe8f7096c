"""audit: record builders pinned against logs/ golden samples; sinks against real sockets.

The journald fallback is tested with the unmodified libsystemd in a private mount
namespace where /run is a fresh tmpfs: the journal socket is absent, a regular file, a
socket nobody listens on, or a fake journald the test reads the native protocol from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from pruned.act.audit import (
    MESSAGE_IDS,
    AuditRecord,
    JournalSink,
    JsonlSink,
)
from tests.fixtures.paths import REPO
from tests.unit.test_audit import samples

NS_DRIVER = textwrap.dedent(
    """
    import json, os, socket, sys
    sys.path.insert(0, REPO)
    from pruned.act.audit import JournalSink, JsonlSink, event_record

    mode, fallback = sys.argv[1], sys.argv[2]
    path = "/run/systemd/journal/socket"
    os.makedirs("/run/systemd/journal", exist_ok=True)
    listener = None
    if mode == "regular":
        open(path, "w").close()
    elif mode in ("stale", "live"):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(path)
        if mode == "stale":
            listener.close()  # the file stays; nobody listens: ECONNREFUSED
    sink = JournalSink(JsonlSink(fallback))
    sink.emit(event_record("resync", "ns test record", test_id=mode, path="/x"))
    out = {"sent": sink.sent, "fallbacks": sink.fallbacks, "why": sink.last_error}
    if mode == "live":
        listener.settimeout(5)
        data = listener.recv(65536).decode()
        out["received"] = dict(l.split("=", 1) for l in data.splitlines() if "=" in l)
    print(json.dumps(out))
    """
)


@pytest.mark.root
@pytest.mark.parametrize("mode", ["absent", "regular", "stale", "live"])
def test_journal_fallback_in_private_mount_ns(tmp_path: Path, mode: str) -> None:
    """libsystemd drops records to a missing socket: the sink must notice and fall back."""
    if not shutil.which("unshare") or os.geteuid() != 0:
        pytest.skip("needs root and unshare")
    driver = tmp_path / "driver.py"
    driver.write_text(NS_DRIVER.replace("REPO)", f"{str(REPO)!r})", 1))
    fallback = tmp_path / "fallback" / "audit.jsonl"
    r = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs pruned-test /run && exec "$0" "$@"',
            sys.executable,
            str(driver),
            mode,
            str(fallback),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    if mode == "live":
        assert out["sent"] == 1 and out["fallbacks"] == 0 and not fallback.exists()
        got = out["received"]
        assert got["PRUNED_TEST_ID"] == "live" and got["SYSLOG_IDENTIFIER"] == "pruned"
        assert got["MESSAGE_ID"] == MESSAGE_IDS["resync"] and got["MESSAGE"] == "ns test record"
        assert got["PRIORITY"] == "6" and got["PRUNED_EVENT"] == "resync"
        return
    assert out["sent"] == 0 and out["fallbacks"] == 1
    expect = {"absent": "No such file", "regular": "not a socket", "stale": "refused"}[mode]
    assert expect in out["why"]
    lines = fallback.read_text().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["PRUNED_TEST_ID"] == mode and obj["MESSAGE_ID"] == MESSAGE_IDS["resync"]
    assert expect in obj["PRUNED_FALLBACK_REASON"]


@pytest.mark.journald
def test_real_journald_roundtrip(tmp_path: Path, journald) -> None:
    """With a real journald (started by the fixture if needed): a record comes back from
    journalctl with every field."""
    test_id = uuid.uuid4().hex
    sink = JournalSink(JsonlSink(str(tmp_path / "fb.jsonl")))
    rec = samples()["sample-kill.json"]
    rec = AuditRecord(
        rec.event, rec.priority, {**rec.fields, "PRUNED_TEST_ID": test_id}, rec.message
    )
    sink.emit(rec)
    assert sink.sent == 1, sink.last_error
    deadline = time.monotonic() + 10
    entries: list[dict] = []
    while time.monotonic() < deadline and not entries:
        out = subprocess.run(
            ["journalctl", "--no-pager", "-o", "json", f"PRUNED_TEST_ID={test_id}"],
            capture_output=True,
            text=True,
        )
        entries = [json.loads(x) for x in out.stdout.splitlines() if x.strip()]
        time.sleep(0.1)
    assert len(entries) == 1
    for k, v in rec.journal_fields().items():
        assert entries[0][k] == v, k


@pytest.mark.journald
def test_log_funnel_reaches_journald_with_priority(tmp_path: Path, journald) -> None:
    """A process whose stderr is its $JOURNAL_STREAM (as under systemd) logs to journald with
    PRIORITY; the same call with any other stderr writes one plain line."""
    marker = uuid.uuid4().hex
    code = (
        "import os; st = os.fstat(2); os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}';"
        f"from pruned import log; log.warning('funnel test {marker}')"
    )
    err = tmp_path / "stderr"
    with open(err, "wb") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, check=True, cwd=str(REPO))
    assert err.read_bytes() == b""  # it went to the journal, not to stderr
    entries = journald.wait_records(MESSAGE=f"funnel test {marker}")
    assert entries[0]["PRIORITY"] == "4" and entries[0]["SYSLOG_IDENTIFIER"] == "pruned"
    out = subprocess.run(
        [sys.executable, "-c", f"from pruned import log; log.warning('plain {marker}')"],
        capture_output=True, text=True, check=True, cwd=str(REPO),
    )  # fmt: skip
    assert out.stderr == f"pruned: plain {marker}\n"

"""The netlink proc connector listener: parsing, batching, and real kernel events.

Real-event tests start processes only as fixture users and clean up by PID; no test asserts a
tight time (deadlines are generous and only bound a wait).
"""

from __future__ import annotations

import struct

import pytest

from pruned.linux.cnproto import (
    CN_IDX_PROC,
    CN_MSG,
    CN_VAL_PROC,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGHDR,
    PROC_CN_MCAST_LISTEN,
    ProcEvent,
    SeqTracker,
    build_mcast_op,
    parse_messages,
)
from pruned.linux.connector import EventBatcher

# --- crafted datagrams ------------------------------------------------------------------------

WHAT = {
    "ack": 0,
    "fork": 1,
    "exec": 2,
    "uid": 4,
    "gid": 0x40,
    "sid": 0x80,
    "ptrace": 0x100,
    "comm": 0x200,
    "coredump": 0x40000000,
    "exit": 0x80000000,
}


def msg(
    what: int,
    data: bytes,
    *,
    cpu: int = 1,
    ts: int = 123_456_789,
    seq: int = 7,
    ack: int = 0,
    idx: int = CN_IDX_PROC,
    nl_type: int = NLMSG_DONE,
) -> bytes:
    """One netlink message as the kernel sends it: nlmsghdr + cn_msg + proc_event (aligned)."""
    ev = struct.pack("=IIQ", what, cpu, ts) + data
    ev += b"\0" * (40 - len(ev)) if len(ev) < 40 else b""  # sizeof(struct proc_event) == 40
    cn = CN_MSG.pack(idx, CN_VAL_PROC, seq, ack, len(ev), 0) + ev
    raw = NLMSGHDR.pack(NLMSGHDR.size + len(cn), nl_type, 0, seq, 0) + cn
    return raw + b"\0" * (-len(raw) % 4)


FORK = msg(WHAT["fork"], struct.pack("=iiii", 10, 10, 11, 11))
CASES: list[tuple[str, bytes, list[ProcEvent]]] = [
    ("fork", FORK, [ProcEvent("fork", 11, 11, 10, 10, None, None, 123_456_789, None, 1, 7)]),
    (
        "thread",
        msg(WHAT["fork"], struct.pack("=iiii", 10, 10, 12, 10)),
        [ProcEvent("fork", 12, 10, 10, 10, None, None, 123_456_789, None, 1, 7)],
    ),
    (
        "exec",
        msg(WHAT["exec"], struct.pack("=ii", 11, 11)),
        [ProcEvent("exec", 11, 11, None, None, None, None, 123_456_789, None, 1, 7)],
    ),
    (
        "exit",
        msg(WHAT["exit"], struct.pack("=iiIIii", 11, 11, 9, 17, 10, 10)),
        [ProcEvent("exit", 11, 11, 10, 10, None, None, 123_456_789, 9, 1, 7)],
    ),
    (
        "uid",
        msg(WHAT["uid"], struct.pack("=iiII", 11, 11, 30001, 0)),
        [ProcEvent("uid", 11, 11, None, None, 30001, 0, 123_456_789, None, 1, 7)],
    ),
    (
        "sid",
        msg(WHAT["sid"], struct.pack("=ii", 11, 11)),
        [ProcEvent("sid", 11, 11, None, None, None, None, 123_456_789, None, 1, 7)],
    ),
    (
        "comm",
        msg(WHAT["comm"], struct.pack("=ii16s", 11, 11, b"worker\0junk")),
        [ProcEvent("comm", 11, 11, None, None, None, None, 123_456_789, None, 1, 7, "worker")],
    ),
    (
        "ack",
        msg(WHAT["ack"], struct.pack("=I", 0), cpu=0xFFFFFFFF, seq=5, ack=43),
        [ProcEvent("ack", 0, 0, None, None, None, None, 123_456_789, 0, -1, 5, None, 43)],
    ),
    ("unknown type", msg(0x400, struct.pack("=ii", 11, 11)), []),
    ("other connector", msg(WHAT["exec"], struct.pack("=ii", 11, 11), idx=2), []),
    ("netlink error", msg(WHAT["exec"], struct.pack("=ii", 11, 11), nl_type=NLMSG_ERROR), []),
    ("truncated header", FORK[:10], []),
    ("truncated event", FORK[:40], []),
    ("empty", b"", []),
    (
        "two per datagram",
        FORK + msg(WHAT["sid"], struct.pack("=ii", 11, 11), seq=8),
        [
            ProcEvent("fork", 11, 11, 10, 10, None, None, 123_456_789, None, 1, 7),
            ProcEvent("sid", 11, 11, None, None, None, None, 123_456_789, None, 1, 8),
        ],
    ),
    (
        "good then truncated",
        FORK + FORK[:50],
        [ProcEvent("fork", 11, 11, 10, 10, None, None, 123_456_789, None, 1, 7)],
    ),
]


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_messages(data: bytes, expected: list[ProcEvent]) -> None:
    assert parse_messages(data) == expected


def test_build_mcast_op_layout() -> None:
    raw = build_mcast_op(PROC_CN_MCAST_LISTEN, portid=4242, token=99)
    nl_len, nl_type, _f, _s, portid = NLMSGHDR.unpack_from(raw)
    idx, val, _seq, ack, cn_len, _fl = CN_MSG.unpack_from(raw, NLMSGHDR.size)
    op = struct.unpack_from("=I", raw, NLMSGHDR.size + CN_MSG.size)[0]
    assert (nl_len, nl_type, portid) == (len(raw), NLMSG_DONE, 4242)
    assert (idx, val, ack, cn_len, op) == (CN_IDX_PROC, CN_VAL_PROC, 99, 4, PROC_CN_MCAST_LISTEN)


# --- pure batching and sequence tracking -----------------------------------------------------


def ev(what: str, pid: int, tgid: int | None = None, ppid: int | None = None) -> ProcEvent:
    tgid = pid if tgid is None else tgid
    return ProcEvent(what, pid, tgid, ppid, ppid, None, None, 0, None)


def test_batcher_collects_processes_not_threads() -> None:
    b = EventBatcher(delay=1.0, max_batch=100)
    b.feed(
        [
            ev("fork", 11, ppid=10),
            ev("fork", 12, tgid=11),
            ev("exec", 13),
            ev("uid", 14),
            ev("sid", 15),
            ev("comm", 16),
            ev("gid", 17),
            ev("exit", 18, tgid=5),
        ],
        now=0.0,
    )
    assert b.due(0.5) is None  # not yet: debounced
    assert b.due(1.0) == ({11, 13, 14, 15}, set())
    assert b.due(5.0) is None  # the batch was handed out once


def test_batcher_exit_drops_pending_and_marks_parent() -> None:
    b = EventBatcher(delay=0.0)
    b.feed([ev("fork", 20, ppid=1), ev("exec", 20), ev("exit", 20), ev("exit", 21)], now=0.0)
    assert b.due(0.0) == (set(), {20, 21})
    # pid reuse inside one batch: the later fork wins, the exit stays (its children moved).
    b.feed([ev("exit", 30), ev("fork", 30, ppid=2)], now=1.0)
    assert b.due(1.0) == ({30}, {30})


def test_batcher_max_batch_and_delay_start_at_first_event() -> None:
    b = EventBatcher(delay=10.0, max_batch=3)
    b.feed([ev("exec", 1)], now=100.0)
    b.feed([ev("exec", 2)], now=105.0)
    assert b.time_left(106.0) == pytest.approx(4.0)
    b.feed([ev("exec", 3)], now=106.0)
    assert b.time_left(106.0) == 0.0
    assert b.due(106.0) == ({1, 2, 3}, set())
    b.feed([ev("comm", 4)], now=107.0)  # nothing to re-check: no batch started
    assert b.time_left(200.0) is None


def test_seq_tracker_gaps_per_cpu_and_wrap() -> None:
    t = SeqTracker()

    def at(cpu: int, seq: int) -> ProcEvent:
        return ProcEvent("exec", 1, 1, None, None, None, None, seq, None, cpu, seq)

    gaps = [t.gap(at(0, 5))[0], t.gap(at(1, 100))[0], t.gap(at(0, 6))[0], t.gap(at(1, 104))[0]]
    assert gaps == [0, 0, 0, 3]
    assert t.gap(at(0, 2**32 - 1))[0] == 2**32 - 1 - 6 - 1
    assert t.gap(at(0, 1))[0] == 1  # wrapped: 0 is missing
    assert t.gap(ProcEvent("ack", 0, 0, None, None, None, None, 0, 0, -1, 77)) == (0, 0)


# --- real kernel ----------------------------------------------------------------------------



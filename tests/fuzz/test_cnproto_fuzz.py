"""Proc connector datagrams: any bytes parse without an exception (what cannot be read is
skipped); events built as the kernel lays them out parse back to themselves."""

from __future__ import annotations

import struct

from hypothesis import example, given
from hypothesis import strategies as st

from pruned.linux.cnproto import (
    CN_IDX_PROC,
    CN_MSG,
    CN_VAL_PROC,
    NLMSG_DONE,
    NLMSGHDR,
    WHAT_NAMES,
    ProcEvent,
    build_mcast_op,
    parse_messages,
)
from tests.fuzz._settings import fuzz
from tests.unit.test_events import msg

WHAT = {name: code for code, name in WHAT_NAMES.items()}
i32 = st.integers(-(2**31), 2**31 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def event(draw: st.DrawFn) -> tuple[bytes, ProcEvent]:
    """One netlink message and the ProcEvent it must parse to."""
    what = draw(st.sampled_from(sorted(WHAT)))
    cpu, ts, seq, ack = draw(u32), draw(u64), draw(u32), draw(u32)
    a, b, c, d = draw(i32), draw(i32), draw(i32), draw(i32)
    ecpu = -1 if cpu == 0xFFFFFFFF else cpu
    base = {"ts_ns": ts, "cpu": ecpu, "seq": seq}
    none = {"ppid": None, "ptgid": None, "uid": None, "euid": None, "exit_code": None}
    if what == "fork":
        body, ev = (
            struct.pack("=iiii", a, b, c, d),
            {**none, "pid": c, "tgid": d, "ppid": a, "ptgid": b},
        )
    elif what in ("exec", "sid"):
        body, ev = struct.pack("=ii", a, b), {**none, "pid": a, "tgid": b}
    elif what in ("uid", "gid"):
        r, e = draw(u32), draw(u32)
        body, ev = (
            struct.pack("=iiII", a, b, r, e),
            {**none, "pid": a, "tgid": b, "uid": r, "euid": e},
        )
    elif what in ("ptrace", "coredump"):
        body, ev = (
            struct.pack("=iiii", a, b, c, d),
            {**none, "pid": a, "tgid": b, "ppid": c, "ptgid": d},
        )
    elif what == "comm":
        raw = draw(st.binary(max_size=16))
        body = struct.pack("=ii16s", a, b, raw)
        ev = {
            **none,
            "pid": a,
            "tgid": b,
            "comm": raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"),
        }
    elif what == "exit":
        code = draw(u32)
        if draw(st.booleans()):  # the layout since 4.18 (parent_pid, parent_tgid)
            body = struct.pack("=iiIIii", a, b, code, draw(u32), c, d)
            ev = {**none, "pid": a, "tgid": b, "exit_code": code, "ppid": c, "ptgid": d}
        else:  # older kernels: the message ends after exit_signal
            body = struct.pack("=iiII", a, b, code, draw(u32))
            ev = {**none, "pid": a, "tgid": b, "exit_code": code}
    else:  # ack
        err = draw(u32)
        body, ev = (
            struct.pack("=I", err),
            {**none, "pid": 0, "tgid": 0, "exit_code": err, "ack": ack},
        )
    if what == "exit" and len(body) == 16:
        # no padding to sizeof(struct proc_event): the old exit event is 16 bytes of data
        data = struct.pack("=IIQ", WHAT[what], cpu, ts) + body
        cn = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, seq, ack, len(data), 0) + data
        raw_msg = NLMSGHDR.pack(NLMSGHDR.size + len(cn), NLMSG_DONE, 0, seq, 0) + cn
        raw_msg += b"\0" * (-len(raw_msg) % 4)
    else:
        raw_msg = msg(WHAT[what], body, cpu=cpu, ts=ts, seq=seq, ack=ack)
    return raw_msg, ProcEvent(what=what, **base, **ev)


@fuzz(3)
@given(st.lists(event(), max_size=6))
def test_events_round_trip(events: list[tuple[bytes, ProcEvent]]) -> None:
    assert parse_messages(b"".join(m for m, _ in events)) == [e for _, e in events]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(b"".join(m for m, _ in draw(st.lists(event(), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(data) - 1)) if data else 0
        op = draw(st.sampled_from(["byte", "cut", "u32", "insert"]))
        if op == "byte" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            data = data[:i]
        elif op == "u32" and len(data) >= i + 4:
            data[i : i + 4] = struct.pack(
                "=I", draw(st.sampled_from([0, 1, 15, 16, 17, 2**31, 2**32 - 1]))
            )
        else:
            data[i:i] = draw(st.binary(max_size=8))
    return bytes(data)


@fuzz(3)
@given(st.binary(max_size=400) | mutated())
@example(NLMSGHDR.pack(16, NLMSG_DONE, 0, 0, 0))  # a header and nothing else
@example(NLMSGHDR.pack(0xFFFFFFFF, NLMSG_DONE, 0, 0, 0) + b"\0" * 64)
def test_any_datagram_parses(data: bytes) -> None:
    for ev in parse_messages(data):
        assert ev.what in WHAT
    assert parse_messages(memoryview(data)) == parse_messages(data)


@fuzz()
@given(st.sampled_from([1, 2]), u32, u32)
def test_build_mcast_op_round_trip(op: int, portid: int, token: int) -> None:
    raw = build_mcast_op(op, portid, token)
    nl_len, nl_type, _flags, nl_seq, nl_pid = NLMSGHDR.unpack_from(raw)
    idx, val, seq, ack, cn_len, _fl = CN_MSG.unpack_from(raw, NLMSGHDR.size)
    (got_op,) = struct.unpack_from("=I", raw, NLMSGHDR.size + CN_MSG.size)
    assert (nl_len, nl_type, nl_seq, nl_pid) == (len(raw), NLMSG_DONE, token, portid)
    assert (idx, val, seq, ack, cn_len, got_op) == (CN_IDX_PROC, CN_VAL_PROC, token, token, 4, op)
    assert parse_messages(raw) == []  # a request, not an event: skipped, not misread

"""The proc connector's wire format: netlink/cn_msg/proc_event structs, parse and build. PURE.

Layouts from linux/netlink.h, linux/connector.h and linux/cn_proc.h; pruned.linux.connector
owns the socket. Every parser takes untrusted bytes and never raises on short or odd input:
what cannot be parsed is skipped.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4

# struct nlmsghdr { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }
NLMSGHDR = struct.Struct("=IHHII")
# struct cn_msg { struct cb_id { u32 idx; u32 val; } id; u32 seq; u32 ack; u16 len; u16 flags; }
CN_MSG = struct.Struct("=IIIIHH")
# struct proc_event header: u32 what; u32 cpu; u64 timestamp_ns (aligned(8), so no padding)
PROC_EVENT_HDR = struct.Struct("=IIQ")
PID_PAIR = struct.Struct("=ii")
PID_QUAD = struct.Struct("=iiii")
ID_EVENT = struct.Struct("=iiII")
COMM_EVENT = struct.Struct("=ii16s")
EXIT_EVENT = struct.Struct("=iiIIii")
EXIT_EVENT_OLD = struct.Struct("=iiII")  # before parent_pid/parent_tgid were added (kernel < 4.18)

# proc_event.what -> name; values from enum what in linux/cn_proc.h.
WHAT_NAMES: dict[int, str] = {
    0x00000000: "ack",  # PROC_EVENT_NONE: the reply to LISTEN/IGNORE, event_data.ack.err
    0x00000001: "fork",
    0x00000002: "exec",
    0x00000004: "uid",
    0x00000040: "gid",
    0x00000080: "sid",
    0x00000100: "ptrace",
    0x00000200: "comm",
    0x40000000: "coredump",
    0x80000000: "exit",
}

SEQ_MOD = 1 << 32


class ProcEvent(NamedTuple):
    """One proc connector event; fields a kind does not carry are None.

    pid/tgid: thread id / process id of the subject (the child for fork).
    ppid/ptgid: parent for fork, exit and coredump; the tracer for ptrace.
    uid/euid: real/effective uid for "uid"; real/effective gid for "gid".
    exit_code: wait status for "exit"; the errno of the request for "ack".
    ts_ns: CLOCK_MONOTONIC nanoseconds (time.monotonic_ns()) when the kernel sent it.
    cpu/seq: the CPU and its per-CPU sequence number, for loss detection (cpu -1: no sequence,
    as for acks before kernel 6.6). ack: cn_msg.ack; an "ack" answers the request whose ack was
    `ack - 1`.
    """

    what: str
    pid: int
    tgid: int
    ppid: int | None
    ptgid: int | None
    uid: int | None
    euid: int | None
    ts_ns: int
    exit_code: int | None
    cpu: int = -1
    seq: int = 0
    comm: str | None = None
    ack: int = 0


def _event(
    what: str, cpu: int, ts: int, seq: int, ack: int, body: bytes | memoryview
) -> ProcEvent | None:
    """Decode the event_data union of one proc_event; None when too short for its kind."""
    n = len(body)
    if what == "fork" and n >= PID_QUAD.size:
        ppid, ptgid, pid, tgid = PID_QUAD.unpack_from(body)
        return ProcEvent(what, pid, tgid, ppid, ptgid, None, None, ts, None, cpu, seq)
    if what in ("exec", "sid") and n >= PID_PAIR.size:
        pid, tgid = PID_PAIR.unpack_from(body)
        return ProcEvent(what, pid, tgid, None, None, None, None, ts, None, cpu, seq)
    if what in ("uid", "gid") and n >= ID_EVENT.size:
        pid, tgid, rid, eid = ID_EVENT.unpack_from(body)
        return ProcEvent(what, pid, tgid, None, None, rid, eid, ts, None, cpu, seq)
    if what in ("ptrace", "coredump") and n >= PID_QUAD.size:
        pid, tgid, ppid, ptgid = PID_QUAD.unpack_from(body)
        return ProcEvent(what, pid, tgid, ppid, ptgid, None, None, ts, None, cpu, seq)
    if what == "comm" and n >= COMM_EVENT.size:
        pid, tgid, raw = COMM_EVENT.unpack_from(body)
        comm = bytes(raw).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")  # lossless
        return ProcEvent(what, pid, tgid, None, None, None, None, ts, None, cpu, seq, comm)
    if what == "exit" and n >= EXIT_EVENT.size:
        pid, tgid, code, _sig, ppid, ptgid = EXIT_EVENT.unpack_from(body)
        return ProcEvent(what, pid, tgid, ppid, ptgid, None, None, ts, code, cpu, seq)
    if what == "exit" and n >= EXIT_EVENT_OLD.size:
        pid, tgid, code, _sig = EXIT_EVENT_OLD.unpack_from(body)
        return ProcEvent(what, pid, tgid, None, None, None, None, ts, code, cpu, seq)
    if what == "ack" and n >= 4:
        (err,) = struct.unpack_from("=I", body)
        return ProcEvent(what, 0, 0, None, None, None, None, ts, err, cpu, seq, None, ack)
    return None


def parse_messages(data: bytes | memoryview) -> list[ProcEvent]:
    """Decode the proc connector events in one netlink datagram; skip others and truncated ones."""
    out: list[ProcEvent] = []
    view = memoryview(data)
    off = 0
    while off + NLMSGHDR.size <= len(view):
        nl_len, nl_type, _flags, _seq, _pid = NLMSGHDR.unpack_from(view, off)
        if nl_len < NLMSGHDR.size or off + nl_len > len(view):
            break  # truncated or corrupt: nothing after it can be trusted
        payload = view[off + NLMSGHDR.size : off + nl_len]
        off += (nl_len + 3) & ~3  # NLMSG_ALIGN
        # The connector sends its data as NLMSG_DONE (a one-part multi-part message); skip
        # netlink control messages (NOOP, ERROR, OVERRUN).
        if nl_type in (NLMSG_NOOP, NLMSG_ERROR, NLMSG_OVERRUN) or len(payload) < CN_MSG.size:
            continue
        idx, val, cn_seq, cn_ack, cn_len, _cn_flags = CN_MSG.unpack_from(payload)
        body = payload[CN_MSG.size : CN_MSG.size + cn_len]
        if (idx, val) != (CN_IDX_PROC, CN_VAL_PROC) or len(body) < cn_len:
            continue
        if len(body) < PROC_EVENT_HDR.size:
            continue
        what_raw, cpu, ts = PROC_EVENT_HDR.unpack_from(body)
        what = WHAT_NAMES.get(what_raw)
        if what is None:
            continue  # a newer kernel's event kind: not ours to interpret
        if cpu == 0xFFFFFFFF:
            cpu = -1
        ev = _event(what, cpu, ts, cn_seq, cn_ack, body[PROC_EVENT_HDR.size :])
        if ev is not None:
            out.append(ev)
    return out


def build_mcast_op(op: int, portid: int, token: int) -> bytes:
    """The datagram asking the proc connector to start (1) or stop (2) sending events.

    The kernel's ack carries cn_msg.ack = token + 1 (its seq is rewritten since kernel 6.6).
    """
    data = struct.pack("=I", op)
    cn = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, token, token, len(data), 0) + data
    return NLMSGHDR.pack(NLMSGHDR.size + len(cn), NLMSG_DONE, 0, token, portid) + cn


class SeqTracker:
    """Per-CPU sequence bookkeeping: how many events went missing between the ones we saw."""

    def __init__(self) -> None:
        self.last: dict[int, tuple[int, int]] = {}  # cpu -> (seq, ts_ns) of the last event seen

    def gap(self, ev: ProcEvent) -> tuple[int, int]:
        """(events missing on ev.cpu just before ev, ts_ns of the event seen before them)."""
        if ev.cpu < 0:
            return 0, 0
        prev = self.last.get(ev.cpu)
        self.last[ev.cpu] = (ev.seq, ev.ts_ns)
        if prev is None:
            return 0, 0
        return (ev.seq - prev[0] - 1) % SEQ_MOD, prev[1]

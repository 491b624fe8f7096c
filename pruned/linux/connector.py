"""Event-driven detection: the kernel's netlink proc connector (fork/exec/uid/sid/exit events).

Layers: the wire format is pruned.linux.cnproto (pure); `EventBatcher` is pure;
`ProcConnector` owns the socket;
`EventWatcher` is the thread the daemon runs. Nothing here reads /proc per event, so a fork
storm costs one recv + one struct unpack per event and cannot make the listener fall behind
on /proc I/O. The events only say *which* pids to look at; the caller re-reads /proc for them.

Kernel facts relied on (linux/cn_proc.h, linux/connector.h, drivers/connector/cn_proc.c):
- Binding to the CN_IDX_PROC multicast group needs CAP_NET_ADMIN (EPERM otherwise).
- The connector exists only in the initial network namespace (EPROTONOSUPPORT elsewhere), and
  the kernel silently ignores LISTEN requests from outside the initial pid/user namespace (no
  ack), so a missing ack within `ACK_TIMEOUT` means "in a container".
- Each event carries a per-CPU sequence number (cn_msg.seq) and the CPU (proc_event.cpu); a gap
  in that sequence is a lost event even when the kernel dropped it without ENOBUFS.
- There is no reparent event: when a parent exits, its children's stat already shows the new
  parent, so an exit means "re-check the children of this pid".
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable

from pruned import log
from pruned.linux.cnproto import (
    CN_IDX_PROC,
    NETLINK_CONNECTOR,
    PROC_CN_MCAST_IGNORE,
    PROC_CN_MCAST_LISTEN,
    SEQ_MOD,
    ProcEvent,
    SeqTracker,
    build_mcast_op,
    parse_messages,
)

SO_RCVBUFFORCE = 33  # not exported by the socket module
ACK_TIMEOUT = 1.0  # seconds to wait for the kernel's reply to LISTEN


class ConnectorUnavailable(Exception):
    """The proc connector cannot be used here; str() is a one-line reason."""


class EventsLost(Exception):
    """Events were lost (receive buffer overflow or a sequence gap): resync with a full sweep.

    `events` holds what was read in the same call (already covered by the resync);
    `lost` is how many events are known lost so far (a lower bound right after ENOBUFS).
    """

    def __init__(self, reason: str, lost: int, events: list[ProcEvent]) -> None:
        super().__init__(reason)
        self.lost = lost
        self.events = events


def _unavailable(where: str, err: OSError) -> ConnectorUnavailable:
    """A one-line reason for an OSError met while opening the connector."""
    code = err.errno
    if code == errno.EPERM or code == errno.EACCES:
        why = "needs CAP_NET_ADMIN (run as root with that capability)"
    elif code == errno.EPROTONOSUPPORT:
        why = (
            "kernel has no netlink proc connector here (CONFIG_PROC_EVENTS off, "
            "or not in the initial network namespace)"
        )
    elif code == errno.ECONNREFUSED:
        why = "not in the initial network namespace (the connector exists only there)"
    elif code == errno.EAFNOSUPPORT:
        why = "netlink sockets not supported"
    else:
        why = os.strerror(code) if code else str(err)
    return ConnectorUnavailable(f"proc connector unavailable: {where}: {why}")


class ProcConnector:
    """A netlink socket subscribed to the kernel's process events.

    Open it *before* the first full sweep, so no process falls between the two. Needs
    CAP_NET_ADMIN for the forced receive buffer (and, before kernel 6.6, to listen at all);
    raises ConnectorUnavailable with a one-line reason. Attributes: `rcvbuf` (effective bytes,
    the kernel doubles what was asked), `forced` (SO_RCVBUFFORCE worked), `portid`,
    `events_read`, `lost_total` (events known lost, counted from sequence gaps).
    """

    def __init__(self, rcvbuf: int = 16 << 20, ack_timeout: float = ACK_TIMEOUT) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError as e:
            raise _unavailable("socket(AF_NETLINK, NETLINK_CONNECTOR)", e) from None
        self._seq = SeqTracker()
        self._backlog: list[ProcEvent] = []  # events read while waiting for the LISTEN ack
        self._buf = bytearray(65536)
        self._listening = False
        self.events_read = 0
        self.lost_total = 0
        self._congested = False  # ENOBUFS seen and the queue not yet drained since
        self._congestion_end_ns = 0  # monotonic ns when the last reported congestion ended
        try:
            self._setup(rcvbuf, ack_timeout)
        except BaseException:
            self.sock.close()
            raise

    def _setup(self, rcvbuf: int, ack_timeout: float) -> None:
        try:
            self.sock.bind((0, CN_IDX_PROC))  # port id 0: the kernel picks a unique one
        except OSError as e:
            raise _unavailable("bind to the CN_IDX_PROC group", e) from None
        # The default ~208 KiB holds ~256 events; a fork storm overflows it. Without
        # CAP_NET_ADMIN (kernel >= 6.6 lets anyone listen) SO_RCVBUF is capped at rmem_max.
        self.forced = True
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:
            self.forced = False
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.portid = self.sock.getsockname()[0]
        self.sock.setblocking(False)
        self._listen(ack_timeout)

    def _listen(self, timeout: float) -> None:
        """Send LISTEN and wait for the kernel's ack (keeping any events that come first).

        The kernel acks synchronously from our send(), so the ack is queued at once; only
        an overflow of our queue (then we ask again: LISTEN is idempotent) or a namespace
        the connector ignores (no ack at all) can keep it from us.
        """
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        for _attempt in range(3):
            token = int.from_bytes(os.urandom(3), "little")
            try:
                self.sock.send(build_mcast_op(PROC_CN_MCAST_LISTEN, self.portid, token))
            except OSError as e:
                raise _unavailable("send PROC_CN_MCAST_LISTEN", e) from None
            self._listening = True
            while (left := deadline - time.monotonic()) > 0:
                poller.poll(max(1, int(left * 1000)))
                overflowed = False
                try:
                    events = self._recv_all(1024)
                except EventsLost as e:
                    events = e.events  # the caller's first full sweep covers these anyway
                    overflowed = True
                for ev in events:
                    if ev.what == "ack" and ev.ack == (token + 1) % SEQ_MOD:
                        if ev.exit_code:
                            raise ConnectorUnavailable(
                                f"proc connector unavailable: LISTEN refused: "
                                f"{os.strerror(ev.exit_code)}"
                            )
                        return
                    self._backlog.append(ev)
                if overflowed:
                    break  # our queue overflowed: the ack may be what was dropped
            else:
                break
        raise ConnectorUnavailable(
            "proc connector unavailable: the kernel did not answer PROC_CN_MCAST_LISTEN "
            "(not in the initial pid/user namespace, e.g. in a container?)"
        )

    def fileno(self) -> int:
        """The socket's fd, for poll()/select()."""
        return self.sock.fileno()

    def _recv_all(self, max_msgs: int) -> list[ProcEvent]:
        """Read up to max_msgs datagrams without blocking; raise EventsLost on overflow or gap.

        The kernel drops events only while our queue is full, says ENOBUFS once per such
        congestion, and ends it when we empty the queue. A sequence gap that began before the
        end of a congestion already reported is that congestion's count (covered by the resync
        it caused); any other gap is a new loss.
        """
        out: list[ProcEvent] = []
        report = False
        lost_here = 0
        recv_into = self.sock.recv_into
        buf = self._buf
        view = memoryview(buf)
        for _ in range(max_msgs):
            try:
                n = recv_into(buf)
            except BlockingIOError:
                if self._congested:  # queue empty: the kernel stops dropping for us
                    self._congested = False
                    self._congestion_end_ns = time.monotonic_ns()
                    report = True  # report after the end, so the resync covers every drop
                break
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self._congested = report = True
                continue
            for ev in parse_messages(view[:n]):
                gap, prev_ts = self._seq.gap(ev)
                if gap:
                    if prev_ts <= self._congestion_end_ns:
                        self.lost_total += gap
                    else:
                        lost_here += gap
                out.append(ev)
        self.events_read += len(out)
        if report or lost_here:
            self.lost_total += lost_here
            count = f"at least {lost_here}" if lost_here else "an unknown number of"
            if report:
                reason = f"netlink receive buffer overflowed (ENOBUFS): {count} events lost"
            else:
                reason = f"proc connector sequence gap: {lost_here} events lost"
            raise EventsLost(reason, lost_here, out)
        return out

    def read_events(self, max_msgs: int = 4096) -> list[ProcEvent]:
        """Everything queued now (up to max_msgs datagrams), without blocking.

        Raises EventsLost when events were dropped; the caller must then resync with a full
        sweep that starts after this call returned.
        """
        backlog, self._backlog = self._backlog, []
        try:
            return backlog + self._recv_all(max_msgs)
        except EventsLost as e:
            e.events = backlog + e.events
            raise

    def close(self) -> None:
        """Tell the kernel we stop listening (so it can stop making events) and close."""
        if self.sock.fileno() < 0:
            return
        if self._listening:
            # Closing the socket also drops our listener count (kernel >= 6.6), so a failed
            # IGNORE is harmless there.
            with contextlib.suppress(OSError):
                self.sock.send(build_mcast_op(PROC_CN_MCAST_IGNORE, self.portid, 0))
            self._listening = False
        self.sock.close()

    def __enter__(self) -> ProcConnector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBatcher:
    """Collect the pids that need re-classifying from a stream of events; no I/O.

    fork -> the child process (thread creation is ignored); exec/uid/sid -> that process;
    exit of a process -> dropped from pending and remembered in `exited` (its children
    were reparented without an event, so the caller re-checks them). `parents`: child ->
    the process that forked it, for each fork of the batch (the only record of a parent
    that exits before its child is read); `due` hands the batch's out as `batch_parents`.
    """

    def __init__(self, delay: float = 0.02, max_batch: int = 5000) -> None:
        self.delay = delay
        self.max_batch = max_batch
        self.pending: set[int] = set()
        self.exited: set[int] = set()
        self.parents: dict[int, int] = {}
        self.batch_parents: dict[int, int] = {}  # the parents of the batch `due` last gave
        self.first_at: float | None = None  # time of the first event of the pending batch

    def feed(self, events: Iterable[ProcEvent], now: float) -> None:
        """Account events (in kernel order) received at monotonic time `now`."""
        pending, exited = self.pending, self.exited
        before = len(pending) + len(exited)
        for ev in events:
            what = ev.what
            if what == "fork":
                if ev.pid == ev.tgid:  # a new process, not a thread
                    pending.add(ev.tgid)
                    if ev.ptgid:
                        self.parents[ev.tgid] = ev.ptgid
            elif what in ("exec", "uid", "sid"):
                pending.add(ev.tgid)
            elif what == "exit" and ev.pid == ev.tgid:
                # A thread's exit changes nothing; the process is gone when its leader exits.
                pending.discard(ev.tgid)
                exited.add(ev.tgid)
        if self.first_at is None and len(pending) + len(exited) > before:
            self.first_at = now

    def time_left(self, now: float) -> float | None:
        """Seconds until the pending batch is due (0 if due now), None when nothing is pending."""
        if self.first_at is None:
            return None
        if len(self.pending) + len(self.exited) >= self.max_batch:
            return 0.0
        return max(0.0, self.first_at + self.delay - now)

    def due(self, now: float) -> tuple[set[int], set[int]] | None:
        """(pids to re-classify, pids that exited) once the batch is due, else None; resets it."""
        left = self.time_left(now)
        if left is None or left > 0:
            return None
        batch = (self.pending, self.exited)
        parents = self.parents
        self.clear()
        self.batch_parents = parents
        return batch

    def clear(self) -> None:
        """Forget everything pending (a full resync supersedes it)."""
        self.pending = set()
        self.exited = set()
        self.parents = {}
        self.first_at = None


class EventWatcher:
    """A daemon thread turning proc events into debounced `on_pids(changed, exited)` calls.

    Callbacks run in the watcher thread. `on_lost(reason)` is called at once when events were
    lost; the caller must then resync with a full sweep (everything read before the call is
    covered by it, so pending pids are dropped). Never does /proc I/O itself. With
    `parents`, on_pids gets a third argument: child -> forking parent for the batch's forks.
    """

    def __init__(
        self,
        on_pids: Callable[..., None],  # (changed, exited[, parents])
        on_lost: Callable[[str], None],
        delay: float = 0.02,
        max_batch: int = 5000,
        connector: ProcConnector | None = None,
        parents: bool = False,
    ) -> None:
        self.on_pids = on_pids
        self.parents = parents
        self.on_lost = on_lost
        self.batcher = EventBatcher(delay, max_batch)
        self.connector = connector if connector is not None else ProcConnector()
        self._owns_connector = connector is None
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.lost_reports = 0

    def start(self) -> EventWatcher:
        """Start the listener thread; returns self."""
        self._thread = threading.Thread(target=self._run, name="pruned-events", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.connector.fileno(), select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        batcher = self.batcher
        while not self._stop.is_set():
            left = batcher.time_left(time.monotonic())
            # Nothing pending: sleep until an event or stop() (no periodic wake-ups when idle).
            poller.poll(-1 if left is None else max(0, int(left * 1000 + 0.999)))
            if self._stop.is_set():
                break
            try:
                events = self.connector.read_events()
            except EventsLost as e:
                batcher.clear()
                self.lost_reports += 1
                self._call(self.on_lost, str(e))
                continue
            except OSError as e:
                # The socket broke (should not happen): say so and treat it as a loss.
                log.error(f"proc connector read failed: {e}")
                batcher.clear()
                self._call(self.on_lost, f"proc connector read failed: {e}")
                self._stop.wait(1.0)
                continue
            now = time.monotonic()
            if events:
                batcher.feed(events, now)
            batch = batcher.due(now)
            if batch is not None:
                self.batches += 1
                if self.parents:
                    self._call(self.on_pids, *batch, batcher.batch_parents)
                else:
                    self._call(self.on_pids, *batch)

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        """Run a callback; one failing call must not stop the watcher."""
        try:
            fn(*args)
        except Exception as e:
            name = getattr(fn, "__name__", fn)
            log.error(f"event callback {name} failed: {type(e).__name__}: {e}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, join it and close the connector if this watcher opened it."""
        self._stop.set()
        os.eventfd_write(self._wake_fd, 1)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._owns_connector:
            self.connector.close()
        os.close(self._wake_fd)

    def __enter__(self) -> EventWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def probe() -> str | None:
    """None if the proc connector works here, else the one-line reason it does not."""
    try:
        ProcConnector(rcvbuf=1 << 16).close()
    except ConnectorUnavailable as e:
        return str(e)
    except OSError as e:
        return f"proc connector unavailable: {e}"
    return None

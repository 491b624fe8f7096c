"""The netlink proc connector listener: parsing, batching, and real kernel events.

Real-event tests start processes only as fixture users and clean up by PID; no test asserts a
tight time (deadlines are generous and only bound a wait).
"""

from __future__ import annotations

import contextlib
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from pruned.linux.cnproto import ProcEvent
from pruned.linux.connector import (
    SO_RCVBUFFORCE,
    EventBatcher,
    EventsLost,
    EventWatcher,
    ProcConnector,
    probe,
)
from tests.fixtures.paths import REPO
from tests.fixtures.users import User, UserFactory, alive, daemon_as, run_as, wait_for_pid


def wait_until(cond: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll cond until true or a generous deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


class Collector:
    """EventWatcher callbacks that accumulate everything they are given."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed: set[int] = set()
        self.exited: set[int] = set()
        self.lost: list[str] = []
        self.calls = 0

    def on_pids(self, changed: set[int], exited: set[int]) -> None:
        with self.lock:
            self.changed |= changed
            self.exited |= exited
            self.calls += 1

    def on_lost(self, reason: str) -> None:
        with self.lock:
            self.lost.append(reason)


class Recording(ProcConnector):
    """A ProcConnector that also keeps every event it returned (for assertions)."""

    def __init__(self, **kw: int) -> None:
        self.seen: list[ProcEvent] = []
        super().__init__(**kw)

    def read_events(self, max_msgs: int = 4096) -> list[ProcEvent]:
        try:
            events = super().read_events(max_msgs)
        except EventsLost as e:
            self.seen.extend(e.events)
            raise
        self.seen.extend(events)
        return events


@pytest.fixture
def user(make_user: UserFactory) -> User:
    return make_user("prev")


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.root
def test_connector_opens_with_forced_buffer() -> None:
    with ProcConnector() as conn:
        assert conn.forced
        assert conn.rcvbuf >= 16 << 20  # the kernel doubles the value it was given
        assert conn.fileno() >= 0
    assert probe() is None


@pytest.mark.root
def test_double_forked_daemon_is_reported(user: User) -> None:
    conn = Recording()
    got = Collector()
    with EventWatcher(got.on_pids, got.on_lost, delay=0.02, connector=conn):
        pid = daemon_as(user, f"evd{os.getpid()}")
        try:
            assert wait_until(lambda: pid in got.changed), "daemon pid never reported"
            forks = [e for e in list(conn.seen) if e.what == "fork" and e.tgid == pid]
            assert len(forks) == 1 and forks[0].pid == pid
            parent = forks[0].ptgid
            assert any(e.what == "exec" and e.tgid == pid for e in list(conn.seen))
            # `setsid -f`'s parent exits right after the fork: the caller re-checks its children.
            assert wait_until(lambda: parent in got.exited), "exited parent not reported"
            assert pid not in got.exited
        finally:
            kill_pid(pid)
        assert wait_until(lambda: pid in got.exited), "killed daemon not reported as exited"
    conn.close()
    assert got.lost == []


@pytest.mark.root
def test_watcher_stop_joins_and_closes() -> None:
    got = Collector()
    w = EventWatcher(got.on_pids, got.on_lost).start()
    thread = w._thread
    assert thread is not None and thread.is_alive()
    t0 = time.monotonic()
    w.stop()
    assert not thread.is_alive()
    assert time.monotonic() - t0 < 5.0
    assert w.connector.sock.fileno() == -1


@pytest.mark.root
def test_watcher_survives_a_failing_callback(user: User) -> None:
    got = Collector()
    failures: list[int] = []

    def flaky(changed: set[int], exited: set[int]) -> None:
        if not failures:
            failures.append(1)
            raise RuntimeError("callback bug")
        got.on_pids(changed, exited)

    with EventWatcher(flaky, got.on_lost, delay=0.0) as w:
        run_as(user, ["/bin/true"]).wait()
        assert wait_until(lambda: bool(failures))
        proc = run_as(user, ["/bin/true"])
        proc.wait()
        assert wait_until(lambda: proc.pid in got.exited), "watcher stopped after a failure"
        assert w._thread is not None and w._thread.is_alive()


@pytest.mark.root
def test_overflow_raises_events_lost_then_recovers(user: User) -> None:
    """A tiny buffer not drained while processes run: ENOBUFS -> EventsLost, then events flow."""
    conn = ProcConnector(rcvbuf=4096)
    try:
        run_as(user, ["bash", "-c", "for i in $(seq 300); do /bin/true; done"]).wait()
        with pytest.raises(EventsLost) as info:
            for _ in range(100):
                conn.read_events()
        assert "ENOBUFS" in str(info.value)
        # Later reads work; the gap that follows the overflow is counted, not reported again.
        # (A bigger buffer now, so the next few events cannot overflow it anew.)
        conn.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 20)
        run_as(user, ["/bin/true"]).wait()
        deadline = time.monotonic() + 10
        events: list[ProcEvent] = []
        while time.monotonic() < deadline and not any(e.what == "exit" for e in events):
            select.select([conn], [], [], 0.2)
            events += conn.read_events()
        assert any(e.what == "fork" for e in events)
        assert conn.lost_total >= info.value.lost
    finally:
        conn.close()


@pytest.mark.root
def test_watcher_reports_overflow(user: User) -> None:
    got = Collector()
    conn = ProcConnector(rcvbuf=4096)
    # Hold the watcher's thread inside a callback so the socket overflows meanwhile.
    gate = threading.Event()

    def slow_on_pids(changed: set[int], exited: set[int]) -> None:
        gate.wait(20)
        got.on_pids(changed, exited)

    with EventWatcher(slow_on_pids, got.on_lost, delay=0.0, connector=conn):
        run_as(user, ["/bin/true"]).wait()
        time.sleep(0.2)  # the watcher is now blocked in slow_on_pids
        run_as(user, ["bash", "-c", "for i in $(seq 300); do /bin/true; done"]).wait()
        gate.set()
        assert wait_until(lambda: bool(got.lost)), "overflow never reported"
    conn.close()
    assert got.lost[0].startswith("netlink receive buffer overflowed (ENOBUFS): ")
    assert got.lost[0].endswith(" events lost")


BURST = 20_000
FORKER = r"""
import os, sys
n, token = int(sys.argv[1]), sys.argv[2]
for i in range(n):
    if os.fork() == 0:
        os._exit(0)
    if i % 64 == 63:  # reap as we go: PID 1 here reaps lazily and pid_max is 32768
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
# A stray planted at the end of the burst: double fork, new session, then exec.
mid = os.fork()
if mid == 0:
    if os.fork() == 0:
        os.setsid()
        os.execv("/bin/sleep", [token, "600"])
    os._exit(0)
os.waitpid(mid, 0)
try:
    while True:
        os.wait()
except ChildProcessError:
    pass
"""


@pytest.mark.root
def test_fork_burst_is_seen_whole_or_reported_lost(user: User) -> None:
    conn = Recording()
    batcher = EventBatcher(delay=0.0, max_batch=10**9)
    changed: set[int] = set()
    lost: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        while not stop.is_set():
            poller.poll(100)
            try:
                batcher.feed(conn.read_events(), time.monotonic())
            except EventsLost as e:
                lost.append(str(e))
                batcher.clear()
            batch = batcher.due(time.monotonic())
            if batch:
                changed.update(batch[0])

    token = f"evburst{os.getpid()}"
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    stray = None
    try:
        forker = run_as(user, ["/usr/bin/python3", "-S", "-c", FORKER, str(BURST), token])
        assert forker.wait(timeout=300) == 0
        stray = wait_for_pid(user.uid, token)  # what a resync's /proc scan would find
        assert alive(stray)
        if not lost:
            assert wait_until(lambda: stray in changed), "planted stray not in any batch"
    finally:
        stop.set()
        thread.join(10)
        conn.close()
        if stray is not None:
            kill_pid(stray)
    forks = sum(
        1 for e in conn.seen if e.what == "fork" and e.ptgid == forker.pid and e.pid == e.tgid
    )
    print(f"burst: {forks} fork events of {BURST + 1}, {len(conn.seen)} events, lost: {lost}")
    if lost:
        assert all("events lost" in r for r in lost)
        assert conn.lost_total > 0 or any("ENOBUFS" in r for r in lost)
    else:
        assert forks == BURST + 1  # the burst plus the stray's intermediate parent
        assert conn.lost_total == 0


def run_probe(prefix: list[str]) -> str:
    """probe() and the connector's buffer, as seen by a python started under `prefix`."""
    code = (
        "from pruned.linux.connector import probe, ProcConnector\n"
        "r = probe()\n"
        "if r: print('UNAVAILABLE', r)\n"
        "else:\n"
        "    c = ProcConnector(); print('OK', c.forced, c.rcvbuf); c.close()\n"
    )
    r = subprocess.run(
        [*prefix, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r.stdout.strip()


def kernel_at_least(major: int, minor: int) -> bool:
    parts = platform.release().split(".")
    return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)


@pytest.mark.root
def test_without_cap_net_admin(user: User) -> None:
    """Kernel >= 6.6 lets anyone listen (no forced buffer); older kernels need CAP_NET_ADMIN."""
    out = run_probe(
        [
            "setpriv",
            f"--reuid={user.uid}",
            f"--regid={user.gid}",
            "--init-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ]
    )
    if kernel_at_least(6, 6):
        status, forced, rcvbuf = out.split()
        with open("/proc/sys/net/core/rmem_max") as f:
            rmem_max = int(f.read())
        assert (status, forced) == ("OK", "False")
        assert int(rcvbuf) <= 2 * rmem_max
    else:
        assert out.startswith("UNAVAILABLE proc connector unavailable: ")
        assert "CAP_NET_ADMIN" in out


@pytest.mark.root
def test_unavailable_in_new_network_namespace() -> None:
    out = run_probe(["unshare", "--net"])
    assert out.startswith("UNAVAILABLE proc connector unavailable: ")
    assert "network namespace" in out


@pytest.mark.root
def test_unavailable_in_new_pid_namespace() -> None:
    out = run_probe(["unshare", "--pid", "--fork", "--mount-proc"])
    assert out.startswith("UNAVAILABLE proc connector unavailable: ")
    assert "namespace" in out

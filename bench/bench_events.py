"""Benchmark the proc connector path: stray detection latency vs a 1 s /proc poll, and its cost.

    sudo .venv/bin/python bench/bench_events.py [--strays 200] [--window 60] [--many 20000]

Latency: a test user double-forks ~200 strays (fork, fork, setsid, exec sleep) one every
50 ms; for each we take the first EventWatcher callback whose pid set holds the stray, minus
(a) the kernel timestamp of the stray's fork event and (b) the spawner's clock read just
before its first fork. The baseline, measured in the same run by a separate process, walks
/proc fully every second (listdir + read every stat); its latency is the end of the first
walk that saw the stray minus (b). Both idle and under a fork storm (another test user
forking continuously). Cost: a separate listener process (EventWatcher, no-op callbacks)
measured with getrusage over a window, with ~1,000 and ~20,000 processes existing, and
during a fork storm. Creates 2 throw-away users (random names) and removes them at the end;
every process it kills is one it started, by pid, after checking its uid.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import resource
import secrets
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import _users  # noqa: E402
from _users import User, as_user  # noqa: E402

from pruned.linux.connector import EventWatcher, ProcConnector, ProcEvent, probe  # noqa: E402

UID_LOW, UID_HIGH = 50000, 54999  # away from the fixtures' 30000-39999 and bench_snapshot's
EX_NOPERM, EX_UNAVAILABLE = 77, 69
PY = "/usr/bin/python3"

SPAWNER = r"""
import os, sys, time
n, interval, token = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
for _ in range(n):
    r, w = os.pipe()
    t0 = time.monotonic_ns()
    mid = os.fork()
    if mid == 0:
        os.close(r)
        g = os.fork()
        if g == 0:
            os.close(w)
            os.setsid()
            null = os.open("/dev/null", os.O_RDWR)
            os.dup2(null, 1)  # do not hold the bench's pipe open: it waits for EOF
            os.execv("/bin/sleep", [token, "600"])
        os.write(w, str(g).encode())
        os._exit(0)
    os.close(w)
    g = int(os.read(r, 32))
    os.close(r)
    os.waitpid(mid, 0)
    print(g, t0, flush=True)
    time.sleep(interval)
"""

# Forks until SIGTERM, reaping as it goes (PID 1 here reaps lazily), then reaps the rest.
STORM = r"""
import os, signal
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
i = 0
while not stop:
    try:
        if os.fork() == 0:
            os._exit(0)
    except OSError:
        pass
    i += 1
    if i % 64 == 0:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
try:
    while True:
        os.wait()
except ChildProcessError:
    pass
"""


def make_user(made: list[User]) -> User:
    """A throw-away user with a random name and a free uid in this bench's range."""
    return _users.make_user(made, "prbe", UID_LOW, UID_HIGH)


# ---------------------------------------------------------------- helper processes (modes)


def poll_mode(interval: float) -> int:
    """Full /proc walk every interval until stdin EOF; print {pid: first walk end ns} as JSON."""
    seen: dict[int, int] = {}
    known: dict[int, bytes] = {}  # pid -> starttime: pids are reused, a stray may get an old one
    first = True
    next_at = time.monotonic()
    while True:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    start = f.read().rsplit(b")", 1)[1].split()[19]
            except (OSError, IndexError):
                continue
            pid = int(name)
            if known.get(pid) != start:
                known[pid] = start
                if not first:
                    seen[pid] = -1  # the newest process with this pid
        end = time.monotonic_ns()
        for pid, t in seen.items():
            if t == -1:
                seen[pid] = end
        if first:
            print("ready", flush=True)
            first = False
        next_at += interval
        r, _, _ = select.select([sys.stdin], [], [], max(0.0, next_at - time.monotonic()))
        if r and not sys.stdin.readline():
            break
    print(json.dumps(seen), flush=True)
    return 0


def listen_mode(window: float) -> int:
    """Run an EventWatcher with no-op callbacks for `window` s; print its cost as JSON."""
    lost: list[str] = []
    w = EventWatcher(lambda c, e: None, lost.append).start()
    time.sleep(2.0)  # start-up and the events queued before it are not the steady state
    r0, ev0, b0 = resource.getrusage(resource.RUSAGE_SELF), w.connector.events_read, w.batches
    t0 = time.monotonic()
    time.sleep(window)
    r1, ev1, b1 = resource.getrusage(resource.RUSAGE_SELF), w.connector.events_read, w.batches
    wall = time.monotonic() - t0
    with open("/proc/self/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    w.stop()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(
        json.dumps(
            {
                "cpu": cpu,
                "wall": wall,
                "events": ev1 - ev0,
                "batches": b1 - b0,
                "rss_kb": rss_kb,
                "maxrss_kb": r1.ru_maxrss,
                "lost": len(lost),
            }
        ),
        flush=True,
    )
    return 0


# ---------------------------------------------------------------- measurements


class TsConnector(ProcConnector):
    """Keeps the kernel timestamp of every new process's fork event."""

    def __init__(self) -> None:
        self.fork_ts: dict[int, int] = {}
        super().__init__()

    def read_events(self, max_msgs: int = 4096) -> list[ProcEvent]:
        events = super().read_events(max_msgs)
        for ev in events:
            if ev.what == "fork" and ev.pid == ev.tgid:
                self.fork_ts[ev.tgid] = ev.ts_ns
        return events


@dataclass
class Latency:
    label: str
    n: int
    event_ms: list[float]
    wall_ms: list[float]
    poll_ms: list[float]
    missed_event: int
    missed_poll: int
    lost: list[str]
    storm_rate: float


def start_storm(user: User) -> subprocess.Popen:
    return as_user(user, [PY, "-S", "-c", STORM])


def stop_storm(storm: subprocess.Popen) -> None:
    storm.send_signal(signal.SIGTERM)  # our own child, by pid: it reaps its children and exits
    try:
        storm.wait(timeout=30)
    except subprocess.TimeoutExpired:
        storm.kill()
        storm.wait()


def measure_latency(
    label: str,
    user: User,
    strays: int,
    interval: float,
    storm_user: User | None,
    delay: float = 0.02,
) -> Latency:
    note(f"latency, {label}: {strays} strays")
    conn = TsConnector()
    first_seen: dict[int, int] = {}
    lost: list[str] = []

    def on_pids(changed: set[int], _exited: set[int]) -> None:
        now = time.monotonic_ns()
        for pid in changed:
            first_seen.setdefault(pid, now)

    watcher = EventWatcher(on_pids, lost.append, delay=delay, connector=conn).start()
    poller = subprocess.Popen(
        [sys.executable, __file__, "--poll-mode", "1.0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert poller.stdout is not None and poller.stdin is not None
    poller.stdout.readline()  # "ready": its first walk is done
    storm = start_storm(storm_user) if storm_user else None
    ev_before, t_before = conn.events_read, time.monotonic()
    if storm:
        time.sleep(2.0)  # let the storm reach its pace
    token = f"prbestray{secrets.token_hex(2)}"
    spawner = as_user(
        user,
        [PY, "-S", "-c", SPAWNER, str(strays), str(interval), token],
        stdout=subprocess.PIPE,
        text=True,
    )
    rows = [tuple(map(int, line.split())) for line in spawner.stdout]  # type: ignore[union-attr]
    spawner.wait()
    time.sleep(2.5)  # the poller's next walks and the last batch
    storm_rate = (conn.events_read - ev_before) / (time.monotonic() - t_before)
    if storm:
        stop_storm(storm)
    poll_out, _ = poller.communicate("\n", timeout=60)
    poll_seen = {int(k): v for k, v in json.loads(poll_out.strip().splitlines()[-1]).items()}
    watcher.stop()
    conn.close()
    _users.kill_own([g for g, _ in rows], user.uid, UID_LOW)
    ev_ms, wall_ms, poll_ms = [], [], []
    missed_ev = missed_poll = 0
    for g, t0 in rows:
        if g in first_seen and g in conn.fork_ts:
            ev_ms.append((first_seen[g] - conn.fork_ts[g]) / 1e6)
            wall_ms.append((first_seen[g] - t0) / 1e6)
        else:
            missed_ev += 1
        if g in poll_seen:
            poll_ms.append((poll_seen[g] - t0) / 1e6)
        else:
            missed_poll += 1
    return Latency(
        label, len(rows), ev_ms, wall_ms, poll_ms, missed_ev, missed_poll, lost, storm_rate
    )


def note(text: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def count_procs() -> int:
    return sum(1 for p in os.listdir("/proc") if p.isdigit())


def measure_cost(
    label: str, user: User, population: int, window: float, storm_user: User | None = None
) -> dict[str, float | int | str]:
    """Run the listener process for `window` s with `population` processes existing."""
    note(f"cost, {label}: {population} processes, {window:.0f} s")
    spawner = None
    need = population - count_procs()
    if need > 0:
        spawner = as_user(
            user,
            [PY, "-S", str(HERE / "_spawn.py"), str(need), "3600"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        spawner.stdout.readline()  # type: ignore[union-attr]  # "ready <n>"
    storm = start_storm(storm_user) if storm_user else None
    try:
        procs = count_procs()
        out = subprocess.run(
            [sys.executable, __file__, "--listen-mode", str(window)],
            capture_output=True,
            text=True,
            timeout=window + 60,
        )
        res = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if storm:
            stop_storm(storm)
        if spawner:
            spawner.communicate("", timeout=120)  # EOF: it kills and reaps its own sleepers
    res.update(label=label, procs=procs)
    return res


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def print_latency(rows: list[Latency]) -> None:
    print(
        "\n### Stray detection latency (ms): double fork -> EventWatcher callback, "
        "vs a full /proc walk every 1 s"
    )
    print(
        "| load | strays | event path: from fork event ts p50 / p99 / max | "
        "from spawner's fork p50 / p99 | 1 s poll p50 / p99 | missed (event/poll) | "
        "events/s | loss reports |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.label} | {r.n} | {pct(r.event_ms, 50):.1f} / {pct(r.event_ms, 99):.1f} / "
            f"{max(r.event_ms, default=float('nan')):.1f} | "
            f"{pct(r.wall_ms, 50):.1f} / {pct(r.wall_ms, 99):.1f} | "
            f"{pct(r.poll_ms, 50):.0f} / {pct(r.poll_ms, 99):.0f} | "
            f"{r.missed_event}/{r.missed_poll} | {r.storm_rate:,.0f} | {len(r.lost)} |"
        )


def print_cost(rows: list[dict]) -> None:
    print("\n### Listener cost (separate process: EventWatcher with no-op callbacks)")
    print("| situation | processes | window s | events/s | CPU s/hour | % of one core | VmRSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        per_hour = r["cpu"] / r["wall"] * 3600
        print(
            f"| {r['label']} | {r['procs']:,} | {r['wall']:.0f} | {r['events'] / r['wall']:,.0f}"
            f" | {per_hour:.2f} | {100 * r['cpu'] / r['wall']:.3f} | {r['rss_kb'] / 1024:.1f} |"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strays", type=int, default=200)
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between strays")
    ap.add_argument("--window", type=float, default=60.0, help="idle CPU window, seconds")
    ap.add_argument("--few", type=int, default=1000)
    ap.add_argument("--many", type=int, default=20000)
    ap.add_argument("--poll-mode", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--listen-mode", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` shows where a run waits
    if args.poll_mode:
        return poll_mode(args.poll_mode)
    if args.listen_mode:
        return listen_mode(args.listen_mode)
    if os.geteuid() != 0:
        print("bench_events: needs root (creates users, forced receive buffer)", file=sys.stderr)
        return EX_NOPERM
    reason = probe()
    if reason:
        print(f"bench_events: {reason}", file=sys.stderr)
        return EX_UNAVAILABLE
    made: list[User] = []
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    try:
        victim, stormer = make_user(made), make_user(made)
        lat = [
            measure_latency("idle, delay 20 ms", victim, args.strays, args.interval, None),
            measure_latency("fork storm, delay 20 ms", victim, args.strays, args.interval, stormer),
            measure_latency("idle, delay 0", victim, args.strays, args.interval, None, 0.0),
            measure_latency(
                "fork storm, delay 0", victim, args.strays, args.interval, stormer, 0.0
            ),
        ]
        print_latency(lat)
        cost = [
            measure_cost("idle", stormer, args.few, args.window),
            measure_cost("idle", stormer, args.many, args.window),
            measure_cost("fork storm", stormer, args.few, min(args.window, 20.0), victim),
        ]
        print_cost(cost)
        print(
            f"\nkernel {os.uname().release}, {os.cpu_count()} CPUs; other users' processes "
            "ran meanwhile (the machine is shared), so 'idle' means no load of ours."
        )
    finally:
        _users.remove_users(made, UID_LOW)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

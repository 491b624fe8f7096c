"""Benchmark the event path under real load: fork -> stray killed, and CPU per new process.

    sudo .venv/bin/python bench/bench_events.py [--strays 150] [--burst 2000] [--storms 2]

One run, four daemon runs (the real `pruned run`, as bench_daemon.py starts it: enforce,
min_age 0, kill grace 1 s, a private mount namespace hiding /run/systemd, audit to tmpfs),
each at the Nice= of the shipped systemd/pruned.service:
- events on (sweep every 10 min, so the event path does every kill), no load of ours;
- the same under a burst: throw-away user B starts `--burst` (2,000) real `sleep`
  processes within each second (posix_spawn, as fast as it can, then the rest of the
  second idle) and kills the previous second's, for as long as the strays take;
- the same under a fork storm: user C runs `--storms` forkers that fork and reap
  short-lived children as fast as they can (2,000+ forks/s together);
- events off, sweep every 1 s (grace 500 ms): the polling baseline.
B and C are in the daemon's --uid scope, under the root stand-in batch daemon
(/usr/bin/timeout, in the policy's batch_daemons), so every one of their processes is a job
process the daemon must judge (and must not kill), the hard case: nothing is out of scope.

Latency: a spawner of user A (under the same stand-in) double-forks strays one at a time
(bench_daemon's SPAWNER). Fork -> killed is the kernel's own timestamps of the stray's fork
event and its exit event (a proc connector listener in this script keeps them), so the
spawner's and this script's scheduling delays on a saturated machine are not counted; the
spawner's clock (before its first fork -> the stray's pidfd readable) is printed beside it.

CPU per new process: the daemon's reactor worker thread ("pruned-reactor") CPU time from
/proc/PID/task/TID/schedstat (ns) over the run, divided by the new processes the kernel
reported meanwhile (a separate proc connector listener in this script counts fork events
of new processes, machine-wide: other users' processes are the daemon's work too).

All load runs as throw-away users inside root-made v1 pids cgroups (pids.max set before the
first process enters) with RLIMIT_NPROC; everything is removed at the end (bench_daemon's
cleanup: daemons and spawners by pid, leftovers of our uids by pid after a uid check, users,
cgroups, the tmpfs dir). The closing line is
`event p99_ms=<worst p99 of the loaded runs> cpu_us_per_new_proc=<under the burst>`.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import _users  # noqa: E402
import bench_daemon as bd  # noqa: E402
from _users import User, as_user  # noqa: E402

from pruned.linux.connector import EventWatcher, ProcConnector, ProcEvent, probe  # noqa: E402
from tests.fixtures.pids import pids_cgroup  # noqa: E402

UID_LOW, UID_HIGH = 50000, 54999  # away from the fixtures' 30000-39999 and bench_daemon's
EX_NOPERM, EX_UNAVAILABLE = 77, 69
PY = "/usr/bin/python3"
UNIT = ROOT / "systemd" / "pruned.service"

# Each second: start n sleepers as fast as posix_spawn goes, then kill and reap the previous
# second's; prints "<processes started> <seconds>" at the end. Its children are its own
# unreaped sleepers, so its kills by pid are exact.
BURST = r"""
import os, signal, sys, time
n = int(sys.argv[1])
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
env = {"PATH": "/usr/bin:/bin"}
prev, made, t_start = [], 0, time.monotonic()
def reap(pids):
    for p in pids:
        try: os.kill(p, signal.SIGKILL)
        except ProcessLookupError: pass
    for p in pids:
        try: os.waitpid(p, 0)
        except ChildProcessError: pass
while not stop:
    t0 = time.monotonic()
    cur = []
    for _ in range(n):
        if stop: break
        try: cur.append(os.posix_spawn("/usr/bin/sleep", ["sleep", "60"], env))
        except OSError: break
    made += len(cur)
    reap(prev)
    prev = cur
    left = 1.0 - (time.monotonic() - t0)
    if left > 0 and not stop: time.sleep(left)
reap(prev)
print(made, time.monotonic() - t_start, flush=True)
"""


def make_user(made: list[User]) -> User:
    return _users.make_user(made, "prbe", UID_LOW, UID_HIGH)


def note(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def unit_nice() -> int | None:
    """The Nice= of the shipped unit: the bench runs the daemon as the unit would."""
    m = re.search(r"^Nice=(-?\d+)\s*$", UNIT.read_text(), re.M)
    return int(m.group(1)) if m else None


def jailed(cgroup: str, nproc: int) -> tuple[str, ...]:
    """as_user prefix: enter `cgroup` (as root, before anything of the user runs), set
    RLIMIT_NPROC, run under the stand-in batch daemon."""
    return ("sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup,
            "prlimit", f"--nproc={nproc}", bd.MOM, "7200")  # fmt: skip


class ForkCounter(ProcConnector):
    """Counts fork events of new processes (not threads), machine-wide, and keeps the kernel
    timestamps of the fork and exit of every pid in `watch` (a set the caller fills)."""

    def __init__(self) -> None:
        self.forks = 0
        self.fork_ts: dict[int, list[int]] = {}
        self.exit_ts: dict[int, list[int]] = {}
        super().__init__()

    def read_events(self, max_msgs: int = 4096) -> list[ProcEvent]:
        events = super().read_events(max_msgs)
        for ev in events:
            if ev.pid != ev.tgid:
                continue
            if ev.what == "fork":
                self.forks += 1
                self.fork_ts.setdefault(ev.tgid, []).append(ev.ts_ns)
            elif ev.what == "exit":
                self.exit_ts.setdefault(ev.tgid, []).append(ev.ts_ns)
        return events

    def lifetime_ms(self, pid: int, after_ns: int) -> float | None:
        """Kernel fork -> exit of the first process with this pid forked after `after_ns`."""
        fork = min((t for t in self.fork_ts.get(pid, ()) if t >= after_ns), default=None)
        if fork is None:
            return None
        end = min((t for t in self.exit_ts.get(pid, ()) if t >= fork), default=None)
        return None if end is None else (end - fork) / 1e6


def stat_floor(counter: ForkCounter) -> float:
    """CPU µs of a bare open/fstat/read/close of /proc/PID/stat, in this script, of the
    processes forked in the last 0.5 s, read now (under the same load): the floor of any
    per-process read, to set the reactor's CPU against."""
    since = time.monotonic_ns() - 500_000_000
    pids = [pid for pid, ts in list(counter.fork_ts.items()) if ts and ts[-1] >= since]
    dfd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
    n, t0 = 0, time.thread_time()
    try:
        for pid in pids:
            try:
                fd = os.open(f"{pid}/stat", os.O_RDONLY, dir_fd=dfd)
            except OSError:
                continue
            try:
                os.fstat(fd)
                os.read(fd, 1024)
                n += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    finally:
        os.close(dfd)
    # Under a storm its children are gone before this reads them: too few to say anything.
    return (time.thread_time() - t0) * 1e6 / n if n >= 100 else float("nan")


def reactor_tid(pid: int) -> int | None:
    """The daemon's reactor worker: named "pruned-reactor"; in an older daemon (unnamed
    threads) the first thread Daemon.run starts, as bench_daemon.event_threads finds it."""
    for name in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/task/{name}/comm").read_text().strip() == "pruned-reactor":
                return int(name)
    both = bd.event_threads(pid)
    return min(both) if both else None


def thread_ns(pid: int, tid: int | None) -> int:
    """CPU time of one thread, in ns (schedstat's first field), 0 when unknown."""
    if tid is None:
        return 0
    try:
        return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class Run:
    label: str
    mode: str
    n: int
    from_fork_ms: list[float]  # the spawner's clock: its fork -> its pidfd readable
    kernel_ms: list[float]  # the kernel's: the stray's fork event -> its exit event
    missed: int
    killed: int
    new_procs_per_s: float
    load_rate: str  # what the load's own processes reported
    reactor_us_per_new: float
    stat_floor_us: float  # a bare stat read of a new process, in the bench, same load
    daemon_cpu_pct: float
    loadavg: float


def measure(daemon: bd.Daemon, label: str, mode: str, strayer: User, cg_stray: str,
            args: argparse.Namespace, gap: float, load: list[subprocess.Popen] | None) -> Run:
    note(f"{mode}, {label}: {args.strays} strays")
    counter = ForkCounter()
    watcher = EventWatcher(lambda c, e: None, lambda _r: None, connector=counter).start()
    tid = reactor_tid(daemon.pid)
    cpu_us = floor_us = float("nan")
    if load:
        time.sleep(3.0)  # the load at its pace, the daemon in its steady state
        # CPU per new process: a window of load alone (a kill walks the whole table, and its
        # cost is per stray, not per new process: it shows in the latency and daemon CPU).
        f0, r0 = counter.forks, thread_ns(daemon.pid, tid)
        time.sleep(args.cost_window)
        f1, r1 = counter.forks, thread_ns(daemon.pid, tid)
        if f1 > f0 and tid is not None:
            cpu_us = (r1 - r0) / 1e3 / (f1 - f0)
        floor_us = stat_floor(counter)
    killed0 = sum(1 for r in daemon.records() if r.get("PRUNED_EVENT") == "process_killed")
    f0, c0, t0 = counter.forks, bd.usage(daemon.pid)[0], time.monotonic()
    token = f"prbestray{secrets.token_hex(2)}"
    spawner = as_user(
        strayer,
        [PY, "-S", "-c", bd.SPAWNER, str(args.strays), str(gap), str(args.timeout), token],
        prefix=jailed(cg_stray, 64),
        stdout=subprocess.PIPE,
        text=True,
    )
    rows = [tuple(map(int, line.split())) for line in spawner.stdout]  # type: ignore[union-attr]
    spawner.wait()
    f1, c1, t1 = counter.forks, bd.usage(daemon.pid)[0], time.monotonic()
    loadavg = os.getloadavg()[0]
    rate = "-"
    for p in load or []:
        bd.stop_child(p)
    if load:
        outs = [(p.stdout.read() if p.stdout else "").split() for p in load]  # type: ignore
        made = sum(int(o[0]) for o in outs if len(o) == 2)
        secs = max((float(o[1]) for o in outs if len(o) == 2), default=0.0)
        rate = f"{made / secs:,.0f}" if secs else "?"
    time.sleep(0.5)  # the last audit records, the last exit events
    watcher.stop()
    counter.close()
    kernel = [ms for g, t, _o, d in rows if d and (ms := counter.lifetime_ms(g, t)) is not None]
    killed = sum(1 for r in daemon.records()
                 if r.get("PRUNED_EVENT") == "process_killed") - killed0
    return Run(label, mode, len(rows), [(d - t) / 1e6 for _g, t, _o, d in rows if d], kernel,
               sum(1 for row in rows if not row[3]), killed, (f1 - f0) / (t1 - t0), rate,
               cpu_us, floor_us, 100 * (c1 - c0) / (t1 - t0), loadavg)


def start_burst(user: User, cg: str, n: int, k: int) -> list[subprocess.Popen]:
    """k bursters of n // k a second each: one Python process cannot start 2,000 a second
    on a loaded 2-CPU machine."""
    return [as_user(user, [PY, "-S", "-c", BURST, str(n // k)], prefix=jailed(cg, 2 * n + 64),
                    stdout=subprocess.PIPE, text=True) for _ in range(k)]


def start_storm(user: User, cg: str, k: int) -> list[subprocess.Popen]:
    return [as_user(user, [PY, "-S", "-c", bd.STORM], prefix=jailed(cg, 256 * k),
                    stdout=subprocess.PIPE, text=True) for _ in range(k)]


def print_runs(rows: list[Run], timeout: float) -> None:
    print("\n### Fork -> stray killed (ms): kernel timestamps of the stray's fork and exit "
          "events; the spawner's clock (before its double fork -> pidfd readable) beside it")
    print("| daemon | load | strays timed | p50 | p99 | max | spawner's clock p50 / p99 | "
          f"not dead in {timeout:g} s | kills audited | new processes/s (all users) | "
          "load's own rate/s | reactor CPU µs per new process (load alone) | "
          "bare stat read µs (same load) | daemon CPU % of a core | load average |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pc = bd.pct
        print(f"| {r.mode} | {r.label} | {len(r.kernel_ms)} | {pc(r.kernel_ms, 50):.1f} | "
              f"{pc(r.kernel_ms, 99):.1f} | {max(r.kernel_ms, default=float('nan')):.1f} | "
              f"{pc(r.from_fork_ms, 50):.1f} / {pc(r.from_fork_ms, 99):.1f}"
              f" | {r.missed} | {r.killed} | {r.new_procs_per_s:,.0f} | {r.load_rate} | "
              f"{r.reactor_us_per_new:.1f} | {r.stat_floor_us:.1f} | {r.daemon_cpu_pct:.1f} | "
              f"{r.loadavg:.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strays", type=int, default=150, help="strays per run")
    ap.add_argument("--gap", type=float, default=0.05,
                    help="random pause 0..gap s between strays with events on")
    ap.add_argument("--timeout", type=float, default=5.0, help="a stray alive this long: missed")
    ap.add_argument("--burst", type=int, default=2000, help="new processes per second")
    ap.add_argument("--bursters", type=int, default=4, help="processes making the burst")
    ap.add_argument("--storms", type=int, default=4, help="forkers in the storm")
    ap.add_argument("--cost-window", type=float, default=10.0,
                    help="seconds of load alone for the CPU per new process")
    ap.add_argument("--cases", default="none,burst,storm,poll",
                    help="which runs, comma-separated (the closing line needs all four)")
    ap.add_argument("--nice", type=int, help="run the daemon at this nice, not the unit's Nice=")
    args = ap.parse_args()
    faulthandler.register(signal.SIGUSR1)
    if os.geteuid() != 0:
        print("bench_events: needs root (users, cgroups, the daemon)", file=sys.stderr)
        return EX_NOPERM
    reason = probe()
    if reason:
        print(f"bench_events: proc connector unavailable: {reason}", file=sys.stderr)
        return EX_UNAVAILABLE
    free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    if free_gb < 8 + 2 * args.burst / 1000:  # ~1 MB a sleeper is far more than they use
        print(f"bench_events: only {free_gb:.1f} GB free", file=sys.stderr)
        return EX_UNAVAILABLE
    nice = unit_nice() if args.nice is None else args.nice
    made: list[User] = []
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    work = Path(tempfile.mkdtemp(prefix="prbevents", dir="/dev/shm"))
    daemons: list[bd.Daemon] = []
    runs: list[Run] = []
    try:
        os.chmod(work, 0o700)
        (work / "state" / "jobs").mkdir(parents=True, mode=0o700)
        os.chmod(work / "state", 0o700)
        strayer, burster, stormer = make_user(made), make_user(made), make_user(made)
        with (pids_cgroup(64, "pruned_bench") as cg_a,
              pids_cgroup(2 * args.burst + 256, "pruned_bench") as cg_b,
              pids_cgroup(256 * args.storms, "pruned_bench") as cg_c):
            ev = bd.Daemon(work, "events", bd.write_policy(work, "events", events=True,
                                                           sweep="10m"),
                           strayer.uid, more_uids=(burster.uid, stormer.uid), nice=nice)
            daemons.append(ev.start())
            mode = "events on, sweep 10 min"
            if "none" in args.cases:
                runs.append(measure(ev, "none", mode, strayer, cg_a, args, args.gap, None))
            if "burst" in args.cases:
                burst = start_burst(burster, cg_b, args.burst, args.bursters)
                runs.append(measure(ev, f"burst {args.burst:,} new processes/s", mode, strayer,
                                    cg_a, args, args.gap, burst))
            if "storm" in args.cases:
                storm = start_storm(stormer, cg_c, args.storms)
                runs.append(measure(ev, f"fork storm ({args.storms} forkers)", mode, strayer,
                                    cg_a, args, args.gap, storm))
            ev.stop()
            if "poll" in args.cases:
                poll = bd.Daemon(work, "poll", bd.write_policy(work, "poll", events=False,
                                                               sweep="1s", grace="500ms"),
                                 strayer.uid, more_uids=(burster.uid, stormer.uid), nice=nice)
                daemons.append(poll.start())
                runs.append(measure(poll, "none", "events off, sweep 1 s", strayer, cg_a,
                                    args, 1.0, None))
                poll.stop()
        print_runs(runs, args.timeout)
        whence = "the unit's Nice=" if args.nice is None else "--nice"
        print(f"\nkernel {os.uname().release}, {os.cpu_count()} CPUs, daemon at nice {nice} "
              f"({whence}), load average {os.getloadavg()[0]:.1f} at the end; other users' "
              "processes ran meanwhile (the machine is shared).")
        loaded = [r for r in runs if r.label.startswith(("burst", "fork storm"))]
        worst = max((bd.pct(r.kernel_ms, 99) for r in loaded), default=float("nan"))
        if any(r.missed or len(r.kernel_ms) < r.n for r in loaded):
            worst = float("inf")  # a stray not dead within the timeout: no p99 to speak of
        cpu = next((r.reactor_us_per_new for r in loaded if r.label.startswith("burst")),
                   float("nan"))
        print(f"event p99_ms={worst:.1f} cpu_us_per_new_proc={cpu:.1f}")
    finally:
        for d in daemons:
            d.stop()
        _users.remove_users(made, UID_LOW)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

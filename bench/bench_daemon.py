"""Benchmark the whole daemon (`pruned run`): stray-to-death latency, CPU per hour and RSS.

    sudo .venv/bin/python bench/bench_daemon.py [--strays 150] [--window 60] [--many 20000]

Latency: the real daemon runs (`python -m pruned.cli run --uid A`, enforce, min_age 0, kill
grace 1 s) in a private mount namespace that hides /run/systemd, so its audit records go to
a fallback file on tmpfs, never to the node's journald. A spawner of throw-away user A runs
under a root `/usr/bin/timeout`, which the policy lists as the batch daemon (the stand-in for
slurmstepd / pbs_mom): the spawner is a job process, and what it double-forks is a stray the
moment the middle process exits. For each stray, one at a time, the spawner reads
CLOCK_MONOTONIC just before the first fork, opens a pidfd of the grandchild while the middle
process still holds it, lets the middle process exit, and polls the pidfd: latency = pidfd
readable (the stray died) minus the clock read before the fork. Three daemon runs in the same
script run: events on (sweep every 10 min, so the event path does the killing) idle and under
a fork storm (throw-away user B, outside the daemon's --uid scope, forking and reaping
short-lived children as fast as it can), and events off with a 1 s sweep.

Cost: a fresh daemon with events on and the default 60 s sweep, scoped to user A, while user
B holds ~1,000 and ~20,000 sleeping processes (bench/_spawn.py): B's processes are strays
but outside the --uid scope, so every sweep walks and classifies all of them and kills none.
utime+stime from /proc/PID/stat over a window centred between two sweeps (so it holds exactly
window/60 sweeps), VmRSS and VmHWM from /proc/PID/status. Everything the script made is removed
at the end: daemons and spawners it started (by pid), leftovers of its two uids (by pid, after
checking the uid), the users, the tmpfs dir, and kernel.pid_max if it was raised.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import _users  # noqa: E402
from _users import User, as_user  # noqa: E402

from pruned.linux.connector import EventWatcher, probe  # noqa: E402

UID_LOW, UID_HIGH = 55000, 59999  # away from the fixtures' and the other benches' ranges
EX_NOPERM, EX_UNAVAILABLE = 77, 69
PY = "/usr/bin/python3"
MOM = "/usr/bin/timeout"  # root parent of the spawner, listed in the policy's batch_daemons
CLK_TCK = os.sysconf("SC_CLK_TCK")

# One stray at a time: t0, fork, fork, pidfd of the grandchild, let the middle one exit
# (the grandchild is now a stray: setsid, parent pid 1), poll the pidfd until it dies.
# Prints "pid t0_ns orphaned_ns dead_ns" (dead_ns 0: not dead within the timeout, then the
# spawner kills it itself through the pidfd).
SPAWNER = r"""
import os, random, select, signal, sys, time
n, gap, timeout, token = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
null = os.open("/dev/null", os.O_RDWR)
for _ in range(n):
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    t0 = time.monotonic_ns()
    mid = os.fork()
    if mid == 0:
        os.close(r1); os.close(w2)
        g = os.fork()
        if g == 0:
            os.close(w1); os.close(r2)
            os.setsid()
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.execv("/bin/sleep", [token, "600"])
        os.write(w1, str(g).encode())
        os.read(r2, 1)
        os._exit(0)
    os.close(w1); os.close(r2)
    g = int(os.read(r1, 32))
    fd = os.pidfd_open(g)
    t1 = time.monotonic_ns()
    os.write(w2, b"x")
    os.close(r1); os.close(w2)
    os.waitpid(mid, 0)
    p = select.poll()
    p.register(fd, select.POLLIN)
    dead = 0
    if p.poll(int(timeout * 1000)):
        dead = time.monotonic_ns()
    else:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    os.close(fd)
    print(g, t0, t1, dead, flush=True)
    time.sleep(random.uniform(0, gap))
"""

# Forks until SIGTERM, reaping as it goes (PID 1 here reaps lazily); prints forks and seconds.
STORM = r"""
import os, signal, time
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
i, t0 = 0, time.monotonic()
while not stop:
    try:
        if os.fork() == 0:
            os._exit(0)
        i += 1
    except OSError:
        pass
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
print(i, time.monotonic() - t0, flush=True)
"""


# ---------------------------------------------------------------- users and processes


def make_user(made: list[User]) -> User:
    """A throw-away user with a random name and a free uid in this bench's range."""
    return _users.make_user(made, "pbd", UID_LOW, UID_HIGH)


def stop_child(p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Signal one process we started (by its pid) and wait for it; SIGKILL if it lingers."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def note(text: str) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def count_procs() -> int:
    return sum(1 for p in os.listdir("/proc") if p.isdigit())


@contextlib.contextmanager
def pid_max_at_least(n: int) -> Iterator[None]:
    """Raise kernel.pid_max to n for the block if it is lower; restore it after."""
    path = "/proc/sys/kernel/pid_max"
    old = int(Path(path).read_text())
    if old < n:
        note(f"kernel.pid_max {old} -> {n} for the run")
        Path(path).write_text(str(n))
    try:
        yield
    finally:
        if old < n:
            Path(path).write_text(str(old))
            note(f"kernel.pid_max restored to {old}")


# ---------------------------------------------------------------- the daemon


def usage(pid: int) -> tuple[float, int, int]:
    """(utime+stime seconds, VmRSS kB, VmHWM kB) of a whole process (all its threads)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14, 15
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return cpu, rss, hwm


def thread_cpu(pid: int) -> dict[int, float]:
    """utime+stime seconds of each thread of pid."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{name}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
            out[int(name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def event_threads(pid: int) -> set[int]:
    """The reactor and listener threads: Daemon.run starts them first (reactor, then the
    listener), before the scheduler and its pools; the listener is the one blocked in poll(2).
    Empty when that layout is not found."""
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    if len(tids) < 3:
        return set()
    try:
        nr = Path(f"/proc/{pid}/task/{tids[2]}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return set()
    return {tids[1], tids[2]} if nr in ("7", "271") else set()  # poll, ppoll (x86_64)


def write_policy(work: Path, name: str, *, events: bool, sweep: str, grace: str = "1s") -> Path:
    path = work / f"{name}.yaml"
    path.write_text(
        "version: 1\n"
        "mode: enforce\n"
        "min_age: 0s\n"
        f"events: {'true' if events else 'false'}\n"
        f"kill:\n  grace: {grace}\n"
        f"jobs:\n  sources: [statedir]\n  state_dir: {work}/state\n"
        f"batch_daemons: [{MOM}]\n"
        "cleanup:\n  enabled: false\n"
        f"schedule:\n  sweep: {sweep}\n"
        f"audit:\n  fallback_file: {work}/{name}.audit.jsonl\n"
    )
    return path


@dataclass
class Daemon:
    """One `pruned run` in a private mount namespace with /run/systemd hidden."""

    work: Path
    name: str
    policy: Path
    uid: int
    proc: subprocess.Popen | None = None
    audit: Path = field(init=False)
    more_uids: tuple[int, ...] = ()  # also in the --uid scope
    nice: int | None = None  # run at this nice value (the unit's Nice=), None: inherit

    def __post_init__(self) -> None:
        self.audit = self.work / f"{self.name}.audit.jsonl"

    def start(self) -> Daemon:
        empty = self.work / "empty"
        empty.mkdir(exist_ok=True)
        hide = f"mount --bind {empty} /run/systemd && " if os.path.isdir("/run/systemd") else ""
        uids = " ".join(str(u) for u in (self.uid, *self.more_uids))
        cmd = (f"{hide}exec {sys.executable} -m pruned.cli run --policy {self.policy} "
               f"--uid {uids}")
        nice = ([] if self.nice is None
                else ["nice", "-n", str(self.nice - os.getpriority(os.PRIO_PROCESS, 0))])
        self.proc = subprocess.Popen(
            [*nice, "unshare", "--mount", "--propagation", "private", "sh", "-c", cmd],
            cwd=str(ROOT),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.work / f"{self.name}.stderr", "wb"),  # noqa: SIM115
        )
        # nice, unshare and sh exec: the pid we started is the daemon's.
        deadline = time.monotonic() + 300
        while not self.sweeps():
            if self.proc.poll() is not None:
                err = (self.work / f"{self.name}.stderr").read_text()[-2000:]
                raise RuntimeError(f"daemon {self.name} exited {self.proc.returncode}: {err}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon {self.name}: no first sweep within 300 s")
            time.sleep(0.2)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def records(self) -> list[dict[str, str]]:
        try:
            lines = self.audit.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(x) for x in lines if x.strip()]

    def sweeps(self) -> list[dict[str, str]]:
        """Summaries of full process sweeps (event reactions have "event-" sweep ids)."""
        return [r for r in self.records() if r.get("PRUNED_EVENT") == "sweep_summary"
                and not r.get("PRUNED_SWEEP_ID", "").startswith("event-")]

    def stop(self) -> None:
        if self.proc is not None:
            stop_child(self.proc)


# ---------------------------------------------------------------- latency


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


@dataclass
class Latency:
    label: str
    mode: str
    n: int
    from_fork_ms: list[float]
    from_orphan_ms: list[float]
    missed: int
    cpu_pct: float
    storm_forks_per_s: float
    killed_records: int
    procs: tuple[int, int]  # fewest and most processes on the node while it ran


def sample_procs(stop: threading.Event, seen: list[int]) -> None:
    """Count the node's processes every 0.5 s (other users' load changes what a sweep walks)."""
    while not stop.wait(0.5):
        seen.append(count_procs())


def measure_latency(daemon: Daemon, label: str, mode: str, user: User, strays: int, gap: float,
                    timeout: float, storm_user: User | None) -> Latency:
    note(f"latency, {label}: {strays} strays")
    storm = None
    if storm_user is not None:
        storm = as_user(storm_user, [PY, "-S", "-c", STORM], stdout=subprocess.PIPE, text=True)
        time.sleep(2.0)  # let the storm reach its pace and the daemon its steady state
    killed0 = sum(1 for r in daemon.records() if r.get("PRUNED_EVENT") == "process_killed")
    seen = [count_procs()]
    stop = threading.Event()
    sampler = threading.Thread(target=sample_procs, args=(stop, seen), daemon=True)
    sampler.start()
    c0, t0 = usage(daemon.pid)[0], time.monotonic()
    token = f"pbdstray{secrets.token_hex(2)}"
    spawner = as_user(
        user,
        [PY, "-S", "-c", SPAWNER, str(strays), str(gap), str(timeout), token],
        prefix=(MOM, "7200"),
        stdout=subprocess.PIPE,
        text=True,
    )
    rows = [tuple(map(int, line.split())) for line in spawner.stdout]  # type: ignore[union-attr]
    spawner.wait()
    c1, t1 = usage(daemon.pid)[0], time.monotonic()
    stop.set()
    sampler.join()
    rate = 0.0
    if storm is not None:
        stop_child(storm)
        out = (storm.stdout.read() if storm.stdout else "").split()  # type: ignore[union-attr]
        if len(out) == 2:
            rate = int(out[0]) / float(out[1])
    time.sleep(0.5)  # the last audit records
    killed = sum(1 for r in daemon.records()
                 if r.get("PRUNED_EVENT") == "process_killed") - killed0
    fork_ms = [(dead - t) / 1e6 for _g, t, _o, dead in rows if dead]
    orphan_ms = [(dead - o) / 1e6 for _g, _t, o, dead in rows if dead]
    missed = sum(1 for row in rows if not row[3])
    return Latency(label, mode, len(rows), fork_ms, orphan_ms, missed,
                   100 * (c1 - c0) / (t1 - t0), rate, killed, (min(seen), max(seen)))


def print_latency(rows: list[Latency], timeout: float) -> None:
    print("\n### Stray latency (ms): spawner's clock before the double fork -> pidfd readable "
          "(the stray is dead)")
    print("| daemon | load | strays | p50 | p99 | max | from orphaning p50 / p99 | "
          f"not dead in {timeout:g} s | kills audited | daemon CPU % of a core | storm forks/s "
          "| node processes |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r.mode} | {r.label} | {r.n} | {pct(r.from_fork_ms, 50):.1f} | "
              f"{pct(r.from_fork_ms, 99):.1f} | {max(r.from_fork_ms, default=float('nan')):.1f} | "
              f"{pct(r.from_orphan_ms, 50):.1f} / {pct(r.from_orphan_ms, 99):.1f} | {r.missed} | "
              f"{r.killed_records} | {r.cpu_pct:.1f} | "
              f"{f'{r.storm_forks_per_s:,.0f}' if r.storm_forks_per_s else '-'} | "
              f"{r.procs[0]:,}-{r.procs[1]:,} |")


# ---------------------------------------------------------------- cost


@dataclass
class Cost:
    procs: int
    window: float
    sweeps: int
    sweep_ms: str
    cpu: float
    cpu_events: float  # of which the reactor and listener threads (others' processes' events)
    rss_kb: int
    hwm_kb: int
    events_per_s: float


def measure_cost(work: Path, scoped: User, owner: User, population: int, window: float,
                 interval: float) -> Cost:
    """A fresh daemon (events on, sweep every `interval` s) with `population` processes."""
    need = population - count_procs()
    note(f"cost: {population} processes ({max(0, need)} sleepers of {owner.name}), "
         f"window {window:.0f} s")
    spawner = None
    daemon = None
    try:
        if need > 0:
            spawner = as_user(owner, [PY, "-S", str(HERE / "_spawn.py"), str(need), "3600"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            line = spawner.stdout.readline()  # type: ignore[union-attr]  # "ready <n>"
            note(f"spawner: {line.strip()}")
        policy = write_policy(work, f"cost{population}", events=True, sweep=f"{interval:g}s")
        daemon = Daemon(work, f"cost{population}", policy, scoped.uid).start()
        first = time.monotonic()  # the first sweep has just ended; the next is ~interval later
        # Centre the window between sweeps so it holds exactly window/interval of them.
        time.sleep(max(0.0, first + interval / 2 - time.monotonic()))
        counted = [0]
        watcher = EventWatcher(lambda c, e: counted.__setitem__(0, counted[0] + len(c) + len(e)),
                               lambda _r: None).start()
        n0 = len(daemon.sweeps())
        ev_tids = event_threads(daemon.pid)
        th0, c0, t0 = thread_cpu(daemon.pid), usage(daemon.pid)[0], time.monotonic()
        time.sleep(window)
        th1, c1, t1 = thread_cpu(daemon.pid), usage(daemon.pid)[0], time.monotonic()
        cpu_ev = (sum(th1.get(t, 0.0) - th0.get(t, 0.0) for t in ev_tids) if ev_tids
                  else float("nan"))
        sweeps = daemon.sweeps()
        watcher.stop()
        _, rss, hwm = usage(daemon.pid)
        procs = count_procs()
        in_window = sweeps[n0:]
        ms = ", ".join(r.get("PRUNED_ELAPSED_MS", "?") for r in in_window) or "-"
        return Cost(procs, t1 - t0, len(in_window), ms, c1 - c0, cpu_ev, rss, hwm,
                    counted[0] / (t1 - t0))
    finally:
        if daemon is not None:
            daemon.stop()
        if spawner is not None:
            spawner.communicate("", timeout=300)  # EOF: it kills and reaps its own sleepers


def print_cost(rows: list[Cost], interval: float) -> None:
    print(f"\n### Daemon cost, events on, sweep every {interval:g} s, nothing to kill")
    print("| processes | window s | sweeps in window (wall ms each) | CPU s: all / event threads "
          "/ rest | % of one core: all / rest | CPU s/hour: all / rest | VmRSS MB | VmHWM MB "
          "| pids in events/s (others') |")
    print("|---:|---:|---|---|---|---|---:|---:|---:|")
    for r in rows:
        rest = r.cpu - r.cpu_events
        print(f"| {r.procs:,} | {r.window:.0f} | {r.sweeps} ({r.sweep_ms}) | "
              f"{r.cpu:.2f} / {r.cpu_events:.2f} / {rest:.2f} | "
              f"{100 * r.cpu / r.window:.3f} / {100 * rest / r.window:.3f} | "
              f"{r.cpu / r.window * 3600:.1f} / {rest / r.window * 3600:.1f} | "
              f"{r.rss_kb / 1024:.1f} | {r.hwm_kb / 1024:.1f} | {r.events_per_s:,.1f} |")


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strays", type=int, default=150, help="strays per latency run")
    ap.add_argument("--gap", type=float, default=0.05,
                    help="random pause 0..gap s between strays with events on")
    ap.add_argument("--timeout", type=float, default=5.0, help="a stray alive this long: missed")
    ap.add_argument("--window", type=float, default=60.0, help="cost window, seconds")
    ap.add_argument("--interval", type=float, default=60.0, help="sweep interval for the cost")
    ap.add_argument("--few", type=int, default=1000)
    ap.add_argument("--many", type=int, default=20000)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_daemon: needs root (users, the daemon, mount namespaces)", file=sys.stderr)
        return EX_NOPERM
    reason = probe()
    if reason:
        print(f"bench_daemon: proc connector unavailable: {reason}", file=sys.stderr)
        return EX_UNAVAILABLE
    made: list[User] = []
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    # tmpfs: the fallback audit file fsyncs every record; the VM's disk is not what we measure.
    work = Path(tempfile.mkdtemp(prefix="pbdaemon", dir="/dev/shm"))
    daemons: list[Daemon] = []
    try:
        os.chmod(work, 0o700)
        (work / "state" / "jobs").mkdir(parents=True, mode=0o700)
        os.chmod(work / "state", 0o700)
        strays, other = make_user(made), make_user(made)
        lat: list[Latency] = []
        if not args.skip_latency:
            ev = Daemon(work, "events", write_policy(work, "events", events=True, sweep="10m"),
                        strays.uid)
            daemons.append(ev.start())
            lat.append(measure_latency(ev, "idle", "events on, sweep 10 min", strays,
                                       args.strays, args.gap, args.timeout, None))
            lat.append(measure_latency(ev, "fork storm", "events on, sweep 10 min", strays,
                                       args.strays, args.gap, args.timeout, other))
            ev.stop()
            poll = Daemon(work, "poll", write_policy(work, "poll", events=False, sweep="1s",
                                             grace="500ms"),
                          strays.uid)
            daemons.append(poll.start())
            # A random pause up to one sweep interval, so strays do not phase-lock to sweeps.
            lat.append(measure_latency(poll, "idle", "events off, sweep 1 s", strays,
                                       args.strays, 1.0, args.timeout, None))
            poll.stop()
            print_latency(lat, args.timeout)
        if not args.skip_cost:
            cost = []
            with pid_max_at_least(max(args.few, args.many) + count_procs() + 8192):
                for n in (args.few, args.many):
                    cost.append(measure_cost(work, strays, other, n, args.window, args.interval))
            print_cost(cost, args.interval)
        print(f"\nkernel {os.uname().release}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f} at the end; other users' processes ran "
              "meanwhile (the machine is shared), so 'idle' means no load of ours.")
    finally:
        for d in daemons:
            d.stop()
        _users.remove_users(made, UID_LOW)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

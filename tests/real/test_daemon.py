"""`pruned run`, the daemon, end to end: a real process speaking sd_notify to a socket the test
binds, acting on real strays of users the fixture made (always scoped with --uid).

READY=1 only after the self-check, WATCHDOG=1 per completed sweep, STATUS= lines; strays made
after start die by the periodic sweep and, separately, by the event path alone (min_age
honoured by a re-check); SIGHUP keeps the last good policy or applies a good new one; SIGTERM
stops cleanly; a bad policy exits 78; without the proc connector it polls; a fork storm does
not blind it; the metrics textfile is replaced atomically and reports real sweeps and reloads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pruned.exitcodes import EX_CONFIG, EX_SOFTWARE
from pruned.jobs.history import JobHistory
from tests.fixtures.cluster import in_ci
from tests.fixtures.paths import REPO
from tests.fixtures.users import User, alive, daemon_as, run_as
from tests.unit.test_metrics import conventions, parse

pytestmark = pytest.mark.root

FAR = "10m"  # a periodic sweep so far away that only the event path can act in a test


# ------------------------------------------------------------------ helpers


def policy_text(tmp: Path, **over: Any) -> str:
    """The test policy as YAML (JSON is YAML 1.2), one top-level key per line; `over`
    replaces top-level keys."""
    state = tmp / "state"
    (state / "jobs").mkdir(parents=True, mode=0o700, exist_ok=True)
    state.chmod(0o700)
    (state / "jobs").chmod(0o700)
    body: dict[str, Any] = {
        "version": 1,
        "mode": "enforce",
        "min_age": "0s",
        "kill": {"grace": "1s", "brake": {"max_uids": 3}},
        "jobs": {"sources": ["statedir"], "state_dir": str(state)},
        "audit": {"fallback_file": str(tmp / "audit.jsonl")},
        "metrics": {"textfile": str(tmp / "pruned.prom")},
        "cleanup": {"enabled": False},
        "schedule": {"sweep": "2s"},
        "events": False,
    }
    body.update(over)
    lines = ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in body.items())
    return "{\n" + lines + "\n}\n"


def write_policy(tmp: Path, **over: Any) -> Path:
    p = tmp / "policy.yaml"
    p.write_text(policy_text(tmp, **over))
    return p


class Notify:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET; a thread keeps
    every datagram with the monotonic time it arrived."""

    def __init__(self) -> None:
        # sun_path holds 108 bytes: pytest's tmp_path can be longer, so a short dir of our own.
        self.dir = tempfile.mkdtemp(prefix="prn-")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.got.append((time.monotonic(), data.decode()))

    def lines(self) -> list[tuple[float, str]]:
        """Every KEY=VALUE line received, with its datagram's arrival time."""
        return [(t, line) for t, msg in list(self.got) for line in msg.split("\n") if line]

    def wait(self, pred: Callable[[str], bool], timeout: float, after: float = 0.0) -> float:
        """Arrival time of the first line after `after` matching pred; fails on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in self.lines():
                if t >= after and pred(line):
                    return t
            time.sleep(0.02)
        pytest.fail(f"no matching notify line within {timeout}s; got {self.lines()!r}")

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)
        shutil.rmtree(self.dir, ignore_errors=True)


class Running:
    """One `pruned run` process and how to read what it said."""

    def __init__(self, proc: subprocess.Popen, notify: Notify, policy: Path, tmp: Path) -> None:
        self.proc = proc
        self.notify = notify
        self.policy = policy
        self.tmp = tmp

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self, timeout: float = 30.0) -> float:
        """Wait for READY=1 and the end of the first sweep (its WATCHDOG=1)."""
        deadline = time.monotonic() + timeout
        while not any(s == "READY=1" for _, s in self.notify.lines()):
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no READY=1 within {timeout}s: {self.stderr()}")
            time.sleep(0.02)
        t = self.notify.wait(lambda s: s == "READY=1", 1)
        self.notify.wait(lambda s: s == "WATCHDOG=1", timeout, after=t)
        return t

    def audit(self) -> list[dict[str, str]]:
        """This daemon's audit records: journald (when it took them) plus the fallback file."""
        recs: list[dict[str, str]] = []
        fallback = self.tmp / "audit.jsonl"
        if fallback.exists():
            for line in fallback.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("_PID") == str(self.pid):
                    recs.append(rec)
        if shutil.which("journalctl"):
            r = subprocess.run(
                [
                    "journalctl",
                    "-o",
                    "json",
                    "--no-pager",
                    "-q",
                    f"_PID={self.pid}",
                    "SYSLOG_IDENTIFIER=pruned",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            for line in r.stdout.splitlines():
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    # The pid may be an old one's: our policy path is in our command line.
                    if str(self.policy) in str(rec.get("_CMDLINE", "")):
                        recs.append(rec)
        return recs

    def wait_audit(self, timeout: float = 10.0, **match: str) -> dict[str, str]:
        """The first record whose fields equal `match`; fails on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for rec in self.audit():
                if all(rec.get(k) == v for k, v in match.items()):
                    return rec
            if time.monotonic() > deadline:
                events = [r.get("PRUNED_EVENT") for r in self.audit()]
                pytest.fail(f"no audit record {match} within {timeout}s; saw {events}")
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM by pid; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return (self.tmp / "stderr").read_text()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """start_daemon(policy, uids, prefix=(), env={}) -> Running; every daemon is SIGKILLed
    by its pid if still alive at the end, and its socket removed."""
    started: list[Running] = []

    def start(
        policy: Path,
        uids: list[int],
        *,
        prefix: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Running:
        assert uids, "the daemon under test must always be scoped with --uid"
        notify = Notify()
        full_env = {**os.environ, "NOTIFY_SOCKET": notify.path, "PYTHONPATH": str(REPO)}
        full_env.pop("WATCHDOG_USEC", None)
        full_env.update(env or {})
        argv = [
            *prefix,
            sys.executable,
            "-m",
            "pruned.cli",
            "run",
            "--policy",
            str(policy),
            "--uid",
            *map(str, uids),
        ]
        with open(tmp_path / "stderr", "w") as err:
            proc = subprocess.Popen(
                argv, env=full_env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=err, stderr=err
            )
        r = Running(proc, notify, policy, tmp_path)
        started.append(r)
        return r

    try:
        yield start
    finally:
        for r in started:
            if r.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(r.proc.pid, signal.SIGKILL)
                r.proc.wait(10)
            r.notify.close()


# Root double-forks (setsid between the forks, like daemon_as) and the grandchild drops to the
# user before exec: its pid is known from its fork on. daemon_as finds its stray by argv[0]
# after bash's `exec -a`, and an event-driven daemon can kill the stray before that.
PLANT = """
import os, sys
uid, gid = int(sys.argv[1]), int(sys.argv[2])
name, user, home = sys.argv[3:6]
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    pid = os.fork()
    if pid == 0:
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 1024)
        os.chdir(home)
        os.initgroups(user, gid)
        os.setgid(gid)
        os.setuid(uid)
        os.execv("/bin/sleep", [name, "600"])
    os.write(w, str(pid).encode())
    os._exit(0)
os.close(w)
os.wait()
print(os.read(r, 32).decode())
"""


def plant_stray(user: User, name: str) -> int:
    """A double-forked, setsid `sleep` of user with argv[0] `name`; its pid."""
    r = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            PLANT,
            str(user.uid),
            str(user.gid),
            name,
            user.name,
            user.home,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    return int(r.stdout)


def wait_dead(pid: int, timeout: float) -> float | None:
    """Monotonic time pid was first seen dead, or None if it outlived timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return time.monotonic()
        time.sleep(0.02)
    return None


# ------------------------------------------------------------------ lifecycle


def test_ready_after_self_check_then_watchdog_per_sweep(tmp_path, make_user, start_daemon):
    user = make_user("prd")
    # WATCHDOG_USEC=2s halves the 10m sweep to 1s: WATCHDOG=1 comes from each completed sweep.
    d = start_daemon(
        write_policy(tmp_path, schedule={"sweep": FAR}),
        [user.uid],
        env={"WATCHDOG_USEC": "2000000"},
    )
    t_ready = d.ready()
    lines = d.notify.lines()
    assert lines[0][1] == "READY=1", f"READY=1 must be the first thing said: {lines}"
    time.sleep(3.5)
    dogs = [t for t, s in d.notify.lines() if s == "WATCHDOG=1"]
    assert all(t >= t_ready for t in dogs)
    assert len(dogs) >= 3, f"expected a WATCHDOG=1 about every second: {d.notify.lines()}"
    statuses = [s for _, s in d.notify.lines() if s.startswith("STATUS=sweep ")]
    assert len(statuses) >= len(dogs), "every WATCHDOG=1 comes with a STATUS= of its sweep"
    assert "processes" in statuses[-1] and "events off" in statuses[-1]
    assert d.stop() == 0


def test_failed_self_check_never_says_ready(tmp_path, make_user, start_daemon):
    """An empty /proc (a tmpfs over it in a private mount namespace) fails the self-check."""
    user = make_user("prd")
    policy = write_policy(tmp_path)
    d = start_daemon(
        policy,
        [user.uid],
        prefix=(
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs none /proc && exec "$@"',
            "sh",
        ),
    )
    assert d.proc.wait(30) == EX_SOFTWARE
    assert "self-check failed" in d.stderr()
    time.sleep(0.3)
    assert not any(s == "READY=1" for _, s in d.notify.lines())


def test_sigterm_says_stopping_and_exits_zero(tmp_path, make_user, start_daemon):
    user = make_user("prd")
    d = start_daemon(write_policy(tmp_path), [user.uid])
    d.ready()
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5, "SIGTERM must stop the daemon promptly"
    d.notify.wait(lambda s: s == "STOPPING=1", 2)
    d.wait_audit(PRUNED_EVENT="daemon_stopped")


def test_bad_policy_at_start_exits_78(tmp_path, make_user, start_daemon):
    user = make_user("prd")
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nmode: enforce\nmin_age: 0s\nbogus_key: 1\n")
    d = start_daemon(policy, [user.uid])
    assert d.proc.wait(30) == EX_CONFIG
    assert f"{policy}:4: bogus_key" in d.stderr()
    assert "Traceback" not in d.stderr()
    time.sleep(0.3)
    assert not any(s == "READY=1" for _, s in d.notify.lines())


# ------------------------------------------------------------------ killing strays


def test_periodic_sweep_kills_new_stray(tmp_path, make_user, start_daemon):
    user = make_user("prd")
    d = start_daemon(write_policy(tmp_path, events=False, schedule={"sweep": "2s"}), [user.uid])
    d.ready()
    pid = plant_stray(user, "prd_sweep_stray")
    assert wait_dead(pid, 10), "the periodic sweep did not kill the stray"
    rec = d.wait_audit(PRUNED_EVENT="process_killed", PRUNED_PID=str(pid))
    assert rec["PRUNED_UID"] == str(user.uid) and rec["PRUNED_CLASS"] == "stray"
    assert not rec["PRUNED_SWEEP_ID"].startswith("event-")
    assert d.stop() == 0


def test_event_path_kills_new_stray_between_sweeps(tmp_path, make_user, start_daemon):
    user = make_user("prd")
    d = start_daemon(write_policy(tmp_path, events=True, schedule={"sweep": FAR}), [user.uid])
    d.ready()
    assert any("events on" in s for _, s in d.notify.lines())
    t0 = time.monotonic()
    pid = plant_stray(user, "prd_event_stray")
    died = wait_dead(pid, 5)
    assert died is not None, "the event path did not kill the stray within 5 s"
    rec = d.wait_audit(PRUNED_EVENT="process_killed", PRUNED_PID=str(pid))
    assert rec["PRUNED_SWEEP_ID"].startswith("event-"), rec
    assert died - t0 < 5
    # The event path's kills count in the metrics' running totals too.
    prom = tmp_path / "pruned.prom"
    deadline = time.monotonic() + 5
    while 'pruned_actions_total{action="kill",result="done"} 1' not in prom.read_text():
        assert time.monotonic() < deadline, prom.read_text()
        time.sleep(0.05)
    assert d.stop() == 0


def test_sweeps_between_full_reads_are_incremental_with_events_on(tmp_path, make_user,
                                                                   start_daemon):
    """The daemon feeds its event batches to the ProcCache: after the first full read, the
    sweeps re-read only what changed until schedule.full_sweep comes round; without events
    every sweep is full."""
    user = make_user("prd")
    d = start_daemon(write_policy(tmp_path, events=True, schedule={"sweep": "1500ms",
                                                                   "full_sweep": "4s"}),
                     [user.uid])  # fmt: skip
    d.ready()
    deadline = time.monotonic() + 30
    while True:
        statuses = [s for _, s in d.notify.lines() if s.startswith("STATUS=sweep ")]
        fulls = [s for s in statuses if "; full read (" in s]
        if any("incremental read:" in s for s in statuses) and len(fulls) >= 2:
            break
        assert time.monotonic() < deadline, statuses
        time.sleep(0.1)
    assert "full read (events started)" in fulls[0]
    assert any("full_sweep interval" in s or "events lost" in s for s in fulls[1:]), fulls
    pid = plant_stray(user, "prd_incr_stray")  # still judged and killed (by either path)
    assert wait_dead(pid, 10)
    assert d.stop() == 0
    d2 = start_daemon(write_policy(tmp_path, events=False, schedule={"sweep": "1500ms"}),
                      [user.uid])  # fmt: skip
    d2.ready()
    deadline = time.monotonic() + 10
    while len(st := [s for _, s in d2.notify.lines() if s.startswith("STATUS=sweep ")]) < 2:
        assert time.monotonic() < deadline, st
        time.sleep(0.1)
    assert all("; full read (events off)" in s for s in st), st
    assert d2.stop() == 0


def test_sighup_turning_events_on_starts_the_event_path(tmp_path, make_user, start_daemon):
    user = make_user("prd")
    d = start_daemon(write_policy(tmp_path, events=False, schedule={"sweep": FAR}), [user.uid])
    d.ready()
    write_policy(tmp_path, events=True, schedule={"sweep": FAR})
    t_hup = time.monotonic()
    os.kill(d.pid, signal.SIGHUP)
    d.wait_audit(PRUNED_EVENT="config_loaded")
    d.notify.wait(lambda s: s == "READY=1", 5, after=t_hup)  # the reload (and subscribe) is done
    pid = plant_stray(user, "prd_events_after_hup")
    assert wait_dead(pid, 5), "events: true on reload must start the event path"
    rec = d.wait_audit(PRUNED_EVENT="process_killed", PRUNED_PID=str(pid))
    assert rec["PRUNED_SWEEP_ID"].startswith("event-"), rec
    assert d.stop() == 0


def test_event_path_waits_for_min_age(tmp_path, make_user, start_daemon):
    """min_age 2s: the event path holds a new stray, re-checks it when it comes of age and
    kills it then: not at once, and not only at the (far) next sweep."""
    user = make_user("prd")
    d = start_daemon(
        write_policy(tmp_path, events=True, min_age="2s", schedule={"sweep": FAR}), [user.uid]
    )
    d.ready()
    pid = plant_stray(user, "prd_young_stray")
    with open(f"/proc/{pid}/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    started = start_ticks / os.sysconf("SC_CLK_TCK")  # seconds since boot
    died = wait_dead(pid, 8)
    assert died is not None, "the young stray was never re-checked"
    age_at_death = time.clock_gettime(time.CLOCK_BOOTTIME) - (time.monotonic() - died) - started
    assert 1.8 <= age_at_death <= 5.0, f"killed at age {age_at_death:.2f}s, min_age is 2s"
    rec = d.wait_audit(PRUNED_EVENT="process_killed", PRUNED_PID=str(pid))
    assert rec["PRUNED_SWEEP_ID"].startswith("event-")
    assert d.stop() == 0


# ------------------------------------------------------------------ reload


def test_sighup_bad_policy_keeps_old_one_good_policy_applies(tmp_path, make_user, start_daemon):
    user = make_user("prd")
    policy = write_policy(tmp_path, events=False, schedule={"sweep": "2s"})
    d = start_daemon(policy, [user.uid])
    d.ready()

    # A broken rewrite: every line as before, plus an unknown key on line 3.
    good = policy.read_text().splitlines(keepends=True)
    policy.write_text("".join(good[:2]) + ' "mode_typo": "report",\n' + "".join(good[2:]))
    os.kill(d.pid, signal.SIGHUP)
    rec = d.wait_audit(PRUNED_EVENT="config_rejected")
    assert f"{policy}:3" in rec["PRUNED_REASON"], rec
    assert "mode_typo" in rec["MESSAGE"]
    d.notify.wait(lambda s: s.startswith("STATUS=policy rejected"), 5)
    assert d.proc.poll() is None
    # The old (enforcing) policy is still in force.
    pid = plant_stray(user, "prd_after_bad_hup")
    assert wait_dead(pid, 8), "after a rejected reload the old policy must still kill"
    d.wait_audit(PRUNED_EVENT="process_killed", PRUNED_PID=str(pid))

    # A good changed policy (report mode) is applied: the next stray is only reported.
    write_policy(tmp_path, events=False, schedule={"sweep": "2s"}, mode="report")
    t_hup = time.monotonic()
    os.kill(d.pid, signal.SIGHUP)
    d.wait_audit(PRUNED_EVENT="config_loaded")
    d.notify.wait(lambda s: s == "READY=1", 5, after=t_hup)
    pid = daemon_as(user, "prd_after_good_hup")
    d.wait_audit(PRUNED_EVENT="would_kill", PRUNED_PID=str(pid))
    assert alive(pid), "report mode must not kill"
    assert d.stop() == 0


def exec_reload_argv(pid: int) -> list[str]:
    """The unit's ExecReload= line as systemd would run it for MAINPID=pid, with this
    checkout's pruned in place of the installed one."""
    unit = (REPO / "systemd" / "pruned.service").read_text()
    [line] = [ln for ln in unit.splitlines() if ln.startswith("ExecReload=")]
    exe, *args = line.removeprefix("ExecReload=").split()
    assert os.path.basename(exe) == "pruned", line
    return [sys.executable, "-m", "pruned.cli", *(a.replace("$MAINPID", str(pid)) for a in args)]


def reload_as_systemd(pid: int, env: dict[str, str], *extra: str):
    return subprocess.run([*exec_reload_argv(pid), *extra], capture_output=True, text=True,
                          timeout=90, cwd=REPO, env={**os.environ, **env})


def test_reload_fails_visibly_when_the_policy_is_rejected(tmp_path, make_user, start_daemon):
    """`systemctl reload pruned` runs ExecReload=: it exits 78 with the offending line when the
    daemon rejects the policy (the journal gets both that and config_rejected), 0 once a good
    one is applied; the daemon keeps each policy it applies as the last good one."""
    from pruned.policy import lastgood

    user = make_user("prd")
    store = tmp_path / "store"
    env = {lastgood.STORE_ENV: str(store)}
    policy = write_policy(tmp_path, events=False, schedule={"sweep": "2s"})
    d = start_daemon(policy, [user.uid], env=env)
    d.ready()
    first = lastgood.current(str(policy), str(store))
    assert first is not None and first.saved_by == "daemon"
    assert Path(first.files[0]).read_text() == policy.read_text()

    good = policy.read_text()
    policy.write_text(good.replace('"mode": "enforce"', '"mode": "enforcing"'))
    r = reload_as_systemd(d.pid, env)
    assert r.returncode == EX_CONFIG, r.stdout + r.stderr
    assert f"{policy}:3: mode: expected one of report, enforce; got 'enforcing'" in r.stderr
    assert "keeps running with the last good one" in r.stderr
    rec = d.wait_audit(PRUNED_EVENT="config_rejected")
    assert f"{policy}:3" in rec["PRUNED_REASON"]
    assert d.proc.poll() is None
    assert lastgood.current(str(policy), str(store)).directory == first.directory
    pid = plant_stray(user, "prd_after_rejected_reload")  # the old, enforcing policy holds
    assert wait_dead(pid, 8)

    write_policy(tmp_path, events=False, schedule={"sweep": "2s"}, mode="report")
    r = reload_as_systemd(d.pid, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{policy} reloaded (mode report)" in r.stdout
    d.wait_audit(PRUNED_EVENT="config_loaded")
    now = lastgood.current(str(policy), str(store))
    assert now.directory != first.directory and '"report"' in Path(now.files[0]).read_text()
    assert d.stop() == 0
    assert not (store / f"reload-{d.pid}.json").exists()


def test_reload_without_an_answer_fails(tmp_path, make_user, start_daemon):
    """A daemon that cannot answer (stopped here) makes the reload fail, not pass silently."""
    from pruned.policy import lastgood

    user = make_user("prd")
    env = {lastgood.STORE_ENV: str(tmp_path / "store")}
    d = start_daemon(write_policy(tmp_path, schedule={"sweep": FAR}), [user.uid], env=env)
    d.ready()
    os.kill(d.pid, signal.SIGSTOP)
    try:
        r = reload_as_systemd(d.pid, env, "--timeout", "1")
    finally:
        os.kill(d.pid, signal.SIGCONT)
    assert r.returncode == 1 and "no answer from pruned" in r.stderr, r.stderr
    d.wait_audit(PRUNED_EVENT="config_loaded")  # the queued SIGHUP is handled once it runs
    assert d.stop() == 0


# ------------------------------------------------------------------ degraded event paths


def test_no_connector_falls_back_to_polling(tmp_path, make_user, start_daemon):
    """The proc connector exists only in the initial network namespace."""
    user = make_user("prd")
    d = start_daemon(
        write_policy(tmp_path, events=True, schedule={"sweep": "2s"}),
        [user.uid],
        prefix=("unshare", "--net"),
    )
    d.ready()
    statuses = [s for _, s in d.notify.lines() if s.startswith("STATUS=sweep")]
    assert "polling" in statuses[-1], statuses
    rec = d.wait_audit(PRUNED_EVENT="resync")
    assert "connector unavailable" in rec["MESSAGE"], rec
    pid = plant_stray(user, "prd_polled_stray")
    assert wait_dead(pid, 10), "the periodic sweep must still kill without events"
    rec = d.wait_audit(PRUNED_EVENT="process_killed", PRUNED_PID=str(pid))
    assert not rec["PRUNED_SWEEP_ID"].startswith("event-")
    assert d.stop() == 0


FORKER = """
import os
for _ in range({rounds}):
    kids = []
    for _ in range(100):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        kids.append(pid)
    for pid in kids:
        os.waitpid(pid, 0)
"""


def test_fork_storm_does_not_blind_the_event_path(tmp_path, make_user, start_daemon):
    """20,000 forks by a (whitelisted) user; a stray planted at the end of the burst dies by
    the event path or the resync after lost events, long before the next periodic sweep."""
    victim, storm = make_user("prd"), make_user("prf")
    d = start_daemon(
        write_policy(
            tmp_path, events=True, schedule={"sweep": FAR}, whitelist={"users": [storm.name]}
        ),
        [victim.uid, storm.uid],
    )
    d.ready()
    t0 = time.monotonic()
    forker = run_as(storm, ["/usr/bin/python3", "-S", "-c", FORKER.format(rounds=200)])
    try:
        assert forker.wait(60) == 0, "the forker (whitelisted) must not be touched"
    finally:
        if forker.poll() is None:
            os.kill(forker.pid, signal.SIGKILL)
            forker.wait()
    storm_secs = time.monotonic() - t0
    pid = plant_stray(victim, "prd_after_storm")
    assert wait_dead(pid, 20), f"stray after a {storm_secs:.1f}s fork storm was not killed"
    rec = d.wait_audit(PRUNED_EVENT="process_killed", PRUNED_PID=str(pid))
    if not rec["PRUNED_SWEEP_ID"].startswith("event-"):
        d.wait_audit(PRUNED_EVENT="resync")  # then events were lost and a resync caught it
    assert d.proc.poll() is None
    assert d.stop() == 0


# ------------------------------------------------------------------ metrics


def test_metrics_textfile_is_replaced_atomically(tmp_path, make_user, start_daemon):
    user = make_user("prd")
    prom = tmp_path / "pruned.prom"
    # Report mode keeps the stray alive, so every sweep counts it.
    d = start_daemon(
        write_policy(tmp_path, mode="report", schedule={"sweep": FAR}),
        [user.uid],
        env={"WATCHDOG_USEC": "1000000"},
    )  # a sweep every 0.5 s
    pid = daemon_as(user, "prd_metrics_stray")
    d.ready()
    seen: list[str] = []
    inodes: set[int] = set()
    stop = time.monotonic() + 3.0
    while time.monotonic() < stop:  # a reader racing the writer never sees half a file
        with contextlib.suppress(FileNotFoundError), open(prom) as f:
            inodes.add(os.fstat(f.fileno()).st_ino)
            seen.append(f.read())
        time.sleep(0.005)
    last_line = 'pruned_cleanup_items_total{result="would"} 0\n'
    assert seen and all(t.endswith(last_line) for t in seen), (
        "a reader saw a partial metrics file"
    )
    assert len(inodes) >= 2, "the file must be replaced (rename), not rewritten in place"
    text = prom.read_text()
    stray = [ln for ln in text.splitlines() if ln.startswith('pruned_processes{class="stray"}')]
    assert stray and int(stray[0].split()[1]) >= 1, text
    assert 'pruned_processes{class="system"}' in text
    assert 'pruned_decisions{action="kill",result="would"}' in text
    assert 'pruned_actions_total{action="kill",result="would"}' in text
    assert 'pruned_sweep_duration_seconds{kind="process"}' in text
    assert 'pruned_report_only{kind="process"} 0' in text and "pruned_brake_tripped 0" in text
    assert oct(prom.stat().st_mode & 0o777) == oct(0o644)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".pruned-")], "temp file left"
    assert alive(pid)
    assert d.stop() == 0


def _metrics(prom: Path) -> dict[tuple[str, tuple], float]:
    """The textfile as prometheus_client's parser reads it, after the conventions check."""
    text = prom.read_text()
    assert conventions(text) == [], text
    promtool = os.environ.get("PRUNED_PROMTOOL") or shutil.which("promtool")
    if promtool is None and in_ci():
        pytest.fail("CI=true but no promtool (scripts/promtool.sh gives one)", pytrace=False)
    if promtool is not None:  # scripts/test.sh takes it out of Debian's `prometheus` package
        r = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                           capture_output=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
    return parse(text)[1]


def _wait_metric(prom: Path, name: str, pred: Callable[[float], bool],
                 labels: tuple = (), timeout: float = 15.0) -> dict[tuple[str, tuple], float]:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            got = _metrics(prom)
            if pred(got.get((name, labels), float("nan"))):
                return got
        assert time.monotonic() < deadline, f"{name}{labels} never matched: {prom.read_text()}"
        time.sleep(0.1)


def test_metrics_of_real_sweeps_and_reloads(tmp_path, make_user, start_daemon):
    """A real enforcing daemon kills a stray and removes a ghost user's loose file; its
    textfile parses, follows the conventions, and says so; a rejected and then a good reload
    show in it."""
    from pruned import __version__

    user, ghost = make_user("prd"), make_user("prg")
    root = tmp_path / "root"
    root.mkdir()
    root.chmod(0o1777)
    junk = root / "ghost.dat"
    junk.write_bytes(b"x" * 5000)
    os.chown(junk, ghost.uid, ghost.gid)
    os.utime(junk, (time.time() - 7200,) * 2)
    # min_age 0s: a file's age counts from its ctime too, which the chown above made new.
    cleanup = {"enabled": True, "roots": [str(root)], "job_dirs": [], "min_age": "0s",
               "loose_files": True}
    prom = tmp_path / "pruned.prom"
    t0 = time.time()
    policy = write_policy(tmp_path, cleanup=cleanup, schedule={"sweep": "2s", "clean": "1s"})
    # The ghost's last job ended two hours ago: its loose files go (rules.cleanplan).
    history = JobHistory.load(str(tmp_path / "state"))
    history.mark_ended("77", ghost.uid, time.time() - 7200, time.time() - 8000)
    history.save()
    d = start_daemon(policy, [user.uid])
    d.ready()
    pid = plant_stray(user, "prd_metrics_kill")
    assert wait_dead(pid, 10), "the enforcing daemon must kill the stray"
    kd = (("action", "kill"), ("result", "done"))
    got = _wait_metric(prom, "pruned_actions_total", lambda v: v >= 1, kd)
    got = _wait_metric(prom, "pruned_cleanup_removed_bytes_total", lambda v: v >= 5000)
    assert not junk.exists(), "the file sweep must have removed the ghost's file"
    assert got[("pruned_build_info", (("version", __version__),))] == 1
    assert got[("pruned_enforce", ())] == 1
    assert got[("pruned_cleanup_enabled", ())] == 1
    assert got[("pruned_cleanup_removed_files_total", ())] >= 1
    assert got[("pruned_cleanup_items_total", (("result", "done"),))] >= 1
    for kind in ("process", "files"):
        k = (("kind", kind),)
        assert got[("pruned_sweeps_total", k)] >= 1
        assert got[("pruned_sweep_duration_seconds", k)] > 0, f"{kind} sweep duration not measured"
        assert t0 <= got[("pruned_sweep_last_success_timestamp_seconds", k)] <= time.time()
        assert got[("pruned_sweep_failures_total", k)] == 0
    for cls in ("system", "batch", "adopted", "whitelisted", "stray"):
        assert ("pruned_processes", (("class", cls),)) in got
    assert got[("pruned_config_last_reload_successful", ())] == 1
    loaded_at = got[("pruned_config_last_reload_success_timestamp_seconds", ())]
    assert t0 <= loaded_at <= time.time()
    assert t0 <= got[("pruned_start_time_seconds", ())] <= loaded_at

    # A rejected reload: 0, and the success timestamp stays that of the last good load.
    good = policy.read_text()
    policy.write_text(good.replace('"mode": "enforce"', '"mode": "enforce", "modee": 1'))
    os.kill(d.pid, signal.SIGHUP)
    d.wait_audit(PRUNED_EVENT="config_rejected")
    got = _wait_metric(prom, "pruned_config_last_reload_successful", lambda v: v == 0)
    assert got[("pruned_config_last_reload_success_timestamp_seconds", ())] == loaded_at
    # A good one in report mode: 1 again, a later timestamp, enforce 0.
    policy.write_text(good.replace('"mode": "enforce"', '"mode": "report"'))
    os.kill(d.pid, signal.SIGHUP)
    d.wait_audit(PRUNED_EVENT="config_loaded")
    got = _wait_metric(prom, "pruned_config_last_reload_successful", lambda v: v == 1)
    assert got[("pruned_config_last_reload_success_timestamp_seconds", ())] > loaded_at
    assert got[("pruned_enforce", ())] == 0
    # The counters survive the reload (they reset only when the daemon restarts).
    assert got[("pruned_actions_total", kd)] >= 1
    assert d.stop() == 0

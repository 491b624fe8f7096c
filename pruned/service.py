"""`pruned run`: the daemon behind systemd/pruned.service (Type=notify).

- READY=1 only after the policy loaded and a dry-run self-check sweep succeeded.
- WATCHDOG=1 only at the end of a completed process sweep, never from a timer: a hung
  sweep must let systemd's watchdog fire.
- STATUS= one line about the last sweep; STOPPING=1 on SIGTERM, then a clean exit.
- SIGHUP reloads the policy; a bad one is rejected (config_rejected in the journal) and the
  last good one stays. Each reload's verdict is written to `reload-<pid>.json` in the
  last-good store, where `pruned reload PID` (the unit's ExecReload=) waits for it: so
  `systemctl reload pruned` fails, with the errors, when the policy is rejected.
- Every policy it loads or reloads is kept as the last good one of its path
  (pruned.policy.lastgood), which `pruned-epilog` falls back to when the policy is broken.

Each periodic job has a thread of its own on the monotonic clock (pruned.ticker: a
realtime step cannot stall or bunch sweeps): the process sweep, the job refresh and the
file sweep. The main thread only waits for signals; handlers just queue a token.

A file walk can block in the kernel for good (a hung NFS server, a FUSE daemon that never
answers: the thread sleeps uninterruptibly). It holds only the file sweep's thread: the
process sweeps go on and keep feeding the watchdog, which therefore says "the process
sweep is healthy", the thing that must not stall, so a hung filesystem cannot get the
daemon restarted in a loop. Each process sweep checks the file sweep; one blocked in the
same syscall for FILES_STUCK_AFTER is reported once (`file_sweep_stuck`, with the path it
is blocked on, read from /proc/self/task/TID/syscall) and later file sweeps are skipped
until it returns (`file_sweep_returned`).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Collection

from pruned import __version__, log
from pruned.act.adopt import AdoptFailures
from pruned.act.audit import AuditSink, event_record, make_sink
from pruned.act.contain import remove_stale_quarantines
from pruned.act.kill import Survivors
from pruned.act.metrics import MetricsState, SweepMetrics
from pruned.exitcodes import EX_CONFIG, EX_OK, EX_SOFTWARE
from pruned.filesweep import CleanReport, learn_jobs, run_clean
from pruned.jobs.history import JobHistory
from pruned.jobs.source import read_jobs
from pruned.lineage import LineageMemory
from pruned.linux import connector as events
from pruned.linux import procfs
from pruned.linux.atomic import ensure_private_dir, write_atomic, write_json_atomic
from pruned.linux.blocked import Blocked, blocked_in
from pruned.linux.proccache import ProcCache
from pruned.model import JobView, Policy, Result
from pruned.policy import lastgood
from pruned.policy.facts import NodeFacts, resolve_facts
from pruned.policy.load import Loaded, PolicyError, load_path
from pruned.reactor import Reactor
from pruned.sweep import SweepReport, make_sources, observe, run_sweep
from pruned.text import printable
from pruned.ticker import Periodic

# A file sweep running this long and blocked in the same syscall on the same path at two
# checks STUCK_SAME_FOR apart is stuck: a slow walk moves on between checks, a hung one not.
FILES_STUCK_AFTER = 30.0
STUCK_SAME_FOR = 5.0
LOCK_WAIT = 5.0  # seconds the job refresh waits for the history a file sweep holds
STOP_WAIT = 30.0  # seconds a stop waits for a running process sweep (a file sweep: 2 s)


def sd_notify(message: str) -> bool:
    """Send one sd_notify datagram to $NOTIFY_SOCKET; False when there is none."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            # each KEY=VALUE line escaped (pruned.text): a STATUS= quoting a name cannot
            # fail to encode (no WATCHDOG=1 then) nor forge a second assignment
            s.sendto("\n".join(map(printable, message.split("\n"))).encode(), path)
        except OSError as e:
            log.warning(f"sd_notify failed: {e}")
            return False
    return True


def sweep_interval(policy: Policy, watchdog_usec: str | None) -> float:
    """The process-sweep interval: the policy's, but at most half the watchdog timeout,
    since WATCHDOG=1 comes only from completed sweeps."""
    interval = policy.sweep_interval
    if watchdog_usec and watchdog_usec.isdigit() and int(watchdog_usec) > 0:
        interval = min(interval, int(watchdog_usec) / 1e6 / 2)
    return interval


# ---------------------------------------------------------------- reload verdicts



def reload_status_path(pid: int) -> str:
    """Where the daemon with this pid writes the verdict of its latest (re)load."""
    return os.path.join(lastgood.store_dir(), f"reload-{pid}.json")


def read_reload_status(pid: int) -> dict | None:
    """The daemon's latest verdict {generation, ok, policy, mode, errors, time}, or None."""
    try:
        with open(reload_status_path(pid), "rb") as f:
            data = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("generation"), int) else None


def is_pruned_daemon(pid: int) -> bool:
    """Whether pid runs `pruned run` (by its command line; only root can signal a root one)."""
    argv = procfs.read_cmdline(pid).split(b"\0")  # bounded in size and time
    return b"run" in argv and any(b"pruned" in a for a in argv[:3])


def _remove_stale_statuses() -> None:
    """Verdict files of daemons that are gone (a crash leaves its file behind)."""
    store = lastgood.store_dir()
    with contextlib.suppress(OSError):
        for name in os.listdir(store):
            head, _, tail = name.partition("-")
            pid = tail.removesuffix(".json")
            if head == "reload" and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(store, name))


# The watcher's debounce. A stray is usually judged after two batches (its fork, while its
# parent still lives, then the parent's exit that orphans it), so this counts twice in
# fork -> killed. The reactor drains whatever queued meanwhile and sets the bulk aside at
# one stat read each (reactor._triage), so short batches cost little even in a fork storm;
# a process that forks and exits within the window is still never read.
EVENT_DELAY = 0.005

class Daemon:
    def __init__(self, policy_path: str, *, uids: Collection[int] | None = None) -> None:
        self.policy_path = policy_path
        self.uids = set(uids) if uids else None
        self.generation = 0  # reloads so far: the verdict file's counter
        loaded = load_path(policy_path)  # PolicyError -> exit 78 in run_daemon
        policy = loaded.policy
        self.keep_last_good(loaded)
        # One tuple, swapped whole on reload: a sweep never sees a new policy with old facts.
        self._ctx: tuple[Policy, NodeFacts, AuditSink] = (
            policy, resolve_facts(policy), make_sink(policy.audit_fallback))
        self.tokens: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.act_lock = threading.Lock()  # sweeps and event reactions never act at once
        self.files_lock = threading.Lock()  # history: job refresh and file sweeps
        self.history = JobHistory.load(self.policy.state_dir)
        self.jobs_cache: JobView | None = None
        # Sweeps, file sweeps, events and reloads all update it (it has its own lock).
        self.metrics = MetricsState(__version__, time.time())
        self.metrics.policy_applied(not policy.dry_run, policy.cleanup.enabled, time.time())
        self.survivors = Survivors()  # outlived SIGKILL: reported once, not re-killed
        self.jobs_list: list[Periodic] = []
        self.sweeper: Periodic | None = None
        self.cleaner: Periodic | None = None
        self.stuck: tuple[Blocked, float] | None = None  # the cleaner's last blocked sample
        self.stuck_reported: float | None = None  # running_since of the run reported stuck
        self.watcher: events.EventWatcher | None = None
        self.reactor: Reactor | None = None
        self.events_note = ""
        # Kept across sweeps and shared with the event path (pruned.lineage, act.adopt).
        self.lineage = LineageMemory()
        self.adopt_failures = AdoptFailures()
        # The last sweep's records, for steady-state sweeps while events run (proccache).
        self.proc_cache = ProcCache(policy.full_sweep_interval)

    # ------------------------------------------------------------ jobs

    def context(self) -> tuple[Policy, NodeFacts, AuditSink]:
        return self._ctx

    @property
    def policy(self) -> Policy:
        return self._ctx[0]

    @property
    def facts(self) -> NodeFacts:
        return self._ctx[1]

    @property
    def sink(self) -> AuditSink:
        return self._ctx[2]

    def jobs(self, fresh: bool) -> JobView:
        if fresh or self.jobs_cache is None:
            self.jobs_cache = read_jobs(make_sources(self.policy))
        return self.jobs_cache

    def refresh_jobs(self) -> None:
        """Learn job starts and ends (the back-mapping from a file's uid to an ended job).

        The history is the file sweep's too: while a file sweep holds it (for long when its
        walk is stuck on a hung filesystem) this refresh only updates the job view and
        learns next time; run_clean learns the same ends itself when it starts."""
        self.learn_from(self.jobs(True), wait=LOCK_WAIT, prune=True)

    def learn_from(self, view: JobView, *, wait: float = 0.0, prune: bool = False) -> None:
        """The history learns from `view` and is saved, if the file sweep lets go of it
        within `wait` seconds (else the next refresh or sweep learns the same). Called with
        the job refresh's view and with the view each process sweep judged by: a job whose
        stepds crashed is judged (and its leftovers killed) on that view, and once they are
        killed its cgroup names no owner any more."""
        if not self.files_lock.acquire(timeout=wait):
            return
        try:
            learn_jobs(self.history, view, time.time(), self.policy, prune=prune)
            self.history.save()
        finally:
            self.files_lock.release()

    # ------------------------------------------------------------ sweeps

    def process_sweep(self) -> SweepReport:
        policy, facts, sink = self.context()
        try:
            with self.act_lock:
                self.proc_cache.full_every = policy.full_sweep_interval
                report = run_sweep(policy, facts, sink, uids=self.uids, lineage=self.lineage,
                                   adopt_failures=self.adopt_failures, survivors=self.survivors,
                                   cache=self.proc_cache)
                # Quarantines a survivor kept until it died (no kill runs while we hold it).
                remove_stale_quarantines(policy.slurm.cgroup_root, own=True)
        except Exception:
            self.metrics.sweep_failed("process")
            self.write_metrics()
            raise
        self.jobs_cache = report.observation.jobs
        try:
            self.learn_from(report.observation.jobs)
        except OSError as e:  # never the reason a sweep fails: the refresh saves it again
            log.warning(f"state: could not save the job history after a sweep: {e}")
        plan = report.observation.plan
        reactor = self.reactor  # read once: a reload or stop may clear it meanwhile
        if reactor is not None:
            reactor.hold = plan.brake or ("; ".join(plan.report_only) or None)
            reactor.seed(report.observation.snap)
        self.metrics.process_sweep(SweepMetrics(
            "process",
            time.time(),
            report.duration,
            dict(report.by_class),
            dict(report.by_action_result),
            brake=plan.brake is not None,
            report_only=bool(plan.report_only),
        ))
        self.write_metrics()
        files_note = self.check_file_sweep()
        # Only a sweep that completed may feed the watchdog: it says the process sweep is
        # healthy. A stuck file sweep is reported, never a reason to stop feeding it.
        sd_notify(f"WATCHDOG=1\nSTATUS={self.status(report, files_note)}")
        return report

    def status(self, report: SweepReport, files_note: str = "") -> str:
        s = report.summary()
        read = self.proc_cache.last
        if read is not None:  # steady-state sweeps: how this one read /proc
            s += (f"; full read ({read.why})" if read.full
                  else f"; incremental read: {read.reread} re-read, {read.kept} kept")
        if self.events_note:
            s += f"; {self.events_note}"
        if files_note:
            s += f"; {files_note}"
        return s[:1000].replace("\n", " ")

    def check_file_sweep(self, now: float | None = None) -> str:
        """Called at the end of each process sweep: report a file sweep stuck in the kernel,
        once per stuck run. The STATUS= note about it, or ""."""
        cleaner = self.cleaner
        since = cleaner.running_since if cleaner is not None else None
        if cleaner is None or since is None or cleaner.native_id is None:
            self.stuck = None
            return ""
        now = time.monotonic() if now is None else now
        if self.stuck_reported == since:
            seen = self.stuck  # read once: the file sweep's thread clears it when it returns
            blocked = seen[0] if seen else None
            where = f" on {blocked.path}" if blocked and blocked.path else ""
            return f"file sweep stuck{where} for {now - since:.0f}s: file sweeps skipped"
        if now - since < FILES_STUCK_AFTER:
            return ""
        sample = blocked_in(cleaner.native_id)
        if sample is None or self.stuck is None or self.stuck[0] != sample:
            self.stuck = (sample, now) if sample is not None else None
            return ""
        if now - self.stuck[1] < STUCK_SAME_FOR:
            return ""
        self.stuck_reported = since
        msg = (f"file sweep blocked {sample.describe()} for {now - since:.0f}s: a hung "
               "filesystem (NFS server, FUSE daemon) under a cleanup root? File sweeps are "
               "skipped until it returns; process sweeps and the watchdog go on")
        log.warning(msg)
        self.sink.emit(event_record("file_sweep_stuck", msg, path=sample.path,
                                    syscall=sample.syscall, wchan=sample.wchan or "unknown",
                                    elapsed_ms=round((now - since) * 1000)))
        return f"file sweep stuck on {sample.path or sample.syscall}"

    def file_sweep(self) -> CleanReport | None:
        policy, facts, sink = self.context()
        if not policy.cleanup.enabled:
            return None
        cleaner = self.cleaner
        t0 = time.monotonic()
        try:
            with self.files_lock:
                report = run_clean(policy, facts, sink, history=self.history)
        except Exception:
            self.metrics.sweep_failed("files")
            self.write_metrics()
            raise
        finally:
            if cleaner is not None and self.stuck_reported == cleaner.running_since:
                took = time.monotonic() - t0
                self.stuck_reported = None
                self.stuck = None
                sink.emit(event_record("file_sweep_returned", f"the stuck file sweep returned "
                                       f"after {took:.0f}s; file sweeps go on",
                                       elapsed_ms=round(took * 1000)))
        done = [o for o in report.outcomes if o.result is Result.DONE]
        self.metrics.file_sweep(
            SweepMetrics(
                "files",
                time.time(),
                report.duration,
                report_only=report.report_only is not None,
                files_removed=sum(o.files for o in done),
                bytes_removed=sum(o.bytes for o in done),
            ),
            Counter(o.result.value for o in report.outcomes),
        )
        self.write_metrics()
        return report

    def on_event_report(self, report: SweepReport) -> None:
        """Kills by the event path count in the running totals too."""
        self.metrics.event_actions(report.by_action_result)
        self.write_metrics()

    def write_metrics(self) -> None:
        path = self.policy.metrics_textfile
        if not path:
            return
        try:
            text = self.metrics.text()
            write_atomic(path, text.encode(), 0o644, durable=False)
        except OSError as e:
            log.warning(f"cannot write metrics {path}: {e.strerror}")

    def self_check(self) -> None:
        """A dry-run observation of the whole node; raises if anything cannot be read."""
        obs = observe(self.policy, self.facts, uids=self.uids)
        if not obs.snap.procs:
            raise RuntimeError("self-check: /proc shows no processes")

    # ------------------------------------------------------------ events

    def start_events(self) -> None:
        """Start the event path if the policy wants it and it is not running (also on reload)."""
        if not self.policy.events:
            self.stop_events()
            self.events_note = "events off by policy: polling only"
            return
        if self.watcher is not None:
            return
        why = events.probe()  # already "proc connector unavailable: <why>"
        if why is not None:
            self.events_note = f"events unavailable ({why}): polling only"
            self.sink.emit(event_record("resync", f"{why}; falling back to polling every sweep",
                                        reason=why))
            return
        self.reactor = Reactor(self.context, self.jobs, self.act_lock, uids=self.uids,
                               on_report=self.on_event_report, lineage=self.lineage,
                               adopt_failures=self.adopt_failures).start()
        self.watcher = events.EventWatcher(self.on_pids, self.on_lost, delay=EVENT_DELAY,
                                           parents=True).start()  # fmt: skip
        self.proc_cache.attach()  # listening now: the next full sweep can found the cache
        self.events_note = "events on"

    def on_pids(self, changed: set[int], exited: set[int],
                parents: dict[int, int] | None = None) -> None:
        """One event batch (watcher thread, never blocks): for the cache, then the reactor."""
        self.proc_cache.mark(changed, exited)
        reactor = self.reactor
        if reactor is not None:
            reactor.on_pids(changed, exited, parents)

    def stop_events(self) -> None:
        self.proc_cache.detach()
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self.reactor is not None:
            self.reactor.stop()
            self.reactor = None

    def on_lost(self, reason: str) -> None:
        """Events were lost: a full sweep right now catches whatever they would have shown."""
        self.proc_cache.lost(reason)
        reactor = self.reactor
        if reactor is not None:
            reactor.lost()
        self.sink.emit(event_record("resync", f"{reason}: full resync sweep", reason=reason))
        # At most one resync waits; a loss during a running sweep makes one more after it.
        if self.sweeper is not None:
            self.sweeper.kick()

    # ------------------------------------------------------------ lifecycle

    def start_jobs(self) -> None:
        """The three periodic jobs, each on its own thread. Intervals are read from the
        current policy after every run (and on reload). The first
        process sweep and job refresh run now; the first file sweep one interval later."""
        self.sweeper = Periodic("sweep", self.process_sweep, lambda: sweep_interval(
            self.policy, os.environ.get("WATCHDOG_USEC")))
        refresher = Periodic("jobs", self.refresh_jobs, lambda: self.policy.jobs_interval)
        self.cleaner = Periodic("clean", self.file_sweep, lambda: self.policy.clean_interval,
                                delay=self.policy.clean_interval)
        self.jobs_list = [self.sweeper, refresher, self.cleaner]
        for job in self.jobs_list:
            job.start()

    def stop_jobs(self) -> None:
        """Stop the jobs; wait for a running process sweep, not for a file walk that may
        be stuck in the kernel for good (its thread is a daemon thread)."""
        for job in self.jobs_list:
            job.stop()
        for job in self.jobs_list:
            if not job.join(STOP_WAIT if job is self.sweeper else 2.0):
                log.warning(f"stopping: the {job.name} job is still running; not waiting")

    def keep_last_good(self, loaded: Loaded) -> None:
        """Keep a policy that passed validation for the epilog to fall back to."""
        if not lastgood.keeps(self.policy_path):
            return
        try:
            lastgood.save(self.policy_path, loaded.contents, saved_by="daemon")
        except (OSError, lastgood.LastGoodError) as e:
            log.warning(f"cannot keep the policy as the last good one for pruned-epilog: "
                        f"{getattr(e, 'strerror', None) or e}")

    def report_reload(self, ok: bool, errors: list[str]) -> None:
        """The verdict of the latest (re)load, for `pruned reload` (ExecReload=) to wait on."""
        mode = "report" if self.policy.dry_run else "enforce"
        status = {"pid": os.getpid(), "generation": self.generation, "ok": ok,
                  "policy": self.policy_path, "mode": mode, "errors": errors[:100],
                  "time": time.time()}
        try:
            ensure_private_dir(lastgood.store_dir())
            write_json_atomic(reload_status_path(os.getpid()), status)
        except OSError as e:
            log.warning(f"cannot write the reload verdict for `pruned reload`: {e.strerror}")

    def reload(self) -> None:
        self.generation += 1
        try:
            loaded = load_path(self.policy_path)
            policy = loaded.policy
            ctx = (policy, resolve_facts(policy), make_sink(policy.audit_fallback))
        except Exception as e:  # PolicyError, or a bug: either way the old policy stays
            errors = (e.errors if isinstance(e, PolicyError)
                      else [f"{self.policy_path}: internal error: {type(e).__name__}: {e}"])
            where = errors[0] if errors else self.policy_path
            msg = (f"policy {self.policy_path} rejected, keeping the last good one: "
                   + " | ".join(errors[:20]))
            log.warning(msg)
            self.sink.emit(event_record("config_rejected", msg, path=self.policy_path,
                                        reason=where, errors=len(errors)))
            sd_notify(f"STATUS=policy rejected ({where}); running with the last good one")
            self.report_reload(False, errors)
            self.metrics.reload_rejected()
            self.write_metrics()
            return
        self._ctx = ctx
        self.keep_last_good(loaded)
        mode = "report" if policy.dry_run else "enforce"
        self.sink.emit(event_record("config_loaded", f"policy {self.policy_path} loaded "
                                    f"(mode {mode})", path=self.policy_path))
        for job in self.jobs_list:
            job.reschedule()  # a shorter interval takes effect now, not after the old one
        self.start_events()
        self.report_reload(True, [])
        self.metrics.policy_applied(not policy.dry_run, policy.cleanup.enabled, time.time())
        self.write_metrics()

    def run(self) -> int:
        try:
            self.self_check()
        except Exception as e:
            log.error(f"self-check failed: {type(e).__name__}: {e}")
            return EX_SOFTWARE
        for sig, token in ((signal.SIGHUP, "reload"), (signal.SIGTERM, "stop"),
                           (signal.SIGINT, "stop")):
            signal.signal(sig, lambda _s, _f, t=token: self.tokens.put(t))
        self.start_events()
        mode = "report" if self.policy.dry_run else "enforce"
        self.sink.emit(event_record("daemon_started", f"pruned started (mode {mode}, policy "
                                    f"{self.policy_path}; {self.events_note})",
                                    path=self.policy_path))
        _remove_stale_statuses()
        self.report_reload(True, [])
        self.write_metrics()  # every series at 0 before the first sweep
        sd_notify(f"READY=1\nSTATUS=ready (mode {mode}); first sweep running")
        self.start_jobs()  # the first process sweep and job refresh run now
        while True:
            # Python runs signal handlers in the main thread, but the kernel may hand SIGHUP
            # to a worker thread (after a SIGSTOP/SIGCONT, say); then nothing interrupts a
            # blocking get(). Waking every second bounds how late a reload (which
            # `pruned reload` waits for) or a stop can be.
            try:
                token = self.tokens.get(timeout=1.0)
            except queue.Empty:
                continue
            if token == "reload":
                # sd_notify(3): RELOADING=1 carries the CLOCK_MONOTONIC time of the request.
                sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
                self.reload()
                sd_notify("READY=1")
            elif token == "stop":
                break
        sd_notify("STOPPING=1\nSTATUS=stopping")
        self.stop_events()
        self.stop_jobs()
        if self.files_lock.acquire(timeout=2.0):
            try:
                self.history.save()
            finally:
                self.files_lock.release()
        else:  # a file sweep stuck in the kernel holds it; the last refresh saved it
            log.warning("stopping: the file sweep holds the job history; not saved again")
        with contextlib.suppress(OSError):
            os.unlink(reload_status_path(os.getpid()))
        self.sink.emit(event_record("daemon_stopped", "pruned stopped"))
        return EX_OK


def run_daemon(policy_path: str, uids: Collection[int] | None = None) -> int:
    try:
        daemon = Daemon(policy_path, uids=uids)
    except PolicyError as e:
        for line in e.errors:
            log.error(line)
        return EX_CONFIG
    return daemon.run()

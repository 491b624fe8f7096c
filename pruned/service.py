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

APScheduler runs the sweeps in worker threads (BackgroundScheduler); the main thread only
waits for signals. Signal handlers just queue a token: nothing runs inside a handler that
could meet the scheduler's own locks half-taken.
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

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from pruned import __version__, log
from pruned.act.audit import AuditSink, event_record, make_sink
from pruned.act.metrics import MetricsState, SweepMetrics
from pruned.exitcodes import EX_CONFIG, EX_OK, EX_SOFTWARE
from pruned.filesweep import CleanReport, learn_jobs, run_clean
from pruned.jobs.history import JobHistory
from pruned.jobs.source import read_jobs
from pruned.linux import connector as events
from pruned.linux import procfs
from pruned.linux.atomic import ensure_private_dir, write_atomic, write_json_atomic
from pruned.linux.proccache import ProcCache
from pruned.model import JobView, Policy, Result
from pruned.policy import lastgood
from pruned.policy.facts import NodeFacts, resolve_facts
from pruned.policy.load import Loaded, PolicyError, load_path
from pruned.reactor import Reactor
from pruned.sweep import SweepReport, make_sources, observe, run_sweep
from pruned.text import printable


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
        self.resync_pending = threading.Event()
        self.scheduler: BackgroundScheduler | None = None
        self.watcher: events.EventWatcher | None = None
        self.reactor: Reactor | None = None
        self.events_note = ""
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
        """Learn job starts and ends (the back-mapping from a file's uid to an ended job)."""
        view = self.jobs(True)
        with self.files_lock:
            learn_jobs(self.history, view, time.time(), self.policy, prune=True)
            self.history.save()

    # ------------------------------------------------------------ sweeps

    def process_sweep(self) -> SweepReport:
        policy, facts, sink = self.context()
        try:
            with self.act_lock:
                self.proc_cache.full_every = policy.full_sweep_interval
                report = run_sweep(policy, facts, sink, uids=self.uids, cache=self.proc_cache)
        except Exception:
            self.metrics.sweep_failed("process")
            self.write_metrics()
            raise
        self.jobs_cache = report.observation.jobs
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
        # Only a sweep that completed may feed the watchdog.
        sd_notify(f"WATCHDOG=1\nSTATUS={self.status(report)}")
        return report

    def status(self, report: SweepReport) -> str:
        s = report.summary()
        read = self.proc_cache.last
        if read is not None:  # steady-state sweeps: how this one read /proc
            s += (f"; full read ({read.why})" if read.full
                  else f"; incremental read: {read.reread} re-read, {read.kept} kept")
        if self.events_note:
            s += f"; {self.events_note}"
        return s[:1000].replace("\n", " ")

    def file_sweep(self) -> CleanReport:
        policy, facts, sink = self.context()
        try:
            with self.files_lock:
                report = run_clean(policy, facts, sink, history=self.history)
        except Exception:
            self.metrics.sweep_failed("files")
            self.write_metrics()
            raise
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
                               on_report=self.on_event_report).start()
        self.watcher = events.EventWatcher(self.on_pids, self.on_lost).start()
        self.proc_cache.attach()  # listening now: the next full sweep can found the cache
        self.events_note = "events on"

    def on_pids(self, changed: set[int], exited: set[int]) -> None:
        """One event batch (watcher thread, never blocks): for the cache, then the reactor."""
        self.proc_cache.mark(changed, exited)
        reactor = self.reactor
        if reactor is not None:
            reactor.on_pids(changed, exited)

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
        self.sink.emit(event_record("resync", f"{reason}: full resync sweep", reason=reason))
        # At most one resync waits; a loss during a running resync queues one more (a job id
        # with max_instances would instead skip it while the first still runs).
        if self.scheduler is not None and not self.resync_pending.is_set():
            self.resync_pending.set()
            self.scheduler.add_job(self.resync, executor="sweeps", misfire_grace_time=None)

    def resync(self) -> None:
        self.resync_pending.clear()
        self.process_sweep()

    # ------------------------------------------------------------ lifecycle

    def schedule(self) -> None:
        p = self.policy
        sched = self.scheduler
        assert sched is not None
        interval = sweep_interval(p, os.environ.get("WATCHDOG_USEC"))
        common = {"max_instances": 1, "coalesce": True, "replace_existing": True,
                  "misfire_grace_time": None}
        sched.add_job(self.process_sweep, "interval", seconds=interval, id="sweep",
                      executor="sweeps", **common)
        sched.add_job(self.refresh_jobs, "interval", seconds=p.jobs_interval, id="jobs",
                      executor="files", **common)
        if p.cleanup.enabled:
            sched.add_job(self.file_sweep, "interval", seconds=p.clean_interval, id="clean",
                          executor="files", **common)
        elif sched.get_job("clean"):
            sched.remove_job("clean")

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
        self.schedule()
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
        self.scheduler = BackgroundScheduler(
            executors={"sweeps": ThreadPoolExecutor(1), "files": ThreadPoolExecutor(1)},
            timezone="UTC",
        )
        self.schedule()
        self.start_events()
        mode = "report" if self.policy.dry_run else "enforce"
        self.sink.emit(event_record("daemon_started", f"pruned started (mode {mode}, policy "
                                    f"{self.policy_path}; {self.events_note})",
                                    path=self.policy_path))
        self.scheduler.start()
        _remove_stale_statuses()
        self.report_reload(True, [])
        self.write_metrics()  # every series at 0 before the first sweep
        sd_notify(f"READY=1\nSTATUS=ready (mode {mode}); first sweep running")
        # The first sweeps now, not one interval from now.
        self.scheduler.add_job(self.process_sweep, id="first", executor="sweeps")
        self.scheduler.add_job(self.refresh_jobs, id="first-jobs", executor="files")
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
        self.scheduler.shutdown(wait=True)
        with self.files_lock:
            self.history.save()
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

"""Prometheus node_exporter textfile: the daemon's metrics, kept in memory, rendered purely.

node_exporter's textfile collector reads every *.prom file in its directory; a half-written
file would be read as garbage, so the daemon writes it beside its target and renames it
(pruned.linux.atomic).

Prometheus conventions: base units in the names (`_seconds`, `_bytes`), `_total` for
counters, HELP and TYPE for every family, and every value of a closed label set present even
at 0, so that `rate()` and alerts have a series from the first scrape on. The counters live in
the daemon's memory: they start at 0 when it starts (`pruned_start_time_seconds` says when),
which Prometheus's `rate()` and `increase()` take as a counter reset. The gauges describe the
last completed sweep of each kind.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from pruned.model import Action, ProcClass, Result

KINDS = ("process", "files")
CLASSES = tuple(c.value for c in ProcClass)
# `ignore` never acts, so it never has an outcome: only kill and adopt are decisions here.
ACTIONS = (Action.KILL.value, Action.ADOPT.value)
RESULTS = tuple(r.value for r in Result)


@dataclass(frozen=True, slots=True)
class SweepMetrics:
    """The last completed sweep of one kind."""

    kind: str  # "process" or "files"
    finished_at: float
    duration: float
    by_class: Mapping[str, int] = field(default_factory=dict)
    by_action_result: Mapping[tuple[str, str], int] = field(default_factory=dict)
    brake: bool = False
    report_only: bool = False
    files_removed: int = 0
    bytes_removed: int = 0


@dataclass(slots=True)
class MetricsState:
    """Everything the textfile shows. Sweeps, file sweeps, the event path and reloads update
    it from different threads, so every method takes the lock."""

    version: str
    started_at: float
    enforce: bool = False
    cleanup_enabled: bool = False
    reload_ok: bool = True
    reload_success_at: float = 0.0
    last: dict[str, SweepMetrics] = field(default_factory=dict)
    actions: Counter[tuple[str, str]] = field(default_factory=Counter)
    sweeps: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    cleanup_items: Counter[str] = field(default_factory=Counter)
    removed_files: int = 0
    removed_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def policy_applied(self, enforce: bool, cleanup_enabled: bool, at: float) -> None:
        """A policy was loaded (at start) or reloaded: a successful (re)load."""
        with self.lock:
            self.enforce, self.cleanup_enabled = enforce, cleanup_enabled
            self.reload_ok, self.reload_success_at = True, at

    def reload_rejected(self) -> None:
        with self.lock:
            self.reload_ok = False

    def process_sweep(self, m: SweepMetrics) -> None:
        with self.lock:
            self.last["process"] = m
            self.sweeps["process"] += 1
            self.actions.update(m.by_action_result)

    def file_sweep(self, m: SweepMetrics, items: Mapping[str, int]) -> None:
        """A completed file sweep; `items`: its outcomes (dirs, loose sets, IPC) by result."""
        with self.lock:
            self.last["files"] = m
            self.sweeps["files"] += 1
            self.cleanup_items.update(items)
            self.removed_files += m.files_removed
            self.removed_bytes += m.bytes_removed

    def event_actions(self, by_action_result: Mapping[tuple[str, str], int]) -> None:
        """Actions of the event path: they count in the running totals too."""
        with self.lock:
            self.actions.update(by_action_result)

    def sweep_failed(self, kind: str) -> None:
        """A sweep that raised instead of completing."""
        with self.lock:
            self.failures[kind] += 1

    def text(self) -> str:
        with self.lock:
            return render(self)


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in kv.items()) + "}"


def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else repr(float(v))


def render(s: MetricsState) -> str:
    """The textfile for one state (pure: the caller holds the lock)."""
    out: list[str] = []

    def family(name: str, kind: str, help_: str) -> None:
        out.append(f"# HELP pruned_{name} {help_}")
        out.append(f"# TYPE pruned_{name} {kind}")

    def sample(name: str, value: float, **labels: str) -> None:
        out.append(f"pruned_{name}{_labels(**labels) if labels else ''} {_num(value)}")

    family("build_info", "gauge", "Always 1; the version of the running pruned.")
    sample("build_info", 1, version=s.version)
    family("enforce", "gauge", "1 when the policy's mode is enforce, 0 in report mode.")
    sample("enforce", int(s.enforce))
    family("start_time_seconds", "gauge", "When the daemon started (the counters count from it).")
    sample("start_time_seconds", s.started_at)
    family("config_last_reload_successful", "gauge",
           "1 when the last policy (re)load was applied, 0 when it was rejected.")
    sample("config_last_reload_successful", int(s.reload_ok))
    family("config_last_reload_success_timestamp_seconds", "gauge",
           "When a policy was last loaded or reloaded successfully.")
    sample("config_last_reload_success_timestamp_seconds", s.reload_success_at)

    proc = s.last.get("process")
    family("processes", "gauge", "Processes by class in the last process sweep.")
    for cls in sorted({*CLASSES, *(proc.by_class if proc else ())}):
        sample("processes", proc.by_class.get(cls, 0) if proc else 0, **{"class": cls})
    pairs = sorted({*((a, r) for a in ACTIONS for r in RESULTS),
                    *(proc.by_action_result if proc else ()), *s.actions})
    family("decisions", "gauge", "Decisions of the last process sweep by action and result.")
    for a, r in pairs:
        sample("decisions", proc.by_action_result.get((a, r), 0) if proc else 0,
               action=a, result=r)
    family("actions_total", "counter",
           "Process actions (sweeps and the event path) since the daemon started.")
    for a, r in pairs:
        sample("actions_total", s.actions.get((a, r), 0), action=a, result=r)
    family("brake_tripped", "gauge", "1 when the last process sweep tripped the mass-kill brake.")
    sample("brake_tripped", int(bool(proc and proc.brake)))

    family("sweeps_total", "counter", "Sweeps of each kind completed since the daemon started.")
    for k in KINDS:
        sample("sweeps_total", s.sweeps.get(k, 0), kind=k)
    family("sweep_failures_total", "counter",
           "Sweeps of each kind that failed with an error since the daemon started.")
    for k in KINDS:
        sample("sweep_failures_total", s.failures.get(k, 0), kind=k)
    family("sweep_duration_seconds", "gauge", "Duration of the last completed sweep of each kind.")
    for k in KINDS:
        sample("sweep_duration_seconds", s.last[k].duration if k in s.last else 0.0, kind=k)
    family("sweep_last_success_timestamp_seconds", "gauge",
           "When the last sweep of each kind completed; 0: none yet.")
    for k in KINDS:
        sample("sweep_last_success_timestamp_seconds",
               s.last[k].finished_at if k in s.last else 0.0, kind=k)
    family("report_only", "gauge",
           "1 when the last sweep of each kind was report-only (the job source is in doubt).")
    for k in KINDS:
        sample("report_only", int(k in s.last and s.last[k].report_only), kind=k)

    files = s.last.get("files")
    family("cleanup_enabled", "gauge", "1 when the policy has file cleanup on (file sweeps run).")
    sample("cleanup_enabled", int(s.cleanup_enabled))
    family("cleanup_last_removed_files", "gauge", "Files removed by the last file sweep.")
    sample("cleanup_last_removed_files", files.files_removed if files else 0)
    family("cleanup_last_removed_bytes", "gauge", "Bytes removed by the last file sweep.")
    sample("cleanup_last_removed_bytes", files.bytes_removed if files else 0)
    family("cleanup_removed_files_total", "counter", "Files removed since the daemon started.")
    sample("cleanup_removed_files_total", s.removed_files)
    family("cleanup_removed_bytes_total", "counter", "Bytes removed since the daemon started.")
    sample("cleanup_removed_bytes_total", s.removed_bytes)
    family("cleanup_items_total", "counter",
           "Cleanup items (job dirs, a uid's loose files in a root, IPC objects) by result.")
    for r in sorted({*RESULTS, *s.cleanup_items}):
        sample("cleanup_items_total", s.cleanup_items.get(r, 0), result=r)
    return "\n".join(out) + "\n"

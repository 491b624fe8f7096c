"""Prometheus node_exporter textfile: rendered purely, written atomically.

node_exporter's textfile collector reads every *.prom file in its directory; a half-written
file would be read as garbage, so the file is written beside its target and renamed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SweepMetrics:
    kind: str  # "process" or "files"
    finished_at: float
    duration: float
    by_class: Mapping[str, int] = field(default_factory=dict)
    by_action_result: Mapping[tuple[str, str], int] = field(default_factory=dict)
    brake: bool = False
    report_only: bool = False
    files_removed: int = 0
    bytes_removed: int = 0


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(sweeps: Mapping[str, SweepMetrics], totals: Mapping[tuple[str, str], int]) -> str:
    """The textfile for the last sweep of each kind plus running totals of actions."""
    out: list[str] = []

    def family(name: str, kind: str, help_: str) -> None:
        out.append(f"# HELP pruned_{name} {help_}")
        out.append(f"# TYPE pruned_{name} {kind}")

    family("processes", "gauge", "Processes by class in the last process sweep.")
    proc = sweeps.get("process")
    if proc:
        for cls, n in sorted(proc.by_class.items()):
            out.append(f'pruned_processes{{class="{_esc(cls)}"}} {n}')
    family("decisions", "gauge", "Decisions of the last process sweep by action and result.")
    if proc:
        for (action, result), n in sorted(proc.by_action_result.items()):
            out.append(f'pruned_decisions{{action="{_esc(action)}",result="{_esc(result)}"}} {n}')
    family("actions_total", "counter", "Actions since the daemon started, by action and result.")
    for (action, result), n in sorted(totals.items()):
        out.append(f'pruned_actions_total{{action="{_esc(action)}",result="{_esc(result)}"}} {n}')
    family("sweep_duration_seconds", "gauge", "Duration of the last sweep of each kind.")
    for kind, m in sorted(sweeps.items()):
        out.append(f'pruned_sweep_duration_seconds{{kind="{kind}"}} {m.duration:.6f}')
    family("last_sweep_timestamp_seconds", "gauge", "When the last sweep of each kind finished.")
    for kind, m in sorted(sweeps.items()):
        out.append(f'pruned_last_sweep_timestamp_seconds{{kind="{kind}"}} {m.finished_at:.3f}')
    family("brake_tripped", "gauge", "1 when the last process sweep tripped the mass-kill brake.")
    out.append(f"pruned_brake_tripped {int(bool(proc and proc.brake))}")
    family("report_only", "gauge", "1 when the last process sweep was report-only.")
    out.append(f"pruned_report_only {int(bool(proc and proc.report_only))}")
    files = sweeps.get("files")
    family("files_removed", "gauge", "Files removed by the last file sweep.")
    out.append(f"pruned_files_removed {files.files_removed if files else 0}")
    family("bytes_removed", "gauge", "Bytes removed by the last file sweep.")
    out.append(f"pruned_bytes_removed {files.bytes_removed if files else 0}")
    return "\n".join(out) + "\n"

"""act.metrics.render: the node_exporter textfile, rendered from plain records (pure)."""

from __future__ import annotations

from pruned.act.metrics import SweepMetrics, render


def samples(text: str) -> dict[str, str]:
    """series -> value of every sample line; HELP/TYPE lines are checked separately."""
    return dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))


def test_render_of_both_sweeps_and_totals() -> None:
    proc = SweepMetrics(
        "process", 1700000000.5, 0.25, {"stray": 2, "batch": 7},
        {("kill", "done"): 2}, brake=False, report_only=True,
    )  # fmt: skip
    files = SweepMetrics("files", 1700000100.0, 1.5, files_removed=12, bytes_removed=4096)
    text = render({"process": proc, "files": files}, {("kill", "done"): 5, ("adopt", "failed"): 1})
    got = samples(text)
    assert got['pruned_processes{class="batch"}'] == "7"
    assert got['pruned_processes{class="stray"}'] == "2"
    assert got['pruned_decisions{action="kill",result="done"}'] == "2"
    assert got['pruned_actions_total{action="kill",result="done"}'] == "5"
    assert got['pruned_actions_total{action="adopt",result="failed"}'] == "1"
    assert got['pruned_sweep_duration_seconds{kind="process"}'] == "0.250000"
    assert got['pruned_sweep_duration_seconds{kind="files"}'] == "1.500000"
    assert got['pruned_last_sweep_timestamp_seconds{kind="process"}'] == "1700000000.500"
    assert got["pruned_report_only"] == "1" and got["pruned_brake_tripped"] == "0"
    assert got["pruned_files_removed"] == "12" and got["pruned_bytes_removed"] == "4096"
    assert text.endswith("\n")
    # every family has HELP and TYPE, and every sample belongs to a declared family
    types = {ln.split()[2]: ln.split()[3] for ln in text.splitlines() if ln.startswith("# TYPE")}
    assert types["pruned_actions_total"] == "counter"
    assert {s.split("{")[0] for s in got} <= set(types)


def test_render_before_any_sweep_and_label_escaping() -> None:
    got = samples(render({}, {}))
    assert got == {
        "pruned_brake_tripped": "0",
        "pruned_report_only": "0",
        "pruned_files_removed": "0",
        "pruned_bytes_removed": "0",
    }
    odd = SweepMetrics("process", 1.0, 0.0, {'a"b\\c\nd': 1})
    assert 'pruned_processes{class="a\\"b\\\\c\\nd"} 1' in render({"process": odd}, {})

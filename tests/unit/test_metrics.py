"""act.metrics: the node_exporter textfile, rendered from the daemon's state (pure), read back
with prometheus_client's own text parser."""

from __future__ import annotations

from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from pruned.act.metrics import ACTIONS, CLASSES, KINDS, RESULTS, MetricsState, SweepMetrics


def parse(text: str) -> tuple[dict[str, str], dict[tuple[str, tuple], float]]:
    """(family -> type, (sample name, sorted labels) -> value), by prometheus_client."""
    types, values = {}, {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return types, values


def conventions(text: str) -> list[str]:
    """What breaks the naming conventions: HELP and TYPE for every family, right before its
    samples; counters and only counters end in _total; timestamps and durations in seconds."""
    bad, declared = [], {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            declared[name] = kind
            if not lines[i - 1].startswith(f"# HELP {name} "):
                bad.append(f"{name}: no HELP before TYPE")
            if (kind == "counter") != name.endswith("_total"):
                bad.append(f"{name}: {kind} named {'with' if kind != 'counter' else 'without'} "
                           "_total")
            if ("timestamp" in name or "duration" in name) and not name.endswith("_seconds"):
                bad.append(f"{name}: not in seconds")
        elif not line.startswith("#") and line.split("{")[0].split(" ")[0] not in declared:
            bad.append(f"sample without TYPE: {line}")
    return bad


def test_every_series_is_there_at_zero_before_any_sweep() -> None:
    text = MetricsState("9.9.9", 1700000000.0).text()
    assert conventions(text) == []
    types, v = parse(text)
    # the parser names a counter family without its _total
    assert types["pruned_actions"] == "counter" and types["pruned_enforce"] == "gauge"
    assert v[("pruned_build_info", (("version", "9.9.9"),))] == 1
    for cls in CLASSES:
        assert v[("pruned_processes", (("class", cls),))] == 0
    for a in ACTIONS:
        for r in RESULTS:
            key = (("action", a), ("result", r))
            assert v[("pruned_decisions", key)] == 0 and v[("pruned_actions_total", key)] == 0
    for k in KINDS:
        lab = (("kind", k),)
        assert v[("pruned_sweeps_total", lab)] == 0
        assert v[("pruned_sweep_last_success_timestamp_seconds", lab)] == 0
        assert v[("pruned_sweep_duration_seconds", lab)] == 0
    for r in RESULTS:
        assert v[("pruned_cleanup_items_total", (("result", r),))] == 0
    assert v[("pruned_start_time_seconds", ())] == 1700000000.0
    assert v[("pruned_config_last_reload_successful", ())] == 1


def test_sweeps_counters_and_reloads() -> None:
    s = MetricsState("0.1.0", 1.0)
    s.policy_applied(True, True, 100.0)
    s.process_sweep(SweepMetrics("process", 200.5, 0.25, {"stray": 2, "batch": 7},
                                 {("kill", "done"): 2}, report_only=True))
    s.process_sweep(SweepMetrics("process", 260.5, 0.5, {"stray": 1}, {("kill", "done"): 1}))
    s.event_actions({("kill", "done"): 4, ("adopt", "failed"): 1})
    s.file_sweep(SweepMetrics("files", 300.0, 1.5, files_removed=12, bytes_removed=4096),
                 Counter({"done": 3, "failed": 1}))
    s.sweep_failed("files")
    s.reload_rejected()
    text = s.text()
    assert conventions(text) == []
    _, v = parse(text)
    kd = (("action", "kill"), ("result", "done"))
    assert v[("pruned_decisions", kd)] == 1  # the last sweep only
    assert v[("pruned_actions_total", kd)] == 7  # both sweeps and the event path
    assert v[("pruned_actions_total", (("action", "adopt"), ("result", "failed")))] == 1
    assert v[("pruned_processes", (("class", "stray"),))] == 1
    assert v[("pruned_processes", (("class", "batch"),))] == 0  # not left from the 1st sweep
    assert v[("pruned_sweeps_total", (("kind", "process"),))] == 2
    assert v[("pruned_sweep_duration_seconds", (("kind", "files"),))] == 1.5
    assert v[("pruned_sweep_last_success_timestamp_seconds", (("kind", "process"),))] == 260.5
    assert v[("pruned_sweep_failures_total", (("kind", "files"),))] == 1
    assert v[("pruned_report_only", (("kind", "process"),))] == 0
    assert v[("pruned_cleanup_removed_bytes_total", ())] == 4096
    assert v[("pruned_cleanup_items_total", (("result", "failed"),))] == 1
    assert v[("pruned_enforce", ())] == 1 and v[("pruned_cleanup_enabled", ())] == 1
    assert v[("pruned_config_last_reload_successful", ())] == 0
    assert v[("pruned_config_last_reload_success_timestamp_seconds", ())] == 100.0


def test_label_values_are_escaped() -> None:
    s = MetricsState('1"\\\n', 0.0)
    s.process_sweep(SweepMetrics("process", 1.0, 0.0, {'a"b\\c\nd': 1}))
    _, v = parse(s.text())
    assert v[("pruned_processes", (("class", 'a"b\\c\nd'),))] == 1
    assert v[("pruned_build_info", (("version", '1"\\\n'),))] == 1

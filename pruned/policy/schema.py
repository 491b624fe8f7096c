"""The policy schema: every key a file may set, its check, and the Policy field it fills."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from pruned.model import Policy
from pruned.policy.fields import (
    INVALID,
    Check,
    abs_path,
    boolean,
    container_base,
    duration,
    ignore_only,
    integer,
    job_dir_item,
    list_of,
    name_item,
    one_of,
    optional_path,
    path_item,
    prom_textfile,
    roots_post,
    uid_range,
)
from pruned.policy.yamltree import Errors, Node, show

CLASSES_IGNORE_ONLY = ("system", "batch", "adopted", "whitelisted")


@dataclass(frozen=True, slots=True)
class _Field:
    """One leaf of the schema: how its value is checked, and where it lands in Policy."""

    check: Check
    target: str | None  # Policy attribute, "sub.attr" for nested dataclasses, None: check only


_MODE = one_of("report", "enforce")
SCHEMA: dict[str, Any] = {
    "mode": _Field(_MODE, "dry_run"),
    "actions": {
        "stray": _Field(one_of("kill", "adopt", "ignore"), "stray_action"),
        "adopt_fallback": _Field(
            one_of(
                "kill",
                "ignore",
                hints={
                    "adopt": "adopt_fallback is what happens when the uid has no running job "
                    "to adopt into, so it cannot be 'adopt' (expected kill or ignore)"
                },
            ),
            "adopt_fallback",
        ),
        "adopt_failure": _Field(
            one_of(
                "kill",
                "ignore",
                hints={
                    "adopt": "adopt_failure is what happens when the kernel refused an "
                    "adoption, so it cannot be 'adopt' again (expected kill or ignore)"
                },
            ),
            "adopt_failure",
        ),
        **{c: _Field(ignore_only(c), None) for c in CLASSES_IGNORE_ONLY},
    },
    "kill": {
        "grace": _Field(duration(False), "kill_grace"),
        "brake": {"max_uids": _Field(integer(1), "brake_max_uids")},
    },
    "epilog": {"drain_on_survivor": _Field(boolean, "epilog_drain_on_survivor")},
    "min_age": _Field(duration(False), "min_age"),
    "jobs": {
        "sources": _Field(list_of(one_of("slurm", "statedir"), non_empty=True), "job_sources"),
        "slurm": {
            "cgroup_root": _Field(abs_path, "slurm.cgroup_root"),
            "stepd": _Field(list_of(path_item, non_empty=True), "slurm.stepd"),
        },
        "state_dir": _Field(abs_path, "state_dir"),
        "idle_grace": _Field(duration(False), "idle_grace"),
        "keep_ended": _Field(duration(True), "keep_ended"),
    },
    "batch_daemons": _Field(list_of(path_item), "batch_daemons"),
    "sshd_paths": _Field(list_of(path_item), "sshd_paths"),
    "system": {
        "login_defs": _Field(boolean, "system.login_defs"),
        "login_defs_path": _Field(abs_path, "system.login_defs_path"),
        "uid_ranges": _Field(list_of(uid_range), "system.uid_ranges"),
        "users": _Field(list_of(name_item), "system.users"),
    },
    "whitelist": {
        "users": _Field(list_of(name_item), "whitelist.users"),
        "groups": _Field(list_of(name_item), "whitelist.groups"),
        "exe": _Field(list_of(path_item), "whitelist.exe"),
        "sshd": _Field(boolean, "whitelist.sshd"),
    },
    "cleanup": {
        "enabled": _Field(boolean, "cleanup.enabled"),
        "roots": _Field(list_of(path_item, post=roots_post), "cleanup.roots"),
        "job_dirs": _Field(list_of(job_dir_item), "cleanup.job_dirs"),
        "job_container_base": _Field(container_base, "cleanup.job_container_base"),
        "min_age": _Field(duration(False), "cleanup.min_age"),
        "loose_files": _Field(boolean, "cleanup.loose_files"),
        "max_listed": _Field(integer(0), "cleanup.max_listed"),
    },
    "schedule": {
        "sweep": _Field(duration(True), "sweep_interval"),
        "clean": _Field(duration(True), "clean_interval"),
        "jobs": _Field(duration(True), "jobs_interval"),
        "full_sweep": _Field(duration(False), "full_sweep_interval"),
    },
    "events": _Field(boolean, "events"),
    "audit": {"fallback_file": _Field(optional_path, "audit_fallback")},
    "metrics": {"textfile": _Field(prom_textfile, "metrics_textfile")},
}

# Keys that existed once: their own message, naming what replaced them, rather than "unknown".
RETIRED: dict[str, str] = {
    "kill.max_per_sweep": "replaced by kill.brake.max_uids "
    f"(default {Policy().brake_max_uids}): the brake now counts the users whose processes "
    "would be killed, not processes; remove this key (and set kill.brake.max_uids if the "
    "default does not fit)",
}


def check_tree(
    node: Node,
    schema: dict[str, Any],
    path: str,
    errs: Errors,
    out: dict[str, tuple[Any, Node]],
    bad: set[str],
) -> None:
    """Check a mapping against the schema: good values land in `out`, bad paths in `bad`."""
    for key, sub in node.value.items():
        dotted = f"{path}.{key}" if path else key
        spec = schema.get(key)
        if spec is None and dotted in RETIRED:
            errs.add(sub.file, sub.key_line, dotted, RETIRED[dotted])
        elif spec is None:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            errs.add(
                sub.file, sub.key_line, dotted, f"unknown key ({hint}allowed: {', '.join(schema)})"
            )
        elif isinstance(spec, dict):
            if isinstance(sub.value, dict):
                check_tree(sub, spec, dotted, errs, out, bad)
            else:
                bad.add(dotted)
                errs.at(
                    sub, dotted, f"expected a mapping with keys {', '.join(spec)}; got {show(sub)}"
                )
        else:
            value = spec.check(sub, dotted, errs)
            if value is INVALID:
                bad.add(dotted)
            else:
                out[dotted] = (value, sub)

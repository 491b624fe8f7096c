"""Cross-key checks: settings that are each valid but contradict one another."""

from __future__ import annotations

from typing import Any

from pruned.model import Action, Policy
from pruned.policy.yamltree import Errors, Node


def check_contradictions(
    vals: dict[str, tuple[Any, Node]], bad: set[str], policy: Policy, errs: Errors
) -> None:
    """Settings that are each valid but make no sense together.

    A check is skipped when one of its keys was set but invalid: that key already has an
    error, and judging its default instead would only add a confusing second one.
    """

    def usable(*keys: str) -> bool:
        return not any(k == b or k.startswith(b + ".") for k in keys for b in bad)

    def where(*keys: str) -> tuple[str, Node] | None:
        """The first of keys that a file set (a contradiction is reported where it was set)."""
        if not usable(*keys):
            return None
        for k in keys:
            if k in vals:
                return k, vals[k][1]
        return None

    def origin(key: str) -> str:
        node = vals.get(key, (None, None))[1]
        return f"set at {node.file}:{node.key_line}" if node else "the default"

    if (
        policy.stray_action is Action.ADOPT
        and "slurm" not in policy.job_sources
        and (w := where("actions.stray", "jobs.sources"))
    ):
        errs.at(
            w[1],
            w[0],
            "stray: adopt needs 'slurm' in jobs.sources "
            f"(adoption moves processes into Slurm job cgroups); jobs.sources is "
            f"{list(policy.job_sources)} ({origin('jobs.sources')})",
        )
    if policy.kill_grace >= policy.sweep_interval and (w := where("kill.grace", "schedule.sweep")):
        errs.at(
            w[1],
            w[0],
            f"kill.grace ({_secs(policy.kill_grace)}, {origin('kill.grace')}) "
            f"must be shorter than schedule.sweep ({_secs(policy.sweep_interval)}, "
            f"{origin('schedule.sweep')}): a kill must finish before the next sweep",
        )
    # A record must outlive the file sweep that cleans its job's dirs: the end of an idle job
    # is backdated by idle_grace, the dirs wait cleanup.min_age, the sweep comes every clean.
    need = policy.cleanup.min_age + policy.idle_grace + policy.clean_interval
    retention = ("jobs.keep_ended", "cleanup.min_age", "jobs.idle_grace", "schedule.clean")
    if policy.keep_ended <= need and (w := where(*retention)):
        errs.at(
            w[1],
            w[0],
            f"jobs.keep_ended ({_secs(policy.keep_ended)}, {origin('jobs.keep_ended')}) must be "
            f"longer than cleanup.min_age + jobs.idle_grace + schedule.clean ({_secs(need)}: "
            + " + ".join(f"{k} {_secs(v)} ({origin(k)})" for k, v in (
                ("cleanup.min_age", policy.cleanup.min_age),
                ("jobs.idle_grace", policy.idle_grace),
                ("schedule.clean", policy.clean_interval),
            ))
            + "): a job would be forgotten before the file sweep that cleans its dirs",
        )
    if (
        policy.whitelist.sshd
        and not policy.sshd_paths
        and (w := where("whitelist.sshd", "sshd_paths"))
    ):
        errs.at(
            w[1],
            w[0],
            "whitelist.sshd is true but sshd_paths is empty: no sshd could "
            "ever be recognised (set whitelist.sshd: false, or list the sshd binaries)",
        )

    sys_users = set(policy.system.users)
    for key, what in (("whitelist.users", "user"), ("whitelist.groups", "group")):
        if key not in vals or not usable("system.users"):
            continue
        for i, name in enumerate(vals[key][0]):
            if name in sys_users:
                errs.at(
                    vals[key][1].value[i],
                    f"{key}[{i}]",
                    f"{what} {name!r} is also in system.users "
                    f"({origin('system.users')}): list it in one place only",
                    item=True,
                )

    # Every job_dirs pattern must lie under a root: the root is what the cleanup walk trusts
    # (same filesystem, fd-based), and a pattern outside it would be deleted unwalked.
    roots = policy.cleanup.roots
    if usable("cleanup.roots", "cleanup.job_dirs"):
        for i, pattern in enumerate(policy.cleanup.job_dirs):
            if any(pattern.startswith(r + "/") for r in roots):
                continue
            msg = (
                f"pattern {pattern!r} is not under any cleanup root "
                f"({', '.join(roots) or 'none'}); add its root to cleanup.roots "
                "(job_container_base is the place for job_container/tmpfs)"
            )
            if "cleanup.job_dirs" in vals:
                node = vals["cleanup.job_dirs"][1].value[i]
                errs.at(node, f"cleanup.job_dirs[{i}]", msg, item=True)
            elif "cleanup.roots" in vals:  # the default patterns no longer fit the roots
                errs.at(vals["cleanup.roots"][1], "cleanup.roots", f"default job_dirs {msg}")


def _secs(seconds: float) -> str:
    return f"{seconds:g}s"

"""Slurm's job cgroup paths: the one grammar every caller uses to map a cgroup to a job. PURE.

v1 `<ctrl>/slurm*/uid_U/job_J/step_S[/task_N]`; v2
`system.slice/[<node>_]slurmstepd.scope/job_J/step_S/{slurm,user[/task_N]}`. Used by the
tree reader, the event path, reverify before every action, and the kill re-walk.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pruned.model import Membership, Proc

# Crockford base32, as Slurm's print_sluid writes it: "s" and 13 characters (26.05+ job dirs).
SLUID = r"s[0-9A-HJKMNP-TV-Z]{13}"

_SLUID_RE = re.compile(SLUID)
# slurmstepd names itself "slurmstepd: [<job>.<step>]" (set by root: trusted only for a
# genuine root stepd); het job components read "[<job>+<n>.<step>]".
_STEPD_ARGV = re.compile(rb"slurmstepd: \[(\d+)(?:\+\d+)?\.[^\]]+\]")

# Paths are anchored at the hierarchy's root: a look-alike tree inside a subtree a user owns
# (systemd delegates user@UID.service to its user) never starts there. An absolute path under a
# cgroup mount (/sys/fs/cgroup[/<controller>]) is read relative to that mount. A v1 controller
# dir never ends in ".slice": the first slice of a v2 path is the path's, not a mount's.
_MOUNT = r"^(?:/sys/fs/cgroup(?:/[^/]+(?<!\.slice))?)?"
_V1_RE = re.compile(
    _MOUNT + r"/(?P<root>slurm[^/]*)/uid_(?P<uid>\d+)/job_(?P<job>\d+)"
    r"(?:/step_(?P<step>[^/]+)(?:/task_(?P<task>\d+))?)?/?$"
)
# [<node>_]slurmstepd.scope in system.slice, or in the slice CgroupSlice names (25.11+, slices
# nest: a.slice/a-b.slice); job dirs job_J, or the job's SLUID (26.05+, unless
# CgroupJobIdPaths=yes); each step's stepd in step_S/slurm, its processes in step_S/user and
# user/task_N (24.11+) or user/task_special (22.05, and the extern step everywhere).
_V2_RE = re.compile(
    _MOUNT + r"/(?P<root>(?:[^/]+\.slice/)+(?:[^/]+_)?slurmstepd\.scope)"
    r"/(?:job_(?P<job>\d+)|(?P<sluid>" + SLUID + r"))"
    r"(?:/step_(?P<step>[^/]+)(?:/(?P<slot>slurm|user)(?:/task_(?P<task>\d+|special))?)?)?/?$"
)
# Inside a Slurm tree at all (then a path the grammar does not parse is "not understood").
_V1_TREE = re.compile(_MOUNT + r"/slurm[^/]*(?P<rest>/.*)?$")
_V2_TREE = re.compile(_MOUNT + r"/(?:[^/]+\.slice/)+(?:[^/]+_)?slurmstepd\.scope(?P<rest>/.*)?$")
# What Slurm itself keeps in its trees outside any job: the scope's `system` cgroup (its keeper
# stepd), v1's slurm*/system, and the uid_U level of v1.
_INFRA = re.compile(r"/?$|/system(?:/.*)?$|/uid_\d+/?$")


@dataclass(frozen=True, slots=True)
class SlurmPath:
    """What a Slurm job cgroup path says."""

    version: int  # 1 or 2
    root: str  # "slurm_vm" (v1) or "system.slice/vm_slurmstepd.scope" (v2)
    job_id: str  # the numeric job id, or the SLUID that names a 26.05 job dir
    uid: int | None  # only v1 paths carry it
    step: str | None  # "batch", "extern", "0", ...; None at job level
    task: str | None = None  # "0", "1", ... or "special"
    stepd: bool = False  # v2 ".../step_S/slurm": the slot of the step's slurmstepd
    sluid: bool = False  # job_id is a SLUID (the dir name), not the numeric id


def is_sluid(text: str) -> bool:
    """Whether text is a Slurm SLUID ("s" and 13 Crockford base32 characters)."""
    return bool(_SLUID_RE.fullmatch(text))


def job_of_stepd_argv(cmdline: bytes) -> str | None:
    """The numeric job id in a slurmstepd's argv ("slurmstepd: [17.batch]"), or None."""
    m = _STEPD_ARGV.match(cmdline)
    return m[1].decode() if m else None


def _path_of(line: str) -> str:
    colon = line.find(":/")
    if colon >= 0 and not line.startswith("/"):
        return line[colon + 1 :]  # "6:freezer:/slurm..." or "0::/system.slice/..."
    return line


def parse_slurm_cgroup_path(path: str) -> SlurmPath | None:
    """Parse a job cgroup path (`/slurm_vm/uid_1/job_2/step_0`, a /proc/PID/cgroup line, or an
    absolute path under a cgroup mount); None when it is not inside a Slurm job."""
    path = _path_of(path)
    if m := _V1_RE.match(path):
        return SlurmPath(1, m["root"], m["job"], int(m["uid"]), m["step"], m["task"])
    if m := _V2_RE.match(path):
        if m["task"] is not None and m["slot"] != "user":
            return None
        job = m["job"] or m["sluid"]
        return SlurmPath(
            2, m["root"], job, None, m["step"], m["task"], m["slot"] == "slurm", bool(m["sluid"])
        )
    return None


def not_understood(path: str) -> bool:
    """A path inside one of Slurm's trees that is neither a job's cgroup nor Slurm's own
    infrastructure: a layout this grammar does not know. Callers hold off (report-only)."""
    path = _path_of(path)
    m = _V2_TREE.match(path) or _V1_TREE.match(path)
    if m is None:
        return False
    rest = m["rest"] or ""
    return not _INFRA.fullmatch(rest) and parse_slurm_cgroup_path(path) is None


def slurm_lines(lines: Iterable[str]) -> Iterator[tuple[str, SlurmPath]]:
    """(line, parsed path) for each /proc/PID/cgroup line that lies inside a Slurm job."""
    for line in lines:
        sp = parse_slurm_cgroup_path(line)
        if sp is not None:
            yield line, sp


def unknown_lines(lines: Iterable[str]) -> list[str]:
    """The lines that lie in a Slurm tree but that the grammar does not understand."""
    return [line for line in lines if not_understood(line)]


def job_ids_in(lines: Iterable[str]) -> set[str]:
    """The job ids whose cgroups these /proc/PID/cgroup lines name; a line in Slurm's tree that
    the grammar does not know counts as a job of its own (named by the line)."""
    return {sp.job_id for _line, sp in slurm_lines(lines)} | {
        f"?{line}" for line in unknown_lines(lines)
    }


def membership_of(lines: Iterable[str]) -> Membership | None:
    """A process's job membership from its own cgroup lines: a step beats the job level, and a
    line in Slurm's tree that the grammar does not know beats both (doubt is never a stray)."""
    best: Membership | None = None
    for line in lines:
        if not_understood(line):
            return Membership("", None, line, understood=False)
        sp = parse_slurm_cgroup_path(line)
        if sp is None:
            continue
        m = Membership(sp.job_id, sp.step, line, sp.stepd)
        if best is None or (best.step is None and m.step is not None):
            best = m
    return best


def membership_from_cgroups(procs: Iterable[Proc]) -> dict[int, Membership]:
    """pid -> job membership, from each process's own /proc/PID/cgroup lines (full reads)."""
    out: dict[int, Membership] = {}
    for p in procs:
        m = membership_of(p.cgroups)
        if m is not None:
            out[p.pid] = m
    return out

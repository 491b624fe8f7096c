"""Adopt a stray tree into its job: write each pid into the job's extern step cgroups.

Writing a pid to cgroup.procs has no pidfd form, so every write is bracketed by starttime
checks: a mismatch before means gone (nothing written), a mismatch right after means the
pid was reused in between and a stranger was moved, which is reported exactly.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass

from pruned.act.guard import guard, protected_pids
from pruned.act.tree import Tree, expand
from pruned.linux.cgroupfs import ensure_task_special, write_text
from pruned.linux.pidfd import live_stat
from pruned.linux.procfs import read_stat
from pruned.model import ProcKey, Result


@dataclass(frozen=True, slots=True)
class AdoptStep:
    """One write of one pid into one cgroup.procs."""

    key: ProcKey
    cgroup: str  # the directory written to
    result: Result  # done / gone / failed / would
    detail: str = ""


@dataclass(frozen=True, slots=True)
class AdoptResult:
    """Outcome of one adoption: who was moved, who was gone, who failed, every write."""

    root: ProcKey
    moved: tuple[ProcKey, ...]  # in every extern dir
    gone: tuple[ProcKey, ...]  # gone or reused before the first write
    failed: tuple[ProcKey, ...]
    reused: tuple[str, ...]  # exact account of every pid found reused right after a write
    steps: tuple[AdoptStep, ...]
    elapsed: float
    dry_run: bool = False
    would: tuple[ProcKey, ...] = ()
    found_late: tuple[ProcKey, ...] = ()

    @property
    def ok(self) -> bool:
        """True when something moved (or a dry run) and no write failed or hit a reused pid."""
        return not self.failed and not self.reused and (bool(self.moved) or self.dry_run)

    def describe(self) -> str:
        """One line for an audit MESSAGE."""
        dirs = sorted({s.cgroup for s in self.steps})
        if self.dry_run:
            return f"would move {len(self.would)} process(es) into {', '.join(dirs) or '-'}"
        parts = [f"moved {len(self.moved)} process(es) into {', '.join(dirs) or '-'}"]
        if self.gone:
            parts.append(f"{len(self.gone)} gone before the move")
        if self.failed:
            failed = [s for s in self.steps if s.result == Result.FAILED]
            parts.append(
                "FAILED: " + "; ".join(f"{s.key.pid} {s.cgroup}: {s.detail}" for s in failed)[:300]
            )
        parts.extend(self.reused)
        parts.append(f"{self.elapsed:.3f}s")
        return "; ".join(parts)

    def audit_fields(self) -> dict[str, str]:
        """Extra PRUNED_* fields for the audit record of this adoption."""
        f = {
            "PRUNED_COUNT": str(len(self.moved) or len(self.would)),
            "PRUNED_ELAPSED_MS": str(round(self.elapsed * 1000)),
            "PRUNED_CGROUPS": " ".join(sorted({s.cgroup for s in self.steps})),
        }
        tree = self.moved or self.would
        if tree:
            f["PRUNED_TREE"] = " ".join(str(k.pid) for k in tree[:50])
        return f


def adopt(
    key: ProcKey,
    descendants: Sequence[ProcKey],
    extern_dirs: Sequence[str],
    *,
    dry_run: bool,
    uid: int | None = None,
    proc_root: str = "/proc",
) -> AdoptResult:
    """Move key's tree into every extern cgroup dir, re-checking starttime around each write.

    A starttime mismatch before a write means gone: nothing is written. A mismatch right
    after a write means the pid was reused in between and a stranger was moved: reported
    in `reused` with the pid, the cgroup and both start times. Raises Refused (before acting
    at all) if the guard refuses a key, ValueError if `extern_dirs` is empty (a caller bug).
    """
    guard((key, *descendants), proc_root)
    if not extern_dirs:
        raise ValueError("adopt needs at least one extern cgroup directory")
    protected = protected_pids(proc_root)
    t0 = time.monotonic()
    # With `uid`, the re-walk never takes in another user's process (a `sudo -i` inside the
    # stray's tmux must not be moved into this user's job).
    tree = Tree(key, uid, proc_root)
    steps: list[AdoptStep] = []
    reused: list[str] = []
    moved: list[ProcKey] = []
    failed: list[ProcKey] = []
    gone: list[ProcKey] = []
    try:
        for k in (key, *descendants):
            tree.add(k)
        expand([tree], proc_root, protected, rounds=3)
        if dry_run:
            steps = [AdoptStep(k, d, Result.WOULD) for k in tree.fds for d in extern_dirs]
            return AdoptResult(
                root=key,
                moved=(),
                gone=tuple(tree.gone),
                failed=(),
                reused=(),
                steps=tuple(steps),
                elapsed=time.monotonic() - t0,
                dry_run=True,
                would=tuple(tree.fds),
                found_late=tuple(tree.late),
            )
        done: set[ProcKey] = set()
        for _ in range(10):  # children forked during the move are walked in the next round
            for k in [k for k in tree.fds if k not in done]:
                done.add(k)
                r = _adopt_one(k, extern_dirs, proc_root, steps, reused)
                {Result.DONE: moved, Result.GONE: gone, Result.FAILED: failed}[r].append(k)
            before = len(tree.fds)
            expand([tree], proc_root, protected, rounds=1)
            if len(tree.fds) == before:
                break
        gone = list(tree.gone) + gone
        failed += [k for k, _ in tree.failed]
        return AdoptResult(
            root=key,
            moved=tuple(moved),
            gone=tuple(gone),
            failed=tuple(failed),
            reused=tuple(reused),
            steps=tuple(steps),
            elapsed=time.monotonic() - t0,
            dry_run=False,
            found_late=tuple(tree.late),
        )
    finally:
        tree.close()


def _adopt_one(
    key: ProcKey, dirs: Sequence[str], proc_root: str, steps: list[AdoptStep], reused: list[str]
) -> Result:
    """Write key.pid into each dir's cgroup.procs with a starttime check before and after."""
    result = Result.DONE
    for d in dirs:
        if live_stat(key, proc_root) is None:
            steps.append(AdoptStep(key, d, Result.GONE, "gone or pid reused before the write"))
            return Result.GONE if result == Result.DONE and d == dirs[0] else Result.FAILED
        try:
            ensure_task_special(d)
            write_text(f"{d}/cgroup.procs", str(key.pid))
        except OSError as e:
            if e.errno == errno.ESRCH:
                steps.append(AdoptStep(key, d, Result.GONE, "exited during the write"))
                return Result.GONE if d == dirs[0] else Result.FAILED
            why = f"write refused: {os.strerror(e.errno or 0)}"
            steps.append(AdoptStep(key, d, Result.FAILED, why))
            result = Result.FAILED
            continue
        after = read_stat(key.pid, proc_root)
        if after is not None and after.starttime != key.starttime:
            msg = (
                f"pid {key.pid} was reused between the check and the write: a process "
                f"started at tick {after.starttime} (not {key.starttime}) was moved into {d}"
            )
            reused.append(msg)
            steps.append(AdoptStep(key, d, Result.FAILED, msg))
            return Result.FAILED
        if after is None or after.zombie:
            steps.append(AdoptStep(key, d, Result.GONE, "exited right after the write"))
            return Result.GONE if d == dirs[0] else Result.FAILED
        steps.append(AdoptStep(key, d, Result.DONE))
    return result


class AdoptFailures:
    """Processes whose adoption the kernel refused, by (pid, starttime), with the error.

    The policy's adopt_failure is applied to each once (pruned.rules.decide turns a later
    adopt decision for it into that fallback), instead of retrying every sweep. Bounded;
    a full snapshot forgets the processes it no longer shows.
    """

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self.failed: dict[ProcKey, str] = {}

    def remember(self, key: ProcKey, why: str) -> None:
        self.failed.pop(key, None)
        self.failed[key] = why[:200]
        while len(self.failed) > self.limit:
            del self.failed[next(iter(self.failed))]

    def prune(self, live: Container[ProcKey]) -> None:
        """Keep only the processes of a full snapshot."""
        self.failed = {k: v for k, v in self.failed.items() if k in live}

    def view(self) -> dict[ProcKey, str]:
        return dict(self.failed)


def failure_reason(res: AdoptResult, key: ProcKey) -> str:
    """The kernel's refusal for one failed key, as a short sentence."""
    steps = [s for s in res.steps if s.key == key and s.result == Result.FAILED]
    if steps:
        return "; ".join(f"{s.cgroup}: {s.detail}" for s in steps)
    if key in res.failed:
        return "could not be opened or verified for the move"
    return res.describe()

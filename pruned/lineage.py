"""The daemon's memory of stray lineages, kept across sweeps and shared with the event path.

The parent of a re-forking stray has usually exited by the time its child is seen (the
child was reparented), so what was judged stray must be remembered: the lineage marks of
strays by (pid, starttime), and stray sessions and process groups by (kind, uid, id). The
judgement itself is pure (pruned.rules.lineage.trace); this holds its results, bounded in
size, and forgets a process once a full snapshot no longer shows it and a group once a full
snapshot shows none of its members.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from pruned.model import ProcKey, Snapshot, Verdict
from pruned.rules.lineage import Forker, Group, GroupMemo, LineageMark, trace

MAX_KEYS = 16384
MAX_GROUPS = 4096


class LineageMemory:
    """Stray lineages seen so far; `observe` judges one picture and learns from it."""

    def __init__(self, max_keys: int = MAX_KEYS, max_groups: int = MAX_GROUPS) -> None:
        self.max_keys = max_keys
        self.max_groups = max_groups
        self.keys: dict[ProcKey, LineageMark] = {}
        self.groups: dict[Group, GroupMemo] = {}
        self.strays: dict[int, Forker] = {}  # pid -> the stray last seen with it
        self._lock = threading.Lock()  # the sweep and the event worker both observe

    def observe(
        self,
        snap: Snapshot,
        verdicts: Mapping[int, Verdict],
        *,
        full: bool,
        parents: Mapping[int, int] | None = None,
    ) -> dict[int, LineageMark]:
        """Lineage marks for the strays of this picture; remembers what it shows.

        `full`: snap is the whole process table, so whatever it lacks is gone for good.
        `parents`: child -> forking pid from the fork events of this batch (event path).
        """
        with self._lock:
            forked = self._forkers(snap, parents) if parents else None
            marks, update = trace(snap, verdicts, self.keys, self.groups, forked)
            for g in update.drop:
                self.groups.pop(g, None)
            for k, m in update.keys.items():
                self.keys.pop(k, None)  # re-insert: the dicts are kept oldest first
                self.keys[k] = m
            for g, gm in update.groups.items():
                self.groups.pop(g, None)
                self.groups[g] = gm
            for k, f in update.strays.items():
                self.strays.pop(k.pid, None)
                self.strays[k.pid] = f
            if full:
                self._prune(snap)
            while len(self.keys) > self.max_keys:
                del self.keys[next(iter(self.keys))]
            while len(self.groups) > self.max_groups:
                del self.groups[next(iter(self.groups))]
            while len(self.strays) > self.max_keys:
                del self.strays[next(iter(self.strays))]
        return marks

    def _forkers(self, snap: Snapshot, parents: Mapping[int, int]) -> dict[int, Forker]:
        """pid -> the remembered stray that forked it, through forkers that exited too
        (a chain of fork events within the batch), for pids whose forker is gone."""
        out: dict[int, Forker] = {}
        for child, parent in parents.items():
            if child not in snap.procs:
                continue
            for _ in range(64):
                if parent in snap.procs:
                    break  # alive: the parent rule of the picture itself judges it
                f = self.strays.get(parent)
                if f is not None:
                    out[child] = f
                    break
                nxt = parents.get(parent)
                if nxt is None:
                    break
                parent = nxt
        return out

    def group_ids(self) -> frozenset[int]:
        """The session and process group ids of the remembered stray groups (any uid)."""
        # No lock (a full sweep's observe holds it for long): list() copies the keys in C,
        # with no Python code in between that could let observe change the dict meanwhile.
        groups = list(self.groups)
        return frozenset(g.gid for g in groups) if groups else frozenset()

    def forget(self, pids: Iterable[int]) -> None:
        """Processes that exited (exit events): their pids may name others from now on."""
        with self._lock:
            for pid in pids:
                self.strays.pop(pid, None)

    def _prune(self, snap: Snapshot) -> None:
        """Forget processes the snapshot does not show and groups with no member in it;
        costs a pass over the snapshot only while groups are remembered."""
        procs = snap.procs
        self.keys = {k: m for k, m in self.keys.items()
                     if (p := procs.get(k.pid)) is not None and p.starttime == k.starttime}
        self.strays = {pid: f for pid, f in self.strays.items()
                       if (p := procs.get(pid)) is not None and p.starttime == f.key.starttime}
        if not self.groups:
            return
        wanted = {g.gid for g in self.groups}
        present: set[tuple[str, int, int]] = set()
        for p in procs.values():
            if p.sid in wanted:
                present.add(("session", p.uid, p.sid))
            if p.pgid in wanted:
                present.add(("pgroup", p.uid, p.pgid))
        self.groups = {g: m for g, m in self.groups.items()
                       if (g.kind, g.uid, g.gid) in present}

    def __len__(self) -> int:
        return len(self.keys) + len(self.groups) + len(self.strays)

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
from collections.abc import Mapping

from pruned.model import ProcKey, Snapshot, Verdict
from pruned.rules.lineage import Group, GroupMemo, LineageMark, trace

MAX_KEYS = 16384
MAX_GROUPS = 4096


class LineageMemory:
    """Stray lineages seen so far; `observe` judges one picture and learns from it."""

    def __init__(self, max_keys: int = MAX_KEYS, max_groups: int = MAX_GROUPS) -> None:
        self.max_keys = max_keys
        self.max_groups = max_groups
        self.keys: dict[ProcKey, LineageMark] = {}
        self.groups: dict[Group, GroupMemo] = {}
        self._lock = threading.Lock()  # the sweep and the event worker both observe

    def observe(
        self, snap: Snapshot, verdicts: Mapping[int, Verdict], *, full: bool
    ) -> dict[int, LineageMark]:
        """Lineage marks for the strays of this picture; remembers what it shows.

        `full`: snap is the whole process table, so whatever it lacks is gone for good.
        """
        with self._lock:
            marks, update = trace(snap, verdicts, self.keys, self.groups)
            for g in update.drop:
                self.groups.pop(g, None)
            for k, m in update.keys.items():
                self.keys.pop(k, None)  # re-insert: the dicts are kept oldest first
                self.keys[k] = m
            for g, gm in update.groups.items():
                self.groups.pop(g, None)
                self.groups[g] = gm
            if full:
                self._prune(snap)
            while len(self.keys) > self.max_keys:
                del self.keys[next(iter(self.keys))]
            while len(self.groups) > self.max_groups:
                del self.groups[next(iter(self.groups))]
        return marks

    def _prune(self, snap: Snapshot) -> None:
        """Forget processes the snapshot does not show and groups with no member in it;
        costs a pass over the snapshot only while groups are remembered."""
        procs = snap.procs
        self.keys = {k: m for k, m in self.keys.items()
                     if (p := procs.get(k.pid)) is not None and p.starttime == k.starttime}
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
        return len(self.keys) + len(self.groups)

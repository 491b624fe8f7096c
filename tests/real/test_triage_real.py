"""The event path's triage sets aside only what a full sweep leaves alone (this machine's
real process table, read-only, plus a stand-in batch daemon with a user's process below it).

Nothing is killed here: _triage only reads /proc."""

from __future__ import annotations

import subprocess
import threading
import time

from pruned.act.audit import ListSink
from pruned.linux import procfs
from pruned.model import CleanupPolicy, JobView, Policy, ProcClass
from pruned.policy.facts import resolve_facts
from pruned.reactor import Reactor
from pruned.rules.classify import classify
from pruned.sweep import known_exes
from tests.fixtures.users import alive, run_as, wait_for_pid

# root, listed as a batch daemon: the stand-in for slurmstepd. Not timeout (benches and
# test runners run under it, and it would vouch for every process below them), but flock,
# which forks the command and waits for it.
MOM = "/usr/bin/flock"


def test_triage_agrees_with_the_sweep(tmp_path, user_a) -> None:
    policy = Policy(dry_run=True, min_age=0.0, job_sources=("statedir",),
                    state_dir=str(tmp_path), cleanup=CleanupPolicy(enabled=False),
                    batch_daemons=(MOM,))  # fmt: skip
    facts = resolve_facts(policy)
    jobs = JobView(jobs={}, membership={})
    # A job process (a user's sleep under the root stand-in) and a stray (the same user's
    # sleep in a session of its own, not under it).
    mom = subprocess.Popen([MOM, str(tmp_path / "lock"), "setpriv", f"--reuid={user_a.uid}",
                            f"--regid={user_a.gid}", "--clear-groups", "sleep", "60"])  # fmt: skip
    stray = run_as(user_a, ["bash", "-c", "exec -a prtriage_stray sleep 60"])
    try:
        job_pid = wait_for_pid(user_a.uid, "sleep")
        stray_pid = wait_for_pid(user_a.uid, "prtriage_stray")
        time.sleep(0.2)  # setpriv's exec done
        reactor = Reactor(lambda: (policy, facts, ListSink()), lambda _fresh: jobs,
                          threading.Lock())  # fmt: skip
        pids = set(procfs.list_pids())
        reactor._triage(pids)  # learns every process's record (ancestors included)
        todo = reactor._triage(pids)  # as a later batch: all links known
        snap = procfs.snapshot()
        verdicts = classify(snap, jobs, policy, facts, known_exes(policy))
        held = reactor.ancestry.entries
        checked = 0
        for pid in pids - todo:
            p = snap.procs.get(pid)
            mine = held.get(pid)
            if p is None or mine is None or mine.proc != p or p.zombie:
                continue  # changed between the two reads (the machine is shared)
            # the chain the triage walked is the snapshot's chain
            chain_ok, cur = True, p.ppid
            while cur > 0 and chain_ok:
                a, b = snap.procs.get(cur), held.get(cur)
                chain_ok = a is not None and b is not None and a == b.proc
                cur = a.ppid if a is not None else 0
            if not chain_ok:
                continue
            assert verdicts[pid].cls in (ProcClass.SYSTEM, ProcClass.BATCH), (p, verdicts[pid])
            checked += 1
        assert checked > 10
        assert job_pid not in todo and verdicts[job_pid].rule == "batch.daemon_lineage"
        assert stray_pid in todo and verdicts[stray_pid].cls is ProcClass.STRAY
    finally:
        for p in (mom, stray):
            if p.poll() is None:
                p.kill()
            p.wait()
        assert not alive(stray.pid)


def test_kill_walk_of_a_known_uid_reads_root_and_that_uid_only(user_a, user_b) -> None:
    """read_stats(owners): what a kill re-walk of a tree of uid A reads. Root-owned
    entries (non-dumpable, setuid, kernel threads) are always read."""
    a = run_as(user_a, ["sleep", "30"])
    b = run_as(user_b, ["sleep", "30"])
    try:
        time.sleep(0.2)
        table = procfs.read_stats(owners={user_a.uid})
        assert a.pid in table and 1 in table and b.pid not in table
        full = procfs.read_stats()
        assert a.pid in full and b.pid in full
        assert table[a.pid] == full[a.pid]
    finally:
        for p in (a, b):
            p.kill()
            p.wait()

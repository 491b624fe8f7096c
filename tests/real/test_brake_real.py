"""The mass-kill brake on real processes: it counts uids, not processes.

Every sweep here is scoped to uids the fixture made (`uids=`, as `pruned sweep --uid` does),
with the shipped policies/default.yaml and an overlay that switches it to `mode: enforce`.
The overlay also sets `min_age: 0s` (the processes are seconds old by construction), a
statedir job source in the test's own directory (the machine's Slurm cgroups, which other
tests change, must not make a sweep report-only) and the audit fallback file; the brake
is the shipped one unless a test says otherwise.

- a fork bomb of one user, hundreds of processes, dies in one sweep and is gone within 5 s
  (its trees are killed as one, and it loses the grace by forking through its SIGTERM);
- a SIGTERM handler that forks a cleanup command keeps its grace;
- one user's many strays (more than the old per-sweep limit of 50) do not stop another
  user's stray from dying in the same sweep;
- strays of more uids than kill.brake.max_uids: nothing is killed, brake_tripped names the
  uids, and each uid's held processes are one audit record, not one per process;
- the event path (the reactor) counts the uids it killed since the last full sweep the same
  way: a uid already counted is free, one more than the limit holds the batch; directly
  through Reactor.handle, and end to end through `pruned run`.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pruned.act.audit import ListSink
from pruned.jobs.source import read_jobs
from pruned.linux import procfs
from pruned.model import Policy
from pruned.policy.facts import resolve_facts
from pruned.policy.load import load_policy
from pruned.reactor import Reactor
from pruned.sweep import make_sources, run_sweep
from tests.fixtures.paths import REPO
from tests.fixtures.pids import pids_limit
from tests.fixtures.users import (
    User,
    alive,
    kill_uid_processes,
    pids_of_uid,
    setsid_as,
    wait_dead,
    wait_for_pid,
)
from tests.real.test_daemon import FAR, plant_stray, start_daemon  # noqa: F401 (a fixture)
from tests.real.test_daemon import wait_dead as daemon_wait_dead
from tests.real.test_daemon import write_policy as daemon_policy

pytestmark = pytest.mark.root

CG = "/sys/fs/cgroup"
SHIPPED = REPO / "policies" / "default.yaml"
OLD_LIMIT = 50  # kill.max_per_sweep's default: this many processes tripped the old brake


def shipped_policy(tmp: Path, extra: str = "") -> Policy:
    """policies/default.yaml switched to enforce, as a policy directory (see the docstring)."""
    d = tmp / "policy.d"
    d.mkdir(exist_ok=True)
    state = tmp / "state"
    (state / "jobs").mkdir(parents=True, mode=0o700, exist_ok=True)
    state.chmod(0o700)
    shutil.copy(SHIPPED, d / "00-default.yaml")
    (d / "50-test.yaml").write_text(
        "version: 1\nmode: enforce\nmin_age: 0s\nevents: false\n"
        f"jobs:\n  sources: [statedir]\n  state_dir: {state}\n"
        f"audit:\n  fallback_file: {tmp}/audit.jsonl\n" + extra
    )
    return load_policy(d)


def sweep(policy: Policy, *users: User):
    sink = ListSink()
    report = run_sweep(policy, resolve_facts(policy), sink, uids={u.uid for u in users})
    return report, sink.records


def events(records, kind: str) -> list:
    return [r for r in records if r.event == kind]


def live_of(uid: int) -> list[int]:
    """uid's processes that are alive (not zombies)."""
    return [p for p in pids_of_uid(uid) if alive(p)]


def named(uid: int, name: str) -> list[int]:
    """uid's live processes whose argv[0] is name."""
    return [p for p in pids_of_uid(uid) if _argv0(p) == name and alive(p)]


def wait_named(uid: int, name: str, n: int) -> list[int]:
    deadline = time.monotonic() + 10
    while len(pids := named(uid, name)) < n:
        assert time.monotonic() < deadline, f"only {len(pids)} of {n} {name} started"
        time.sleep(0.05)
    return pids


def strays_of(user: User, n: int, name: str) -> list[int]:
    """n separate double-forked strays of user (each the root of its own tree)."""
    setsid_as(user, f"for i in $(seq {n}); do setsid -f bash -c 'exec -a {name} sleep 600'; done")
    return wait_named(user.uid, name, n)


def stray_tree(user: User, name: str, children: int = 1) -> list[int]:
    """A double-forked stray with `children` children: [root, *children]."""
    kids = " ".join(f"(exec -a {name}_c{i} sleep 600) &" for i in range(children))
    setsid_as(user, f"{kids} exec -a {name} sleep 600")
    root = wait_for_pid(user.uid, name)
    return [root, *(wait_for_pid(user.uid, f"{name}_c{i}") for i in range(children))]


# ---------------------------------------------------------------- (a) a fork bomb


@pytest.fixture
def pids_cgroup() -> Iterator[str]:
    """A root-made v1 pids cgroup that the bomb's first process enters before it forks."""
    with pids_limit(1000) as path:
        yield path


def test_a_fork_bomb_of_one_user_dies_in_one_sweep(tmp_path, make_user, pids_cgroup):
    policy = shipped_policy(tmp_path)
    assert policy.brake_max_uids == Policy().brake_max_uids  # the shipped brake
    user = make_user("prbk")
    # The shell that set the bomb off stays, as a user's shell would: it leads the session
    # every bomb process is in, so the kill's re-walk follows the session to the members
    # that were reparented to init. (A bomb whose leader is gone is left to the lineage
    # follow-up of the kill; this test is about the brake.)
    bomb = subprocess.Popen(
        ["sh", "-c", f"echo $$ > {pids_cgroup}/cgroup.procs && exec prlimit --nproc=900:900 "
         f"setpriv --reuid={user.uid} --regid={user.gid} --init-groups "
         "bash -c ':(){ :|:& }; : ; while :; do sleep 1; done'"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while len(before := live_of(user.uid)) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(before) >= 300, f"the bomb did not grow ({len(before)})"
        t0 = time.monotonic()
        report, records = sweep(policy, user)
        while (live := live_of(user.uid)) and time.monotonic() < t0 + 5:
            time.sleep(0.05)
        gone_after = time.monotonic() - t0
        assert not live and gone_after <= 5.0, (
            f"{len(live)} bomb processes alive {gone_after:.1f} s after the sweep started; "
            f"{report.summary()}")
        plan = report.observation.plan
        assert plan.brake is None, plan.brake
        killed = events(records, "process_killed")
        assert len(killed) > OLD_LIMIT  # the old brake would have held every one of them
        assert {r.fields["PRUNED_UID"] for r in killed} == {str(user.uid)}
        assert not events(records, "brake_tripped")
        # It kept forking through its SIGTERM (bash blocks it while retrying fork at the
        # pids limit), so the shipped 10 s grace was cut short.
        assert "grace cut short" in killed[0].message, killed[0].message
    finally:
        kill_uid_processes(user.uid)
        bomb.wait()


def test_a_sigterm_handler_that_forks_a_little_keeps_its_grace(tmp_path, make_user):
    policy = shipped_policy(tmp_path, "kill:\n  grace: 20s\n")
    user = make_user("prbg")
    done = Path(user.home) / "cleaned"
    # Its handler forks one command (sleep) and then writes a file: cleanup that needs time.
    setsid_as(user, "exec -a tidy bash -c 'trap \"sleep 1; echo ok > cleaned; exit 0\" TERM; "
              "while :; do sleep 0.1; done'")
    pid = wait_for_pid(user.uid, "tidy")
    _report, records = sweep(policy, user)
    assert not alive(pid) and done.read_text() == "ok\n", "the handler did not finish"
    [rec] = [r for r in events(records, "process_killed") if r.fields["PRUNED_PID"] == str(pid)]
    assert rec.fields["PRUNED_SIGNAL"] == "SIGTERM", rec.message  # no SIGKILL was needed
    assert "grace cut short" not in rec.message


# ---------------------------------------------------------------- (b) many strays of one user


def test_many_strays_of_one_user_do_not_hold_another_users_kill(tmp_path, make_user):
    policy = shipped_policy(tmp_path)
    many, other = make_user("prbm"), make_user("prbo")
    hoard = strays_of(many, OLD_LIMIT + 10, "hoard")
    victim = stray_tree(other, "lone")
    report, records = sweep(policy, many, other)
    assert report.observation.plan.brake is None, report.observation.plan.brake
    assert wait_dead(victim, 10), "the other user's stray survived"
    assert wait_dead(hoard, 10), "the hoard survived"
    killed = {int(r.fields["PRUNED_PID"]) for r in events(records, "process_killed")}
    assert set(victim) <= killed and set(hoard) <= killed


# ---------------------------------------------------------------- (c) the brake still trips


def test_more_uids_than_the_limit_kill_nothing(tmp_path, make_user):
    policy = shipped_policy(tmp_path)
    users = [make_user("prbt") for _ in range(policy.brake_max_uids + 1)]
    trees = {u.uid: stray_tree(u, f"t{i}", children=1) for i, u in enumerate(users)}
    big = trees[users[0].uid] + strays_of_tree(users[0], 40)  # one uid with a large tree
    trees[users[0].uid] = big
    report, records = sweep(policy, *users)
    plan = report.observation.plan
    assert plan.brake is not None and "kill.brake.max_uids=3" in plan.brake
    assert plan.brake_uids == tuple(sorted(u.uid for u in users))
    time.sleep(0.3)
    assert all(alive(p) for pids in trees.values() for p in pids)
    assert not events(records, "process_killed")
    [tripped] = events(records, "brake_tripped")
    assert tripped.fields["PRUNED_UIDS"] == " ".join(str(u) for u in plan.brake_uids)
    # One held record per uid per sweep, however many processes it held.
    held = events(records, "action_held")
    assert sorted(int(r.fields["PRUNED_UID"]) for r in held) == sorted(u.uid for u in users)
    by_uid = {int(r.fields["PRUNED_UID"]): r for r in held}
    assert int(by_uid[users[0].uid].fields["PRUNED_COUNT"]) == len(big)
    assert {int(p) for p in by_uid[users[0].uid].fields["PRUNED_TREE"].split()} <= set(big)
    assert int(by_uid[users[1].uid].fields["PRUNED_COUNT"]) == 2
    # scan/explain still see each process held, with the reason.
    held_procs = [d for d in plan.decisions if d.held_by == "brake"]
    assert {d.proc.pid for d in held_procs} == {p for pids in trees.values() for p in pids}
    # One uid fewer is within the brake: the same sweep kills them all.
    report, records = sweep(policy, *users[1:])
    assert report.observation.plan.brake is None
    assert wait_dead([p for u in users[1:] for p in trees[u.uid]], 10)
    assert all(alive(p) for p in big)  # out of that sweep's scope


def strays_of_tree(user: User, n: int) -> list[int]:
    """One more stray root of user with n children; their pids (root first)."""
    name = f"big{secrets.token_hex(2)}"
    kids = " ".join(f"(exec -a {name}_c sleep 600) &" for _ in range(n))
    setsid_as(user, f"{kids} exec -a {name} sleep 600")
    return [wait_for_pid(user.uid, name), *wait_named(user.uid, f"{name}_c", n)]


def _argv0(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode()
    except OSError:
        return ""


# ---------------------------------------------------------------- (d) the event path


def test_the_event_path_counts_uids_since_the_last_sweep(tmp_path, make_user):
    policy = shipped_policy(tmp_path, "kill:\n  grace: 2s\n  brake:\n    max_uids: 2\n")
    a, b, c = make_user("prbe"), make_user("prbe"), make_user("prbe")
    sink = ListSink()
    ctx = (policy, resolve_facts(policy), sink)
    jobs = read_jobs(make_sources(policy))
    reactor = Reactor(lambda: ctx, lambda _fresh: jobs, threading.Lock(),
                      uids={a.uid, b.uid, c.uid})  # handle() is called directly: no thread

    def handle(pids: list[int]):
        report = reactor.handle(set(pids))
        assert report is not None
        return report.observation.plan

    first = stray_tree(a, "ev_a1")
    assert handle(first).brake is None and wait_dead(first, 10)
    hoard = strays_of(b, OLD_LIMIT + 10, "ev_b")  # one batch, one uid, many processes
    assert handle(hoard).brake is None and wait_dead(hoard, 10)
    again = stray_tree(a, "ev_a2")  # a uid already counted costs nothing more
    assert handle(again).brake is None and wait_dead(again, 10)
    assert reactor.killed_uids == {a.uid, b.uid}
    third = stray_tree(c, "ev_c")
    plan = handle(third)
    assert plan.brake is not None and "since the last full sweep" in plan.brake, plan.brake
    assert plan.brake_uids == tuple(sorted((a.uid, b.uid, c.uid)))
    time.sleep(0.3)
    assert all(alive(p) for p in third)
    assert events(sink.records, "brake_tripped")
    # A full sweep starts a new window: the same stray dies by the next event batch.
    reactor.seed(procfs.snapshot())
    assert handle(third).brake is None and wait_dead(third, 10)
    assert reactor.killed_uids == {c.uid}


def test_the_daemons_event_path_brakes_on_a_new_uid(tmp_path, make_user, start_daemon):  # noqa: F811
    """End to end through `pruned run` (events on, the periodic sweep far away): with
    max_uids 1 the event path kills a's strays, holds b's (brake_tripped from an event-
    batch), and goes on killing a's."""
    a, b = make_user("prbd"), make_user("prbd")
    policy = daemon_policy(tmp_path, events=True, schedule={"sweep": FAR},
                           kill={"grace": "1s", "brake": {"max_uids": 1}})
    d = start_daemon(policy, [a.uid, b.uid])
    d.ready()
    first = plant_stray(a, "prbd_a1")
    assert daemon_wait_dead(first, 5), "a's first stray was not killed by the event path"
    held = plant_stray(b, "prbd_b")
    rec = d.wait_audit(PRUNED_EVENT="brake_tripped")
    assert rec["PRUNED_SWEEP_ID"].startswith("event-") and rec["PRUNED_UIDS"] == " ".join(
        str(u) for u in sorted((a.uid, b.uid))), rec
    second = plant_stray(a, "prbd_a2")
    assert daemon_wait_dead(second, 5), "a uid already counted must stay free"
    assert alive(held)
    assert d.stop() == 0

"""SlurmCgroupSource against real cgroups: a fake Slurm tree in the v1 freezer and cpuset
hierarchies and in cgroup2 (unified), with real processes of real test users in it.

Names are random (`slurm_prt<hex>`, `<hex>_slurmstepd.scope`, 7-digit job ids) so the real
cluster's `slurm_vm` tree and other tests' trees are never touched. The "slurmstepd" and
"slurmd" are copies of /usr/bin/sleep at a tmp path, passed to the source as their paths.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from pruned.jobs.slurm import SlurmCgroupSource
from pruned.model import ProcKey
from tests.fixtures.paths import REPO
from tests.fixtures.users import User, run_as

CG = "/sys/fs/cgroup"
V1_CTRLS = ("freezer", "cpuset")
UNIFIED = f"{CG}/unified"

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for cgroups and users"),
    pytest.mark.skipif(
        not all(os.path.isdir(f"{CG}/{c}") for c in V1_CTRLS),
        reason="needs cgroup v1 freezer+cpuset",
    ),
]


def _job_id() -> str:
    return str(7_000_000 + secrets.randbelow(2_000_000))


@dataclass
class Cgroups:
    """cgroup dirs this test made (removed bottom-up) and processes it started (killed by pid)."""

    dirs: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def mkdir(self, path: str) -> str:
        """mkdir -p for a cgroup path; cpuset levels get cpus/mems copied from the parent."""
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            self.mkdir(parent)
        if not os.path.isdir(path):
            os.mkdir(path)
            self.dirs.append(path)
            if "/cpuset/" in path:
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    with open(f"{parent}/{knob}") as f:
                        value = f.read().strip()
                    with open(f"{path}/{knob}", "w") as f:
                        f.write(value)
        return path

    def put(self, pid: int, *paths: str) -> None:
        for path in paths:
            with open(f"{self.mkdir(path)}/cgroup.procs", "w") as f:
                f.write(str(pid))

    def start(self, argv: list[str], user: User | None = None, exe: str | None = None) -> int:
        """Start argv (as root or `user`); return once it runs `exe` (default argv[0]) with its
        final uid."""
        p = run_as(user, argv) if user else subprocess.Popen(argv, start_new_session=True)
        self.procs.append(p)
        want_uid = user.uid if user else 0
        want_exe = os.path.realpath(exe or shutil.which(argv[0]) or argv[0])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # setpriv switches uid, then execs: wait for both
            with contextlib.suppress(OSError):
                with open(f"/proc/{p.pid}/status") as f:
                    uid = int(next(x for x in f if x.startswith("Uid:")).split()[1])
                if uid == want_uid and os.readlink(f"/proc/{p.pid}/exe") == want_exe:
                    return p.pid
            time.sleep(0.005)
        raise TimeoutError(f"{argv} did not start")

    def stop(self, pid: int) -> None:
        for p in self.procs:
            if p.pid == pid and p.poll() is None:
                p.kill()
                p.wait()

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for path in reversed(self.dirs):
            for _ in range(50):  # a just-killed task may take a moment to leave the cgroup
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)


@pytest.fixture(scope="module")
def bins() -> Iterator[dict[str, str]]:
    """Copies of sleep: the stepd, the slurmd, and a look-alike named slurmstepd elsewhere."""
    d = tempfile.mkdtemp(prefix="prt-jobs-")
    os.chmod(d, 0o755)  # test users must be able to exec the copies
    os.mkdir(f"{d}/other", 0o755)
    out = {
        "stepd": f"{d}/slurmstepd",
        "slurmd": f"{d}/slurmd",
        "lookalike": f"{d}/other/slurmstepd",
        "root_other": f"{d}/other/stepd-helper",
    }
    for path in out.values():
        shutil.copy2("/usr/bin/sleep", path)
        os.chmod(path, 0o755)
    yield out
    shutil.rmtree(d)


@dataclass
class V1World:
    root: str  # "slurm_prt<hex>"
    run_job: str
    crashed_job: str
    empty_job: str
    stepd: int
    batch: int
    task: int
    extern_sleep: int
    crashed_user: int
    user_stepd: int
    lookalike: int
    root_lookalike: int
    slurmd: int
    user_a: User
    user_b: User


@pytest.fixture(scope="module")
def v1(make_user, bins) -> Iterator[V1World]:
    user_a, user_b = make_user("prj"), make_user("prj")
    root = f"slurm_prt{secrets.token_hex(3)}"
    run_job, crashed_job, empty_job = _job_id(), _job_id(), _job_id()
    cg = Cgroups()

    def at(ctrl: str, uid: int, job: str, tail: str = "") -> str:
        return f"{CG}/{ctrl}/{root}/uid_{uid}/job_{job}" + (f"/{tail}" if tail else "")

    try:
        a, b = user_a.uid, user_b.uid
        # Running job: stepd at the job level in freezer, at the step level in cpuset (as Slurm).
        stepd = cg.start([bins["stepd"], "600"])
        cg.put(stepd, at("freezer", a, run_job), at("cpuset", a, run_job, "step_batch"))
        batch = cg.start(["sleep", "601"], user_a)
        cg.put(
            batch, at("freezer", a, run_job, "step_batch"), at("cpuset", a, run_job, "step_batch")
        )
        task = cg.start(["sleep", "602"], user_a)
        cg.put(task, at("freezer", a, run_job, "step_0"), at("cpuset", a, run_job, "step_0/task_0"))
        extern_sleep = cg.start(["sleep", "603"])  # Slurm 22.05's extern sleep runs as root
        cg.put(
            extern_sleep,
            at("freezer", a, run_job, "step_extern"),
            at("cpuset", a, run_job, "step_extern"),
        )
        # Crashed job: processes, but no root stepd: a user running the stepd binary, a user
        # binary called slurmstepd, a root binary of another name. (A ROOT binary named
        # slurmstepd at another path does count: a versioned install or an upgrade moves it.)
        crashed_user = cg.start(["sleep", "604"], user_a)
        cg.put(crashed_user, *(at(c, a, crashed_job, "step_batch") for c in V1_CTRLS))
        user_stepd = cg.start([bins["stepd"], "605"], user_a)
        cg.put(user_stepd, *(at(c, a, crashed_job) for c in V1_CTRLS))
        lookalike = cg.start([bins["lookalike"], "606"], user_a)
        cg.put(lookalike, *(at(c, a, crashed_job) for c in V1_CTRLS))
        root_lookalike = cg.start([bins["root_other"], "607"])
        cg.put(root_lookalike, *(at(c, a, crashed_job) for c in V1_CTRLS))
        # Empty job of user_b: cgroups only.
        for c in V1_CTRLS:
            cg.mkdir(at(c, b, empty_job, "step_batch"))
        slurmd = cg.start([bins["slurmd"], "608"])
        yield V1World(
            root, run_job, crashed_job, empty_job, stepd, batch, task, extern_sleep, crashed_user,
            user_stepd, lookalike, root_lookalike, slurmd, user_a, user_b,
        )  # fmt: skip
    finally:
        cg.cleanup()


def running_v1_job(cg: Cgroups, bins: dict[str, str], uid: int) -> tuple[
        str, int, Callable[..., str]]:
    """A running v1 job of uid in a fresh slurm_prt* tree, as Slurm lays it out: its stepd at
    the job level in freezer and in cpuset's step_batch, and a slurmd beside it. (job id,
    the stepd's pid, at(ctrl, tail="") -> the job's cgroup path in ctrl). Skips without the
    v1 freezer and cpuset."""
    if not all(os.path.isdir(f"{CG}/{c}") for c in V1_CTRLS):
        pytest.skip("needs cgroup v1 freezer+cpuset")
    root = f"slurm_prt{secrets.token_hex(3)}"
    job = _job_id()

    def at(ctrl: str, tail: str = "") -> str:
        return f"{CG}/{ctrl}/{root}/uid_{uid}/job_{job}" + (f"/{tail}" if tail else "")

    stepd = cg.start([bins["stepd"], "600"])
    cg.put(stepd, at("freezer"), at("cpuset", "step_batch"))
    cg.start([bins["slurmd"], "600"])
    return job, stepd, at


def _source(bins: dict[str, str], **kw) -> SlurmCgroupSource:
    kw.setdefault("stepd_paths", (bins["stepd"],))
    kw.setdefault("slurmd_paths", (bins["slurmd"],))
    kw.setdefault("slurmd_pidfiles", ())
    return SlurmCgroupSource(**kw)


def test_v1_running_crashed_and_empty_jobs(v1: V1World, bins) -> None:
    view = _source(bins).read()
    assert view.problems == ()
    run, crashed, empty = (view.jobs[j] for j in (v1.run_job, v1.crashed_job, v1.empty_job))
    assert run.running and run.why_not_running == ""
    assert run.uid == v1.user_a.uid and run.source == "slurm"
    assert not crashed.running
    assert crashed.why_not_running == f"no live slurmstepd in job_{v1.crashed_job}'s cgroups"
    assert not empty.running and empty.uid == v1.user_b.uid
    assert "no processes" in empty.why_not_running
    assert view.running_for(v1.user_a.uid) == [run]
    assert view.running_for(v1.user_b.uid) == []


def test_v1_dirs_start_and_extern(v1: V1World, bins) -> None:
    job = _source(bins).read().jobs[v1.run_job]
    a = v1.user_a.uid
    assert set(job.cgroup_dirs) == {
        f"{CG}/{c}/{v1.root}/uid_{a}/job_{v1.run_job}" for c in V1_CTRLS
    }
    externs = {f"{CG}/{c}/{v1.root}/uid_{a}/job_{v1.run_job}/step_extern" for c in V1_CTRLS}
    assert set(job.extern_dirs) == externs
    # pam_slurm_adopt's rule: the start is the mtime of step_extern (freezer's is read first).
    assert (
        job.start
        == os.stat(f"{CG}/freezer/{v1.root}/uid_{a}/job_{v1.run_job}/step_extern").st_mtime
    )
    empty = _source(bins).read().jobs[v1.empty_job]
    assert empty.extern_dirs == ()
    b = v1.user_b.uid
    assert empty.start == os.stat(f"{CG}/freezer/{v1.root}/uid_{b}/job_{v1.empty_job}").st_mtime


def test_v1_membership_keeps_the_deepest_entry(v1: V1World, bins) -> None:
    m = _source(bins).read().membership
    base = f"/{v1.root}/uid_{v1.user_a.uid}/job_{v1.run_job}"
    # The stepd is at job level in freezer but in step_batch in cpuset: the step wins.
    assert m[v1.stepd].cgroup == f"cpuset:{base}/step_batch" and m[v1.stepd].step == "batch"
    assert m[v1.batch].cgroup == f"freezer:{base}/step_batch"  # a tie: freezer is read first
    assert m[v1.task].cgroup == f"cpuset:{base}/step_0/task_0" and m[v1.task].step == "0"
    assert m[v1.extern_sleep].step == "extern" and m[v1.extern_sleep].job_id == v1.run_job
    assert not any(x.stepd for x in (m[v1.stepd], m[v1.batch]))  # v1 has no stepd slot
    crashed = f"/{v1.root}/uid_{v1.user_a.uid}/job_{v1.crashed_job}"
    assert m[v1.user_stepd].cgroup == f"freezer:{crashed}" and m[v1.user_stepd].step is None
    assert m[v1.crashed_user].job_id == v1.crashed_job
    assert v1.slurmd not in m


def test_v1_a_dead_stepd_makes_the_job_stale(v1: V1World, bins) -> None:
    """A job whose stepd is killed goes from running to stale; slurmd alive: no problem."""
    cg = Cgroups()
    job, uid = _job_id(), v1.user_a.uid
    try:
        stepd = cg.start([bins["stepd"], "600"])
        paths = [f"{CG}/{c}/{v1.root}/uid_{uid}/job_{job}" for c in V1_CTRLS]
        cg.put(stepd, *paths)
        worker = cg.start(["sleep", "600"], v1.user_a)
        cg.put(worker, *(f"{p}/step_batch" for p in paths))
        assert _source(bins).read().jobs[job].running
        cg.stop(stepd)
        view = _source(bins).read()
        assert not view.jobs[job].running
        assert view.problems == ()
        assert view.membership[worker].job_id == job  # its processes are still in the job cgroup
    finally:
        cg.cleanup()


def test_paths_given_as_symlinks_match_the_resolved_exe(v1: V1World, bins, tmp_path) -> None:
    """Debian's /usr/sbin/slurmstepd is an alternatives symlink; /proc/PID/exe is the target."""
    (tmp_path / "stepd-link").symlink_to(bins["stepd"])
    (tmp_path / "slurmd-link").symlink_to(bins["slurmd"])
    view = _source(
        bins,
        stepd_paths=(str(tmp_path / "stepd-link"),),
        slurmd_paths=(str(tmp_path / "slurmd-link"),),
    ).read()
    assert view.problems == () and view.jobs[v1.run_job].running


def test_v1_no_slurmd_is_a_problem(v1: V1World, bins) -> None:
    view = _source(bins, slurmd_paths=("/nonexistent/no-such-daemon",)).read()
    assert any("slurmd is not running" in p and "job state unknown" in p for p in view.problems)
    # The jobs are still reported: report-only mode needs them to say what it would do.
    assert view.jobs[v1.run_job].running


def test_slurmd_found_through_its_pidfile(v1: V1World, bins, tmp_path) -> None:
    pidfile = tmp_path / "slurmd.pid"
    pidfile.write_text(f"{v1.slurmd}\n")
    assert _source(bins, slurmd_pidfiles=(str(pidfile),)).read().problems == ()
    # A pidfile naming a process that is not slurmd proves nothing; the /proc pass still finds it.
    pidfile.write_text(f"{v1.batch}\n")
    assert _source(bins, slurmd_pidfiles=(str(pidfile),)).read().problems == ()


def test_a_root_stepd_outside_every_job_cgroup_is_a_problem(v1: V1World, bins) -> None:
    cg = Cgroups()
    try:
        lost = cg.start([bins["stepd"], "600"])
        time.sleep(0.05)  # let it exec
        # A young one may be a step still moving itself into its cgroup: not yet a problem.
        assert _source(bins).read().problems == ()
        view = _source(bins, stepd_grace=0.0).read()
        assert any(f"slurmstepd pid {lost} is in no job cgroup" in p for p in view.problems)
        assert _source(bins, stepd_grace=0.0, find_outside_stepds=False).read().problems == ()
    finally:
        cg.cleanup()


def test_a_user_cannot_read_the_tree_well_enough(v1: V1World, bins) -> None:
    """Run the read as a test user: root members' /proc/PID/exe is unreadable -> a problem."""
    code = (
        "from pruned.jobs.slurm import SlurmCgroupSource as S;"
        f"v = S(stepd_paths=({bins['stepd']!r},), find_outside_stepds=False).read();"
        "print('\\n'.join(v.problems))"
    )
    repo = str(REPO)
    py = os.path.join(repo, ".venv/bin/python")
    p = run_as(
        v1.user_b,
        [py, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": repo},
    )
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "permission denied" in out and "must run as root" in out


def test_missing_or_empty_cgroup_root_is_a_problem(tmp_path) -> None:
    view = SlurmCgroupSource(cgroup_root=str(tmp_path / "nope")).read()
    assert len(view.problems) == 1 and "nope" in view.problems[0]
    (tmp_path / "freezer").mkdir()  # a directory, but no cgroup in it
    view = SlurmCgroupSource(cgroup_root=str(tmp_path)).read()
    assert view.problems == (f"cgroup root {tmp_path}: no cgroup hierarchy mounted",)


# ------------------------------------------------------------------ cgroup v2


@dataclass
class V2World:
    scope: str
    run_job: str
    crashed_job: str
    stepd: int
    task: int
    extern_root: int
    infra: int
    crashed_task: int
    user_a: User
    user_b: User


@pytest.fixture(scope="module")
def v2(make_user, bins) -> Iterator[V2World]:
    if not os.path.exists(f"{UNIFIED}/cgroup.controllers"):
        pytest.skip("no cgroup2 at /sys/fs/cgroup/unified")
    user_a, user_b = make_user("prk"), make_user("prk")
    slice_dir = f"{UNIFIED}/system.slice"
    made_slice = not os.path.isdir(slice_dir)
    scope = f"{slice_dir}/prt{secrets.token_hex(3)}_slurmstepd.scope"
    run_job, crashed_job = _job_id(), _job_id()
    cg = Cgroups()
    try:
        with contextlib.suppress(FileExistsError):  # another test may make it at the same time
            os.makedirs(slice_dir)
        infra = cg.start([bins["stepd"], "600"])
        cg.put(infra, f"{scope}/system")
        stepd = cg.start([bins["stepd"], "601"])
        cg.put(stepd, f"{scope}/job_{run_job}/step_batch/slurm")
        task = cg.start(["sleep", "602"], user_a)
        cg.put(task, f"{scope}/job_{run_job}/step_batch/user/task_0")
        extern_root = cg.start(["sleep", "603"])
        # Slurm puts the extern step's processes in its user/task_special leaf (v2: no
        # processes in inner cgroups), and so is where adoption must write.
        cg.put(extern_root, f"{scope}/job_{run_job}/step_extern/user/task_special")
        crashed_task = cg.start(["sleep", "604"], user_b)
        cg.put(crashed_task, f"{scope}/job_{crashed_job}/step_0/user/task_0")
        yield V2World(
            scope,
            run_job,
            crashed_job,
            stepd,
            task,
            extern_root,
            infra,
            crashed_task,
            user_a,
            user_b,
        )
    finally:
        cg.cleanup()
        if made_slice:
            with contextlib.suppress(OSError):  # EBUSY when another test uses it too
                os.rmdir(slice_dir)


@pytest.mark.parametrize("how", ["hybrid", "pure_v2_root", "explicit_scope"])
def test_v2_jobs_membership_and_uid(v2: V2World, bins, how: str) -> None:
    kw: dict = {
        "hybrid": {"cgroup_root": CG},
        # The v1 fixture's stepd is alive and invisible from a v2-only root: don't count it.
        "pure_v2_root": {"cgroup_root": UNIFIED, "find_outside_stepds": False},
        "explicit_scope": {"cgroup_root": CG, "v2_scopes": (v2.scope,), "search_v2": False},
    }[how]
    view = _source(bins, **kw).read()
    assert view.problems == ()
    run, crashed = view.jobs[v2.run_job], view.jobs[v2.crashed_job]
    assert run.running and not crashed.running
    # v2 paths carry no uid: it comes from the non-stepd members (the root extern sleep loses).
    assert run.uid == v2.user_a.uid
    assert crashed.uid == v2.user_b.uid
    assert run.extern_dirs == (f"{v2.scope}/job_{v2.run_job}/step_extern/user/task_special",)
    assert run.cgroup_dirs == (f"{v2.scope}/job_{v2.run_job}",)
    m = view.membership
    rel = "/system.slice/" + os.path.basename(v2.scope)
    assert m[v2.task].cgroup == f"0::{rel}/job_{v2.run_job}/step_batch/user/task_0"
    assert m[v2.task].step == "batch" and not m[v2.task].stepd
    assert m[v2.stepd].stepd and m[v2.stepd].cgroup.endswith("/step_batch/slurm")
    assert m[v2.extern_root].step == "extern"
    assert v2.infra not in m  # scope/system is infrastructure, not a job (and not "outside")


def test_v2_job_of_only_root_extern_processes_has_no_user_uid(v2: V2World, bins) -> None:
    """A job whose only members are the stepd and the root extern sleep: uid None, not 0."""
    cg = Cgroups()
    job = _job_id()
    try:
        stepd = cg.start([bins["stepd"], "600"])
        cg.put(stepd, f"{v2.scope}/job_{job}/step_extern/slurm")
        sleeper = cg.start(["sleep", "600"])
        cg.put(sleeper, f"{v2.scope}/job_{job}/step_extern/user/task_special")
        j = _source(bins, cgroup_root=UNIFIED).read().jobs[job]
        assert j.running and j.uid is None
    finally:
        cg.cleanup()


def test_v2_sluid_job_dirs_and_another_slice(v2: V2World, bins) -> None:
    """Slurm 26.05 names job cgroups by SLUID; the genuine root stepd's argv gives the number
    that SLURM_JOB_ID, the history and job_dirs use. A scope in another slice (CgroupSlice)
    is found too; a dir in a scope that is no known layout is doubt, never a stray."""
    cg = Cgroups()
    job = _job_id()
    sluid = "s" + "".join(secrets.choice("0123456789ABCDEFGHJKMNPQRSTVWXYZ") for _ in range(13))
    other = f"{UNIFIED}/prt{secrets.token_hex(3)}.slice/hpc-jobs.slice"
    scope = f"{other}/n1_slurmstepd.scope"
    try:
        argv = ["bash", "-c", f'exec -a "slurmstepd: [{job}.batch]" {bins["stepd"]} 600']
        stepd = cg.start(argv, exe=bins["stepd"])
        cg.put(stepd, f"{scope}/{sluid}/step_batch/slurm")
        task = cg.start(["sleep", "601"], v2.user_a)
        cg.put(task, f"{scope}/{sluid}/step_batch/user/task_0")
        odd = cg.start(["sleep", "602"], v2.user_b)
        cg.put(odd, f"{scope}/{sluid}/step_batch/user/task_0x")
        cg.start([bins["slurmd"], "603"])  # a live slurmd: job state is known
        view = _source(bins, cgroup_root=UNIFIED, find_outside_stepds=False).read()
        assert view.aliases == {sluid: job}
        j = view.jobs[job]
        assert j.running and j.uid == v2.user_a.uid
        assert j.cgroup_dirs == (f"{scope}/{sluid}",)
        m = view.membership
        assert m[task].job_id == job and m[task].step == "batch" and m[task].understood
        assert m[stepd].stepd
        # the look-alike leaf: named in a problem, its process left alone
        assert not m[odd].understood and m[odd].cgroup.endswith("/task_0x")
        assert view.problems == (
            f"cgroup {m[odd].cgroup.removeprefix('0::')} is in Slurm's tree but not a layout"
            " pruned knows: its processes are left alone",
        )
        assert view.job(sluid) is j
    finally:
        cg.cleanup()
        for d in (other, os.path.dirname(other)):
            with contextlib.suppress(OSError):
                os.rmdir(d)


def test_v2_adoption_makes_the_extern_leaf_when_slurm_has_not(v2: V2World, bins) -> None:
    """26.05 creates step_extern/user/task_special only when it first adopts a process; until
    then the job's adoption target is that leaf, and adopting makes it, then moves there."""
    from pruned.act.adopt import adopt

    cg = Cgroups()
    job = _job_id()
    try:
        stepd = cg.start([bins["stepd"], "600"])
        cg.put(stepd, f"{v2.scope}/job_{job}/step_extern/slurm")
        cg.mkdir(f"{v2.scope}/job_{job}/step_extern/user")
        task = cg.start(["sleep", "601"], v2.user_a)
        cg.put(task, f"{v2.scope}/job_{job}/step_batch/user/task_0")
        stray = cg.start(["sleep", "602"], v2.user_a)
        leaf = f"{v2.scope}/job_{job}/step_extern/user/task_special"
        j = _source(bins, cgroup_root=UNIFIED, find_outside_stepds=False).read().jobs[job]
        assert j.extern_dirs == (leaf,) and not os.path.exists(leaf)
        with open(f"/proc/{stray}/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])
        r = adopt(ProcKey(stray, start), [], j.extern_dirs, dry_run=False, uid=v2.user_a.uid)
        cg.dirs.append(leaf)  # removed with the others
        assert r.ok, r.describe()
        with open(f"{leaf}/cgroup.procs") as f:
            assert str(stray) in f.read().split()
    finally:
        cg.cleanup()


# ------------------------------------------------------------------ the real cluster (optional)


def _cluster_up() -> bool:
    if shutil.which("scontrol") is None or not any(
        n.startswith("slurm_") for n in os.listdir(f"{CG}/freezer")
    ):
        return False
    r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    return r.returncode == 0 and "UP" in r.stdout


@pytest.mark.cluster
def test_real_cluster_tree_reads_without_problems() -> None:
    if not _cluster_up():
        pytest.skip("the Slurm test cluster is not up")
    # Other tests drive this cluster (restart slurmd, crash stepds), and those are real
    # problems while they last: one clean read within a few seconds is the check.
    seen = []
    for _ in range(20):
        view = SlurmCgroupSource().read()
        if not view.problems:
            return
        seen.append(view.problems)
        time.sleep(0.5)
    pytest.fail(f"never a clean read of the real tree: {seen[-1]}")

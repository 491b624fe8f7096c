"""(a) The real cgroup lines of every process of a job on this release, written to
results/cgroup_paths.txt, which run.sh copies to tests/fixtures/cgroup_paths/<release>.txt
(the path grammar's table tests read those)."""

from __future__ import annotations

from scene import ROLES, Scene
from vmlib import RESULTS


def test_capture_cgroup_lines_of_every_job_process(scene: Scene) -> None:
    # scene.build() wrote the file the moment the scene stood.
    text = (RESULTS / "cgroup_paths.txt").read_text()
    print(text)
    for role, p in scene.all():
        assert f"{role}\t{p.user}\t{p.comm}\t{p.cgroup[0]}" in text, (role, p.label())
    missing = [role for role, r in ROLES.items() if r.required and not scene.roles.get(role)]
    assert not missing, f"scene incomplete, no process for: {missing}"


def test_job_processes_sit_in_slurms_v2_scope(scene: Scene) -> None:
    # Every process of alice's job is under <node>_slurmstepd.scope/<job dir>/step_*: the
    # v2 layout, one line per process and nothing of cgroup v1.
    for role in ("batch_script", "batch_sleep", "job_daemon", "srun_task", "ssh_command",
                 "ssh_daemon", "ssh_session", "stepd"):
        for p in scene.roles[role]:
            assert len(p.cgroup) == 1 and p.cgroup[0].startswith("0::/"), p.label()
            assert f"slurmstepd.scope/{scene.alice_dir}/step_" in p.cgroup_path, (role, p.label())


def test_adopted_login_lands_in_the_extern_step(scene: Scene) -> None:
    for role in ("ssh_session", "ssh_command", "ssh_daemon"):
        for p in scene.roles[role]:
            assert f"/{scene.alice_dir}/step_extern/" in p.cgroup_path + "/", (role, p.label())


def test_crashed_steps_processes_survive_in_the_job_cgroup(scene: Scene) -> None:
    # The premise of "stray.ended_job": with its slurmstepds SIGKILLed, scancel kills nothing.
    assert scene.dave_killed, "dave's job had no slurmstepd to kill"
    names = sorted(p.argv0 for p in scene.roles["crash_left"])
    assert names == ["vm_crash_daemon", "vm_crash_sleep"], names
    assert scene.dave_state != "RUNNING"

"""The Slurm cgroup path grammar: no exception on any text, and job id / step / task of every
path Slurm would make come back out of it."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from pruned.jobs.slurmpath import (
    SLUID,
    is_sluid,
    job_ids_in,
    membership_of,
    not_understood,
    parse_slurm_cgroup_path,
    unknown_lines,
)
from tests.fuzz._settings import fuzz

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
job_num = st.integers(1, 2**32 - 1).map(str)
sluid = st.text(CROCKFORD, min_size=13, max_size=13).map(lambda s: "s" + s)
name = st.text(
    st.characters(blacklist_characters="/\n\0", blacklist_categories=["Cs"]),
    min_size=1,
    max_size=10,
)
step = st.sampled_from(["batch", "extern", "interactive", "0", "1", "4294967294"]) | name
task = st.integers(0, 4096).map(str)


@st.composite
def v1_path(draw: st.DrawFn) -> tuple[str, dict]:
    root = "slurm" + draw(st.sampled_from(["", "_node01", "_vm"]) | name)
    uid, job = draw(st.integers(0, 2**32 - 2)), draw(job_num)
    path = f"/{root}/uid_{uid}/job_{job}"
    want = {"version": 1, "root": root, "job_id": job, "uid": uid, "step": None, "task": None}
    if draw(st.booleans()):
        want["step"] = s = draw(step)
        path += f"/step_{s}"
        if draw(st.booleans()):
            want["task"] = t = draw(task)
            path += f"/task_{t}"
    return path, want


@st.composite
def v2_path(draw: st.DrawFn) -> tuple[str, dict]:
    slices = draw(st.lists(name.map(lambda n: n + ".slice"), min_size=1, max_size=3))
    node = draw(st.sampled_from(["", "node01_", "vm_"]) | name.map(lambda n: n + "_"))
    root = "/".join(slices) + f"/{node}slurmstepd.scope"
    by_sluid = draw(st.booleans())
    job = draw(sluid if by_sluid else job_num)
    path = f"/{root}/{job if by_sluid else 'job_' + job}"
    want = {
        "version": 2,
        "root": root,
        "job_id": job,
        "uid": None,
        "step": None,
        "task": None,
        "stepd": False,
        "sluid": by_sluid,
    }
    if draw(st.booleans()):
        want["step"] = s = draw(step)
        path += f"/step_{s}"
        slot = draw(st.sampled_from([None, "slurm", "user"]))
        if slot:
            path += f"/{slot}"
            want["stepd"] = slot == "slurm"
            if slot == "user" and draw(st.booleans()):
                want["task"] = t = draw(task | st.just("special"))
                path += f"/task_{t}"
    return path, want


def as_line(draw: st.DrawFn, path: str, version: int) -> str:
    """The path as a /proc/PID/cgroup line, an absolute path under the mount, or bare."""
    form = draw(st.sampled_from(["line", "mount", "bare", "slash"]))
    if form == "line":
        return f"0::{path}" if version == 2 else f"4:freezer:{path}"
    if form == "mount":
        return f"/sys/fs/cgroup{path}" if version == 2 else f"/sys/fs/cgroup/freezer{path}"
    return path + "/" if form == "slash" else path


@fuzz(3)
@given(st.data())
def test_valid_paths_round_trip(data: st.DataObject) -> None:
    path, want = data.draw(v1_path() | v2_path())
    line = as_line(data.draw, path, want["version"])
    sp = parse_slurm_cgroup_path(line)
    assert sp is not None, line
    assert {k: getattr(sp, k) for k in want} == want
    assert not not_understood(line)
    assert job_ids_in([line]) == {want["job_id"]}
    m = membership_of([line])
    assert m is not None and (m.job_id, m.step, m.cgroup) == (want["job_id"], want["step"], line)
    assert m.understood


@fuzz()
@given(sluid)
def test_sluids(s: str) -> None:
    assert is_sluid(s) and not is_sluid(s + "0") and not is_sluid(s[:-1])
    assert SLUID.startswith("s")


text_near_slurm = st.lists(
    st.sampled_from(
        [
            "slurm",
            "slurm_x",
            "uid_1",
            "uid_",
            "job_1",
            "job_",
            "step_",
            "step_0",
            "task_1",
            "task_",
            "task_special",
            "user",
            "slurm",
            "system.slice",
            "a.slice",
            "slurmstepd.scope",
            "x_slurmstepd.scope",
            "s0123456789ABC",
            "system",
            "",
            "..",
            "0::",
            "4:freezer:",
            "sys",
            "fs",
            "cgroup",
        ]
    )
    | name,
    max_size=9,
).map("/".join)


@fuzz(3)
@given(st.text(max_size=200) | text_near_slurm | text_near_slurm.map(lambda t: "0::/" + t))
@example("0::/system.slice/slurmstepd.scope/job_1/step_0/slurm/task_0")
@example("/" + "a.slice/" * 2000 + "x")  # many slices and no scope: stays linear
@example("0::/" + "x_" * 3000 + "slurmstepd.scope/job_1")
def test_any_text(text: str) -> None:
    sp = parse_slurm_cgroup_path(text)
    nu = not_understood(text)
    assert not (sp is not None and nu)  # never both a job path and not understood
    m = membership_of([text])
    if nu:
        assert m is not None and not m.understood
    elif sp is not None:
        assert m is not None and m.job_id == sp.job_id
    else:
        assert m is None
    assert unknown_lines([text]) == ([text] if nu else [])

"""/proc/PID/{stat,status,cgroup,environ}: every text parses or raises ValueError, and what the
kernel would write parses back to what it was written from."""

from __future__ import annotations

import contextlib

from hypothesis import example, given
from hypothesis import strategies as st

from pruned.linux.procfs import PF_KTHREAD, parse_cgroup, parse_stat, parse_status
from pruned.rules.epilog import job_ids_in_environ
from tests.fuzz._settings import fuzz

U64 = 2**64 - 1
STATES = "RSDZTtXxIKWPN"

# ---------------------------------------------------------------- /proc/PID/stat

# comm: any bytes but NUL (prctl PR_SET_NAME; the kernel does not escape it in stat): spaces,
# '(' and ')', newlines, invalid UTF-8. Real ones are at most 64 bytes (kernel threads).
comm_bytes = st.binary(max_size=64).map(lambda b: b.replace(b"\0", b"")) | st.sampled_from(
    [
        b"",
        b")",
        b"(",
        b") (",
        b"a) R 1 2 3",
        b"x\n) Z 9 9 9",
        b"\xff\xfe(",
        b"caf\xc3\xa9 \xe2\x98\x95",
    ]
)
pids = st.integers(0, 4194304)


@st.composite
def stat_fields(draw: st.DrawFn) -> dict:
    return {
        "pid": draw(pids),
        "comm": draw(comm_bytes),
        "state": draw(st.sampled_from(STATES)),
        "ppid": draw(pids),
        "pgrp": draw(pids),
        "session": draw(pids),
        "flags": draw(st.integers(0, 2**32 - 1) | st.just(PF_KTHREAD)),
        "starttime": draw(st.integers(0, U64)),
        "tail": draw(st.integers(1, 32)),  # how many fields after starttime (the parser wants 1)
    }


def stat_bytes(f: dict) -> bytes:
    """A /proc/PID/stat line as fs/proc/array.c writes it (52 fields in all)."""
    after = [
        f["ppid"],
        f["pgrp"],
        f["session"],
        34816,
        -1,
        f["flags"],
        100,
        0,
        0,
        0,
        1,
        2,
        0,
        0,
        20,
        0,
        1,
        0,
        f["starttime"],
        3133440,
        394,
        U64,
    ] + [0] * 29
    after = after[: 19 + f["tail"]]
    head = b"%d (%s) %s " % (f["pid"], f["comm"], f["state"].encode())
    return head + " ".join(str(x) for x in after).encode() + b"\n"


def expect(f: dict, comm: str) -> tuple:
    return (comm, f["state"], f["ppid"], f["pgrp"], f["session"], f["flags"], f["starttime"])


@fuzz(3)
@given(stat_fields())
def test_stat_round_trip(f: dict) -> None:
    got = parse_stat(stat_bytes(f).decode("utf-8", "surrogateescape"))
    # comm comes back byte for byte (surrogateescape for what is not UTF-8)
    assert tuple(got) == expect(f, f["comm"].decode("utf-8", "surrogateescape"))
    assert got.kthread == bool(f["flags"] & PF_KTHREAD)


def mutations(base: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Cut, splice and overwrite valid lines: garbage that is close to the real thing."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(base))
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data)))
            op = draw(st.sampled_from(["cut", "insert", "delete", "flip"]))
            if op == "cut":
                data = data[:i]
            elif op == "insert":
                data[i:i] = draw(
                    st.binary(min_size=1, max_size=8)
                    | st.sampled_from(
                        [b")", b"(", b" ", b"\n", b"-", b"x", b"\xff", b"99999999999999999999999"]
                    )
                )
            elif op == "delete":
                del data[i : i + draw(st.integers(1, 8))]
            elif data:
                data[min(i, len(data) - 1)] = draw(st.integers(0, 255))
        return bytes(data)

    return mutate()


garbage_stat = st.binary(max_size=400) | mutations(stat_fields().map(stat_bytes))


@fuzz(3)
@given(garbage_stat)
@example(b"")
@example(b"1 (x)")
@example(b"1 )x( S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5")
def test_stat_garbage_only_valueerror(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    try:
        got = parse_stat(text)
    except ValueError:
        return
    assert got.state and isinstance(got.ppid, int) and isinstance(got.starttime, int)


@fuzz()
@given(st.text(max_size=300))
def test_stat_any_str_only_valueerror(text: str) -> None:
    # str the kernel could not have written (lone surrogates that surrogateescape cannot
    # encode) must still give ValueError, not another exception
    with contextlib.suppress(ValueError):
        parse_stat(text)


# ---------------------------------------------------------------- /proc/PID/status


def kernel_escape_name(name: str) -> str:
    """Name: as fs/proc/array.c writes it (seq_escape: backslash, newline, tab, ... escaped)."""
    out = name.replace("\\", "\\\\")
    for c, e in (("\n", "\\n"), ("\t", "\\t"), ("\r", "\\r"), ("\v", "\\v"), ("\f", "\\f")):
        out = out.replace(c, e)
    return out


uids = st.integers(0, 2**32 - 2)


@fuzz(2)
@given(
    name=st.text(max_size=64),
    state=st.sampled_from(STATES),
    ids=st.tuples(uids, uids, uids, uids),
    trailing=st.booleans(),
)
def test_status_round_trip(name: str, state: str, ids: tuple, trailing: bool) -> None:
    text = (
        f"Name:\t{kernel_escape_name(name)}\nUmask:\t0022\nState:\t{state} (whatever)\n"
        f"Tgid:\t42\nNgid:\t0\nPid:\t42\nPPid:\t1\nTracerPid:\t0\n"
        f"Uid:\t{ids[0]}\t{ids[1]}\t{ids[2]}\t{ids[3]}\nGid:\t0\t0\t0\t0\nFDSize:\t64\n"
    )
    if not trailing:
        text = text.split("\nGid:")[0]
    assert parse_status(text) == (state, ids[0], ids[1])


status_lines = st.lists(
    st.sampled_from(
        [
            "Name:\tx",
            "State:\tS (sleeping)",
            "Uid:\t1\t2\t3\t4",
            "Uid:",
            "Uid:\tx\ty",
            "State:",
            "State:\t\xe9",
            "Uid:\t-1\t5",
            "Uid:\t 7 8",
            "Gid:\t0",
        ]
    )
    | st.text(max_size=40),
    max_size=12,
).map("\n".join)


@fuzz(2)
@given(status_lines | st.text(max_size=300))
@example("Uid:\t99999999999999999999999999999\t0")
@example("State:\t\udcff\nUid:\t1\t1")
def test_status_garbage_only_valueerror(text: str) -> None:
    try:
        got = parse_status(text)
    except ValueError:
        return
    assert isinstance(got.uid, int) and isinstance(got.euid, int)


# ---------------------------------------------------------------- /proc/PID/cgroup

# A cgroup name is any bytes but '/', NUL and '\n' (cgroup_mkdir refuses '\n'); the kernel
# prints the path unescaped. Users own whole subtrees (systemd's user@UID.service delegation).
cg_name = st.text(
    st.characters(blacklist_characters="/\n\0", blacklist_categories=["Cs"]),
    min_size=1,
    max_size=12,
)
cg_path = st.lists(cg_name, max_size=6).map(lambda parts: "/" + "/".join(parts))
cg_line = st.builds(
    lambda hid, ctrl, path: f"{hid}:{ctrl}:{path}",
    st.integers(0, 15),
    st.sampled_from(["", "freezer", "cpu,cpuacct", "name=systemd", "memory", "pids"]),
    cg_path,
)


@fuzz(3)
@given(st.lists(cg_line, max_size=14))
@example(["0::/user.slice/x\r0::/system.slice/slurmstepd.scope/job_5/step_0"])
@example(["0::/a\x85b", "1:name=systemd:/\u2028c\x1c\x1d\x1e\x0b\x0c"])
def test_cgroup_round_trip(lines: list[str]) -> None:
    assert parse_cgroup("".join(line + "\n" for line in lines)) == tuple(lines)


@fuzz()
@given(st.text(max_size=300))
def test_cgroup_garbage(text: str) -> None:
    # never raises; every line returned is a whole '\n'-delimited line of the text
    whole = text.split("\n")
    for line in parse_cgroup(text):
        assert line in whole and line.count(":") >= 2


# ---------------------------------------------------------------- /proc/PID/environ

env_key = st.binary(max_size=12).map(lambda b: b.replace(b"\0", b"").replace(b"=", b""))
env_val = st.binary(max_size=24).map(lambda b: b.replace(b"\0", b""))
job_keys = st.sampled_from([b"SLURM_JOB_ID", b"SLURM_JOBID", b"PBS_JOBID"])
job_values = st.sampled_from(
    [
        b"17",
        b"4294967294",
        b"123.server",
        b"123[4].server",
        b"123[].pbs.example.org",
        b"1234.0",
        b"s6T9M8T79NSN00",
        b"17.batch",
        b"\xff\xfe",
    ]
) | st.binary(min_size=1, max_size=20).map(lambda b: b.replace(b"\0", b"x"))


@fuzz(2)
@given(
    st.lists(st.tuples(env_key, env_val), max_size=10),
    st.lists(st.tuples(job_keys, job_values), max_size=3),
    st.randoms(use_true_random=False),
)
def test_environ_names_its_jobs(noise: list, jobs: list, rnd) -> None:
    items = [
        k + b"=" + v for k, v in noise if k not in (b"SLURM_JOB_ID", b"SLURM_JOBID", b"PBS_JOBID")
    ]
    items += [k + b"=" + v for k, v in jobs]
    rnd.shuffle(items)
    got = job_ids_in_environ(b"\0".join(items) + b"\0")
    # each value whole and the part before its first '.', bytes that are not UTF-8 kept
    texts = {v.decode("utf-8", "surrogateescape") for _, v in jobs}
    assert got == texts | {t.split(".")[0] for t in texts}


@fuzz()
@given(st.binary(max_size=500))
def test_environ_garbage(data: bytes) -> None:
    got = job_ids_in_environ(data)
    assert all(isinstance(j, str) for j in got)

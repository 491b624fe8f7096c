"""`pruned sweep` on real processes of users the fixture made (always scoped with --uid).

A stray tree dies; batch (below a root batch daemon), whitelisted and system-uid processes of
the same scope live; a TERM-ignoring stray dies after the grace; the brake and an unreadable
job source stop every kill; the audit trail lands in journald or, without it, in the fallback.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.fixtures.paths import REPO
from tests.fixtures.users import (
    User,
    alive,
    daemon_as,
    pids_of_uid,
    setsid_as,
    wait_dead,
    wait_for_pid,
)

pytestmark = pytest.mark.root


def write_policy(tmp: Path, body: str = "", *, state: bool = True) -> Path:
    state_dir = tmp / "state"
    if state:
        (state_dir / "jobs").mkdir(parents=True, mode=0o700, exist_ok=True)
        state_dir.chmod(0o700)
    p = tmp / "policy.yaml"
    p.write_text(
        "version: 1\nmode: enforce\nmin_age: 0s\nevents: false\n"
        f"kill:\n  grace: 2s\n  brake:\n    max_uids: 3\n"
        f"jobs:\n  sources: [statedir]\n  state_dir: {state_dir}\n"
        f"audit:\n  fallback_file: {tmp}/audit.jsonl\n"
        "cleanup:\n  enabled: false\n" + body
    )
    return p


def sweep(policy: Path, *uids: int, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "pruned.cli", "sweep", "--once", "--policy", str(policy)]
    argv += ["--uid", *map(str, uids), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def stray_tree(user: User, name: str) -> tuple[int, int]:
    """A double-forked daemon with a child: (daemon pid, child pid)."""
    setsid_as(user, f"(exec -a {name}_child sleep 600) & exec -a {name} sleep 600")
    return wait_for_pid(user.uid, name), wait_for_pid(user.uid, f"{name}_child")


@pytest.fixture
def fake_mom(tmp_path):
    """A root-owned batch daemon known by its exe path (a copy of bash), with a user's job."""
    exe = tmp_path / "fake_mom"
    shutil.copy("/usr/bin/bash", exe)
    exe.chmod(0o755)
    return exe


def test_stray_tree_dies_and_others_live(tmp_path, make_user, fake_mom):
    bob, carol, svc = make_user("prsb"), make_user("prsc"), make_user("prss")
    policy = write_policy(
        tmp_path,
        f"batch_daemons: [{fake_mom}]\n"
        f"whitelist:\n  users: [{carol.name}]\n"
        f"system:\n  uid_ranges: ['{svc.uid}']\n",
    )
    stray, child = stray_tree(bob, "bob_stray")
    # batch: bob's job below a root-owned daemon identified by its exe path
    mom = subprocess.Popen(
        [
            str(fake_mom),
            "-c",
            f"setpriv --reuid={bob.uid} --regid={bob.gid} --init-groups "
            f"bash -c 'exec -a bob_job sleep 600' & wait",
        ],
        start_new_session=True,
    )
    job = wait_for_pid(bob.uid, "bob_job")
    spoof = daemon_as(bob, "fake_mom")  # the daemon's name, but bob's process
    admin = daemon_as(carol, "carol_tool")
    service = daemon_as(svc, "svc_daemon")
    try:
        r = sweep(policy, bob.uid, carol.uid, svc.uid)
        assert r.returncode == 0, r.stdout + r.stderr
        assert wait_dead([stray, child, spoof]), r.stdout
        assert alive(job) and alive(admin) and alive(service) and alive(mom.pid)
        assert "done    kill   pid" in r.stdout
        records = (
            [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
            if (tmp_path / "audit.jsonl").exists()
            else []
        )
        # with journald up the records are there; without it, in the fallback file
        if records:
            killed = {
                int(x["PRUNED_PID"]) for x in records if x.get("PRUNED_EVENT") == "process_killed"
            }
            assert {stray, child, spoof} <= killed
    finally:
        mom.kill()
        mom.wait()


def test_dry_run_touches_nothing(tmp_path, make_user):
    bob = make_user("prsd")
    policy = write_policy(tmp_path)
    stray, child = stray_tree(bob, "bob_dry")
    r = sweep(policy, bob.uid, extra=("--dry-run",))
    assert r.returncode == 0, r.stderr
    assert "would   kill" in r.stdout
    time.sleep(0.3)
    assert alive(stray) and alive(child)


def test_term_ignoring_stray_dies_after_grace(tmp_path, make_user):
    bob = make_user("prst")
    policy = write_policy(tmp_path)
    setsid_as(bob, "trap '' TERM; exec -a stubborn sleep 600")
    pid = wait_for_pid(bob.uid, "stubborn")
    t0 = time.monotonic()
    r = sweep(policy, bob.uid)
    assert wait_dead([pid]), r.stdout
    assert time.monotonic() - t0 >= 2.0  # it outlived SIGTERM for the whole grace
    assert "SIGKILL" in r.stdout


def test_brake_trips_and_kills_nothing(tmp_path, make_user):
    bob, eve = make_user("prsk"), make_user("prsk")
    policy = write_policy(tmp_path)
    policy.write_text(policy.read_text().replace("max_uids: 3", "max_uids: 1"))
    pids = [*stray_tree(bob, "bob_b1"), *stray_tree(eve, "eve_b2")]
    r = sweep(policy, bob.uid, eve.uid)
    assert "mass-kill brake" in r.stdout + r.stderr
    time.sleep(0.3)
    assert all(alive(p) for p in pids)


def test_unreadable_job_source_is_report_only(tmp_path, make_user):
    bob = make_user("prsr")
    policy = write_policy(tmp_path, state=False)  # the statedir does not exist
    pids = stray_tree(bob, "bob_ro")
    r = sweep(policy, bob.uid)
    assert "REPORT-ONLY" in r.stdout, r.stdout
    time.sleep(0.3)
    assert all(alive(p) for p in pids)


def test_audit_fields_in_real_journald(tmp_path, make_user, journald):
    bob = make_user("prsj")
    policy = write_policy(tmp_path)
    pid, child = stray_tree(bob, "bob_journal")
    r = sweep(policy, bob.uid)
    assert wait_dead([pid, child]), r.stdout
    recs = journald.wait_records(PRUNED_PID=str(pid), SYSLOG_IDENTIFIER="pruned")
    rec = recs[-1]
    for key in (
        "PRUNED_EVENT",
        "PRUNED_PID",
        "PRUNED_STARTTIME",
        "PRUNED_UID",
        "PRUNED_USER",
        "PRUNED_COMM",
        "PRUNED_CLASS",
        "PRUNED_RULE",
        "PRUNED_ACTION",
        "PRUNED_RESULT",
        "PRUNED_SWEEP_ID",
        "PRUNED_DRY_RUN",
        "MESSAGE_ID",
        "PRIORITY",
        "MESSAGE",
    ):
        assert key in rec, key
    assert rec["PRUNED_EVENT"] == "process_killed" and rec["PRUNED_RESULT"] == "done"
    assert rec["PRUNED_USER"] == bob.name and rec["PRIORITY"] == "5"
    assert f"pid {pid}" in rec["MESSAGE"] and "stray.default" in rec["MESSAGE"]
    summary = journald.wait_records(
        PRUNED_SWEEP_ID=rec["PRUNED_SWEEP_ID"], PRUNED_EVENT="sweep_summary"
    )
    assert summary


def test_audit_falls_back_without_journald(tmp_path, make_user):
    """In a mount namespace with no journal socket the records land in the fallback file."""
    bob = make_user("prsf")
    policy = write_policy(tmp_path)
    pid, _child = stray_tree(bob, "bob_nojournal")
    empty = tmp_path / "nojournal"
    empty.mkdir()
    # /run/systemd exists on every systemd-based node; hiding it hides the journal socket.
    cmd = (
        f"mount --bind {empty} /run/systemd && "
        f"exec {sys.executable} -m pruned.cli sweep --once --policy {policy} --uid {bob.uid}"
    )
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(REPO),
    )
    assert r.returncode == 0, r.stderr
    assert wait_dead([pid])
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    mine = [x for x in lines if x.get("PRUNED_PID") == str(pid)]
    assert mine and mine[0]["PRUNED_EVENT"] == "process_killed"
    assert mine[0]["SYSLOG_IDENTIFIER"] == "pruned" and "PRUNED_FALLBACK_REASON" in mine[0]


def test_term_respawning_stray_leaves_nothing_after_one_sweep(tmp_path, make_user, journald):
    """Attack: a stray that spawns a detached child when it gets SIGTERM, then exits. One
    enforce sweep kills both (the tree is contained before the first signal), and the
    process_killed record says one joined during the kill."""
    eve = make_user("prse")
    policy = write_policy(tmp_path)
    setsid_as(
        eve,
        "trap 'setsid -f bash -c \"exec -a eve_escapee sleep 600\"; sleep 0.3; exit 0' TERM; "
        "exec -a eve_respawner bash -c "
        "'trap \"setsid -f bash -c \\\"exec -a eve_escapee sleep 600\\\"; sleep 0.3; exit 0\" TERM;"
        " while :; do sleep 0.05; done'",
    )
    respawner = wait_for_pid(eve.uid, "eve_respawner")
    r = sweep(policy, eve.uid)
    assert r.returncode == 0, r.stderr
    assert wait_dead(respawner, 10) is not None
    time.sleep(0.5)
    left = [p for p in pids_of_uid(eve.uid) if alive(p)]
    assert left == [], f"left after one sweep: {left}\n{r.stdout}"
    kills = journald.wait_records(PRUNED_UID=str(eve.uid), PRUNED_EVENT="process_killed")
    assert all(k["PRUNED_CONTAINED"].startswith("contained in ") for k in kills)
    assert max(int(k["PRUNED_JOINED"]) for k in kills) >= 1


def assert_forgery_is_a_stray(policy: Path, wl: Path, forged: int, genuine: int) -> None:
    """`pruned scan`: the forged process shows the whitelisted exe path and is a plain stray;
    the genuine one is whitelist.exe."""
    r = subprocess.run(
        [sys.executable, "-m", "pruned.cli", "scan", "--json", "--policy", str(policy)],
        capture_output=True, text=True, timeout=120, cwd=str(REPO),
    )  # fmt: skip
    rows = {d["pid"]: d for d in map(json.loads, r.stdout.splitlines())}
    assert rows[forged]["exe"] == str(wl)  # the path it shows is the whitelisted one
    assert (rows[forged]["class"], rows[forged]["rule"]) == ("stray", "stray.default")
    assert rows[genuine]["rule"] == "whitelist.exe"


def test_whitelisted_exe_path_forged_in_a_mount_namespace_is_not_whitelisted(tmp_path, make_user):
    """Attack: a user shows the whitelisted path from a mount namespace of their own (their
    binary bind-mounted over it). Only the host's file at that path (same device and inode)
    is whitelisted; the forgery is a stray. The genuine agent of another user is whitelisted."""
    mallory, agent_user = make_user("prsm"), make_user("prsa")
    wl = tmp_path / "site" / "agent"
    wl.parent.mkdir()
    shutil.copy("/usr/bin/sleep", wl)  # the site's agent (a copy of sleep: its own inode)
    fake = tmp_path / "mallory-bin"
    shutil.copy("/usr/bin/sleep", fake)
    for f in (wl, fake):
        f.chmod(0o755)
    tmp_path.chmod(0o755)
    policy = write_policy(tmp_path, f"whitelist:\n  exe: [{wl}]\n")
    forged = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount --bind {fake} {wl} && exec setpriv --reuid={mallory.uid} --regid={mallory.gid}"
         f" --init-groups {wl} 600"],
        start_new_session=True,
    )  # fmt: skip
    genuine = subprocess.Popen(
        ["setpriv", f"--reuid={agent_user.uid}", f"--regid={agent_user.gid}", "--init-groups",
         str(wl), "601"],
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if os.readlink(f"/proc/{forged.pid}/exe") == str(wl) and os.readlink(
                    f"/proc/{genuine.pid}/exe"
                ) == str(wl):
                    break
            except OSError:
                pass
            time.sleep(0.02)
        assert_forgery_is_a_stray(policy, wl, forged.pid, genuine.pid)
    finally:
        for p in (forged, genuine):
            p.kill()
            p.wait()


def test_exe_link_set_from_a_user_namespace_is_not_whitelisted(tmp_path, make_user, request):
    """Attack: a user's own code makes /proc/PID/exe the host's whitelisted file itself --
    same device and inode, so the mount-namespace check above cannot tell -- by
    prctl(PR_SET_MM_MAP) with an exe_fd from a user namespace of its own
    (tests/fixtures/exespoof.c). Outside pruned's user namespace an exe is not believed: the
    forgery is a stray. The genuine agent of another user is still whitelisted."""
    mallory, agent_user = make_user("prsx"), make_user("prsy")
    # Not under tmp_path: pytest's root-only parent would keep mallory from opening the agent.
    site = Path(tempfile.mkdtemp(prefix="pruned-test-exespoof-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(site, ignore_errors=True))
    site.chmod(0o755)
    wl = site / "agent"
    shutil.copy("/usr/bin/sleep", wl)
    spoof = site / "exespoof"
    subprocess.run(["gcc", "-O2", "-static", "-fno-stack-protector", "-fcf-protection=none",
                    "-o", str(spoof), str(REPO / "tests/fixtures/exespoof.c")],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    for f in (wl, spoof):
        f.chmod(0o755)
    policy = write_policy(tmp_path, f"whitelist:\n  exe: [{wl}]\n")

    def run_as(user, *argv: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                                 "--init-groups", *argv], start_new_session=True, **kw)

    forged = run_as(mallory, str(spoof), str(wl), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    genuine = run_as(agent_user, str(wl), "601")
    try:
        # exespoof prints ok or no, or exits; never more than a few ms, so 30 s is a hang.
        ready, _, _ = select.select([forged.stdout], [], [], 30)
        line = forged.stdout.readline() if ready else b"(nothing in 30 s)"
        if line != b"ok\n":
            forged.kill()
            forged.wait(5)
            err = forged.stderr.read().decode(errors="replace")
            if "unshare" in err:
                pytest.skip(f"no unprivileged user namespaces here: {err.strip()}")
            raise AssertionError(f"exespoof failed: {line!r} {err}")
        # The forgery is complete: the link names the agent and stats through to its inode.
        assert os.readlink(f"/proc/{forged.pid}/exe") == str(wl)
        st, real = os.stat(f"/proc/{forged.pid}/exe"), os.stat(wl)
        assert (st.st_dev, st.st_ino) == (real.st_dev, real.st_ino)
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{genuine.pid}/exe") != str(wl):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert_forgery_is_a_stray(policy, wl, forged.pid, genuine.pid)
    finally:
        for p in (forged, genuine):
            p.kill()
            p.wait()


def test_stray_in_a_non_utf8_directory_is_killed_and_audited(tmp_path, make_user, journald):
    """A stray whose cwd and executable path are not UTF-8 used to kill the sweep after the
    kill (UnicodeEncodeError in the audit): now it is killed, and its record is in the journal
    with the bad bytes shown as \\xNN."""
    zed = make_user("prsz")
    bad = os.path.join(os.fsencode(tmp_path), b"bad\xff\xfe")
    os.mkdir(bad)
    exe = os.path.join(bad, b"sl\xe9ep")
    shutil.copy("/usr/bin/sleep", exe)
    os.chmod(exe, 0o755)
    tmp_path.chmod(0o755)
    policy = write_policy(tmp_path)
    p = subprocess.Popen(
        [b"setpriv", f"--reuid={zed.uid}".encode(), f"--regid={zed.gid}".encode(),
         b"--init-groups", exe, b"600"],
        cwd=bad, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not os.path.exists(f"/proc/{p.pid}/exe"):
            time.sleep(0.02)
        while time.monotonic() < deadline and os.readlink(f"/proc/{p.pid}/exe".encode()) != exe:
            time.sleep(0.02)
        scan = subprocess.run(
            [sys.executable, "-m", "pruned.cli", "scan", "--policy", str(policy)],
            capture_output=True, text=True, timeout=120, cwd=str(REPO),
        )  # fmt: skip
        assert scan.returncode == 0, scan.stderr
        r = sweep(policy, zed.uid)
        assert r.returncode == 0, r.stderr
        assert p.wait(timeout=15) is not None
        rec = journald.wait_records(PRUNED_PID=str(p.pid), PRUNED_EVENT="process_killed")[-1]
        assert rec["PRUNED_RESULT"] == "done"
        assert "sl\\xe9ep" in rec["PRUNED_COMM"] or "sl\\xe9ep" in rec["MESSAGE"]
    finally:
        p.kill()
        p.wait()


def test_stray_whose_main_thread_exited_is_killed(tmp_path, make_user, journald):
    """Attack: the main thread ends with SYS_exit while another thread runs on. The kernel
    shows the process as Z (a zombie leader), which pruned took for "already dead": the stray
    was immune to every sweep. num_threads > 1 says it lives; one sweep kills it."""
    zed = make_user("prsz")
    code = (
        "import ctypes, threading, time\n"
        "threading.Thread(target=time.sleep, args=(600,)).start()\n"
        "time.sleep(0.2)\n"
        "ctypes.CDLL(None).syscall(60, 0)\n"  # SYS_exit (x86-64): this thread only
    )
    setsid_as(zed, f"exec -a zed_leader python3 -c '{code}'")
    pid = wait_for_pid(zed.uid, "zed_leader")
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the main thread never exited"
        time.sleep(0.05)
    assert len(os.listdir(f"/proc/{pid}/task")) == 2  # a Z leader and a live thread
    r = sweep(write_policy(tmp_path), zed.uid)
    assert r.returncode == 0, r.stderr
    assert wait_dead([pid], 10), r.stdout
    [rec] = journald.wait_records(PRUNED_UID=str(zed.uid), PRUNED_EVENT="process_killed")
    assert rec["PRUNED_PID"] == str(pid)

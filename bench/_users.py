"""Throw-away users for the benchmarks (the tests have tests/fixtures/users.py)."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


def make_user(made: list[User], prefix: str, uid_low: int, uid_high: int) -> User:
    """A user with a random name and a free uid in [uid_low, uid_high); appended to `made`."""
    used = {p.pw_uid for p in pwd.getpwall()}
    for _ in range(20):
        uid = uid_low + secrets.randbelow(uid_high - uid_low)
        name = f"{prefix}{secrets.token_hex(3)}"
        if uid in used:
            continue
        r = subprocess.run(
            ["useradd", "-M", "-U", "-u", str(uid), "-s", "/bin/false", name],
            capture_output=True,
            text=True,
        )
        if r.returncode == 0:
            pw = pwd.getpwnam(name)
            user = User(name, pw.pw_uid, pw.pw_gid)
            made.append(user)
            return user
    raise RuntimeError("useradd kept failing")


def as_user(user: User, argv: list[str], prefix: tuple[str, ...] = (), **kw: object):
    """Start argv as user (real ids), in /, in its own session; `prefix` runs as root around it."""
    return subprocess.Popen(  # type: ignore[call-overload]
        [*prefix, "setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", *argv],
        cwd="/",
        start_new_session=True,
        **kw,
    )


def uid_of(pid: int) -> int | None:
    """The real uid of pid, None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def kill_own(pids: list[int], uid: int, uid_low: int) -> None:
    """SIGKILL each pid still owned by uid (one of the bench's throw-away users)."""
    assert uid >= uid_low, "refusing to kill processes of a uid the bench did not make"
    for pid in pids:
        if uid_of(pid) == uid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def remove_users(made: list[User], uid_low: int) -> None:
    """SIGKILL by pid whatever the users still run (uid checked per pid), then userdel."""
    for user in made:
        for _ in range(50):
            pids = [
                int(p) for p in os.listdir("/proc") if p.isdigit() and uid_of(int(p)) == user.uid
            ]
            if not pids:
                break
            kill_own(pids, user.uid, uid_low)
            time.sleep(0.1)
        subprocess.run(["userdel", "-f", user.name], capture_output=True)

"""Throw-away users for the benchmarks (the tests have tests/fixtures/users.py)."""

from __future__ import annotations

import pwd
import secrets
import subprocess
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

"""Spawn N sleeping processes, wait for EOF on stdin, then kill and reap exactly those.

Run as the (test) user that should own the processes. The sleepers are this process's
unreaped children, so their pids cannot be reused before we kill them: killing by pid is exact.
Prints "ready <n>" when all are up. A closed stdin (the bench exited, even by SIGKILL),
SIGTERM or SIGHUP all lead to the same cleanup; the sleepers also expire on their own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

SLEEP = "/usr/bin/sleep"


def spawn(n: int, seconds: int) -> list[int]:
    """Start n `sleep seconds` children with posix_spawn (vfork: cheap whatever our size)."""
    env = {"PATH": "/usr/bin:/bin"}
    argv = ["sleep", str(seconds)]
    pids = []
    for _ in range(n):
        try:
            pids.append(os.posix_spawn(SLEEP, argv, env))
        except OSError as e:  # EAGAIN: pid_max, threads-max or RLIMIT_NPROC reached
            print(f"spawn failed after {len(pids)}: {e}", file=sys.stderr, flush=True)
            break
    return pids


def reap(pids: list[int]) -> None:
    """SIGKILL then wait for each of our own children."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def main() -> int:
    n, seconds = int(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench decides when we stop

    def stop(_sig: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    pids: list[int] = []
    try:
        pids = spawn(n, seconds)
        print(f"ready {len(pids)}", flush=True)
        sys.stdin.read()  # until EOF
    finally:
        reap(pids)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

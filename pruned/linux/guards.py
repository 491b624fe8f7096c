"""Files that look like garbage but are in use: held locks (/proc/locks) and bound unix
sockets (/proc/net/unix), read once per sweep so the removal walk never asks per file."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Guards:
    """Files that look like garbage but are in use, read once per sweep."""

    locked: frozenset[tuple[int, int]] = frozenset()  # (st_dev, st_ino) locked in /proc/locks
    socket_names: frozenset[str] = frozenset()  # basenames of bound unix sockets


def parse_locks(text: str) -> frozenset[tuple[int, int]]:
    """(st_dev, st_ino) of every lock (and waiter) in /proc/locks text ("maj:min:ino", hex dev).

    The device is the superblock's: right for tmpfs and ext4/xfs, not for btrfs subvolumes
    (their st_dev is an anonymous one), where a held lock would go unseen.
    """
    out = set()
    for line in text.split("\n"):
        for tok in line.split():
            parts = tok.split(":")
            if len(parts) == 3 and parts[2].isdigit():
                with contextlib.suppress(ValueError, OverflowError):  # not a dev_t
                    out.add((os.makedev(int(parts[0], 16), int(parts[1], 16)), int(parts[2])))
                break
    return frozenset(out)


def parse_unix_sockets(text: str) -> frozenset[str]:
    """Basenames of the filesystem unix sockets in /proc/net/unix text (abstract ones skipped)."""
    out = set()
    # Only "\n" ends a line: socket paths are printed raw, and str.splitlines() would also
    # split one at \r, \v, \f, \x1c-\x1e, \x85 or \u2028.
    for line in text.split("\n")[1:]:
        cols = line.split(None, 7)
        if len(cols) == 8 and not cols[7].startswith("@"):
            out.add(cols[7].rstrip("/").rsplit("/", 1)[-1])
    return frozenset(out)


def read_guards(proc: str = "/proc") -> Guards:
    """The locks and bound sockets of the node now (only this network namespace's sockets)."""

    def read(path: str) -> str:
        try:
            # surrogateescape, not replace: a socket named with bytes that are not UTF-8 must
            # match the walker's name for it (os.scandir's), or a live one is removed
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                return f.read()
        except OSError:
            return ""

    return Guards(parse_locks(read(f"{proc}/locks")), parse_unix_sockets(read(f"{proc}/net/unix")))

"""Node facts: what the policy's user names and uid ranges mean on this node."""

from __future__ import annotations

import grp
import pwd
from collections.abc import Iterable
from dataclasses import dataclass

from pruned.model import UID_RAIL, Policy
from pruned.rules.trust import is_system_uid

UID_MAX = 2**32 - 2  # (uid_t)-1 means "no uid"
DEBIAN_SYS_UID = (100, 999)  # login.defs defaults when SYS_UID_MIN/MAX are commented out


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the policy's names and ranges mean on this node, resolved once per (re)load."""

    system_ranges: tuple[tuple[int, int], ...]  # sorted, disjoint, inclusive
    whitelist_uids: frozenset[int]
    missing: tuple[str, ...]  # names/files that do not exist here (warnings, not errors)

    def is_system_uid(self, uid: int) -> bool:
        """True if uid is below the rail or in one of the system ranges."""
        return is_system_uid(uid, self.system_ranges)


def parse_login_defs(text: str) -> dict[str, str]:
    """KEY -> value of a login.defs text; SYS_UID_MIN/MAX default to Debian's 100/999."""
    defs: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(None, 1)
        if not parts or parts[0].startswith("#"):
            continue
        defs[parts[0]] = parts[1].strip().strip('"') if len(parts) > 1 else ""
    defs.setdefault("SYS_UID_MIN", str(DEBIAN_SYS_UID[0]))
    defs.setdefault("SYS_UID_MAX", str(DEBIAN_SYS_UID[1]))
    return defs


def sys_uid_range(defs: dict[str, str]) -> tuple[int, int]:
    """SYS_UID_MIN..SYS_UID_MAX from parsed login.defs; Debian's defaults if unusable."""

    def num(key: str, default: int) -> int:
        # shadow's getdef reads numbers with strtol(..., 0): 0x hex, leading-0 octal.
        raw = defs.get(key, "")
        try:
            if raw.lower().startswith("0x"):
                return int(raw, 16)
            if len(raw) > 1 and raw.startswith("0"):
                return int(raw, 8)
            return int(raw)
        except ValueError:
            return default

    lo, hi = num("SYS_UID_MIN", DEBIAN_SYS_UID[0]), num("SYS_UID_MAX", DEBIAN_SYS_UID[1])
    return (lo, hi) if 0 <= lo <= hi <= UID_MAX else DEBIAN_SYS_UID


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted, disjoint inclusive ranges covering the same uids (adjacent ones joined)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def resolve_facts(policy: Policy) -> NodeFacts:
    """Resolve system ranges and whitelisted uids against this node's passwd/group/login.defs."""
    missing: list[str] = []
    ranges: list[tuple[int, int]] = [(0, UID_RAIL - 1), *policy.system.uid_ranges]
    if policy.system.login_defs:
        path = policy.system.login_defs_path
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                ranges.append(sys_uid_range(parse_login_defs(f.read())))
        except OSError as e:
            missing.append(
                f"file {path} ({e.strerror}; using SYS_UID {DEBIAN_SYS_UID[0]}-{DEBIAN_SYS_UID[1]})"
            )
            ranges.append(DEBIAN_SYS_UID)
    for name in policy.system.users:
        uid = _uid_of(name)
        if uid is None:
            missing.append(f"system user {name!r}")
        else:
            ranges.append((uid, uid))

    white: set[int] = set()
    for name in policy.whitelist.users:
        uid = _uid_of(name)
        if uid is None:
            missing.append(f"whitelist user {name!r}")
        else:
            white.add(uid)
    if policy.whitelist.groups:
        everyone = pwd.getpwall()
        for name in policy.whitelist.groups:
            try:
                gr = grp.getgrnam(name)
            except KeyError:
                missing.append(f"whitelist group {name!r}")
                continue
            for member in gr.gr_mem:
                uid = _uid_of(member)
                if uid is None:
                    missing.append(f"member {member!r} of whitelist group {name!r}")
                else:
                    white.add(uid)
            white.update(p.pw_uid for p in everyone if p.pw_gid == gr.gr_gid)
    return NodeFacts(merge_ranges(ranges), frozenset(white), tuple(missing))


def _uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None

"""The checks of single policy values: types, ranges, durations, paths, lists, patterns.

Each check reports into an `Errors` and returns the value to use, or `INVALID`.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable
from typing import Any

from pruned.model import UID_RAIL, Action
from pruned.policy.facts import UID_MAX
from pruned.policy.yamltree import Errors, Node, show

# Directories that can never be a cleanup root: removing "ended jobs' files" there would eat
# the operating system or home directories.
_SYSTEM_DIRS = "bin boot dev etc home lib lib64 opt proc root run sbin srv sys usr var"
FORBIDDEN_ROOTS = frozenset({"/", *(f"/{d}" for d in _SYSTEM_DIRS.split())})
PLACEHOLDERS = ("job_id", "uid", "user")

INVALID = object()  # a check's "no usable value": None is a valid value (optional paths)
Check = Callable[[Node, str, Errors], Any]

_YAML11_BOOLS = {
    "yes": "true",
    "y": "true",
    "on": "true",
    "no": "false",
    "n": "false",
    "off": "false",
}


def boolean(node: Node, path: str, errs: Errors) -> Any:
    """true or false; a YAML 1.1 yes/no/on/off gets a hint."""
    if isinstance(node.value, bool):
        return node.value
    hint = ""
    if isinstance(node.value, str) and node.value.lower() in _YAML11_BOOLS:
        hint = f" (YAML 1.1 boolean? write {_YAML11_BOOLS[node.value.lower()]})"
    errs.at(node, path, f"expected true or false, got {show(node)}{hint}")
    return INVALID


def integer(minimum: int, maximum: int | None = None) -> Check:
    """A check for an integer in minimum..maximum (no upper bound when maximum is None)."""

    def check(node: Node, path: str, errs: Errors) -> Any:
        v = node.value
        if type(v) is not int:
            hint = ""
            if isinstance(v, str) and re.fullmatch(r"[-+]?0[0-9]+", v):
                hint = (
                    " (a leading zero is ambiguous: YAML 1.1 reads it as octal; "
                    "write it without the zero, or 0o17 for octal)"
                )
            errs.at(node, path, f"expected an integer, got {show(node)}{hint}")
            return INVALID
        if v < minimum or (maximum is not None and v > maximum):
            bound = f"at least {minimum}" if maximum is None else f"{minimum}..{maximum}"
            errs.at(node, path, f"must be {bound}, got {v}")
            return INVALID
        return v

    return check


def duration(positive: bool) -> Check:
    """A check for a duration, in seconds; `positive` refuses 0s."""

    def check(node: Node, path: str, errs: Errors) -> Any:
        if isinstance(node.value, dict | list) or node.value is None:
            errs.at(node, path, f"expected a duration like 10s, 5m or 1h30m, got {show(node)}")
            return INVALID
        try:
            seconds = parse_duration(node.value)
        except ValueError as e:
            errs.at(node, path, str(e))
            return INVALID
        if positive and seconds <= 0:
            errs.at(node, path, f"must be longer than 0s, got {show(node)}")
            return INVALID
        return seconds

    return check


def one_of(*allowed: str, hints: dict[str, str] | None = None) -> Check:
    """A check for one of the allowed strings; `hints` explain tempting wrong ones."""

    def check(node: Node, path: str, errs: Errors) -> Any:
        v = node.value
        if isinstance(v, str) and v in allowed:
            return v
        if isinstance(v, str) and hints and v in hints:
            errs.at(node, path, hints[v])
        else:
            errs.at(node, path, f"expected one of {', '.join(allowed)}; got {show(node)}")
        return INVALID

    return check


def ignore_only(cls: str) -> Check:
    """A check for the action of a class that may only be ignored."""

    def check(node: Node, path: str, errs: Errors) -> Any:
        if node.value == "ignore":
            return Action.IGNORE
        errs.at(
            node,
            path,
            f"only 'ignore' is allowed for class {cls} (a policy can never kill {cls} processes)",
        )
        return INVALID

    return check


def _path_value(node: Node, path: str, errs: Errors, *, item: bool = False) -> Any:
    v = node.value
    if not isinstance(v, str):
        errs.at(node, path, f"expected an absolute path, got {show(node)}", item=item)
        return INVALID
    if not v.startswith("/"):
        errs.at(node, path, f"must be an absolute path, got {v!r}", item=item)
        return INVALID
    if "\0" in v or ".." in v.split("/"):
        errs.at(node, path, f"'..' and NUL are not allowed in paths, got {v!r}", item=item)
        return INVALID
    # "/tmp//x/./" and "/tmp/x" are one directory; compare roots in one spelling.
    return "/" + "/".join(p for p in v.split("/") if p not in ("", "."))


def abs_path(node: Node, path: str, errs: Errors) -> Any:
    """An absolute path, normalised."""
    return _path_value(node, path, errs)


def optional_path(node: Node, path: str, errs: Errors) -> Any:
    """An absolute path, normalised, or null."""
    return None if node.value is None else _path_value(node, path, errs)


def prom_textfile(node: Node, path: str, errs: Errors) -> Any:
    """optional_path ending in .prom: node_exporter's textfile collector reads only *.prom."""
    v = optional_path(node, path, errs)
    if isinstance(v, str) and not v.endswith(".prom"):
        errs.at(node, path, f"must end in .prom (node_exporter's textfile collector reads "
                f"only *.prom files), got {v!r}")
        return INVALID
    return v


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?")


def name_item(node: Node, path: str, errs: Errors) -> Any:
    """A user or group name, as a list item."""
    if isinstance(node.value, str) and _NAME.fullmatch(node.value):
        return node.value
    errs.at(node, path, f"expected a user or group name, got {show(node)}", item=True)
    return INVALID


def path_item(node: Node, path: str, errs: Errors) -> Any:
    """An absolute path, normalised, as a list item."""
    return _path_value(node, path, errs, item=True)


ListPost = Callable[[list[tuple[int, Any, Node]], str, Errors], bool]


def list_of(item: Check, *, non_empty: bool = False, post: ListPost | None = None) -> Check:
    """A list of items: each item checked, duplicates refused, then `post` on the good ones."""

    def check(node: Node, path: str, errs: Errors) -> Any:
        if not isinstance(node.value, list):
            errs.at(node, path, f"expected a list, got {show(node)}")
            return INVALID
        if non_empty and not node.value:
            errs.at(node, path, "must not be empty")
            return INVALID
        out, seen, ok = [], {}, True
        good: list[tuple[int, Any, Node]] = []
        for i, sub in enumerate(node.value):
            value = item(sub, f"{path}[{i}]", errs)
            if value is INVALID:
                ok = False
            elif value in seen:
                errs.at(
                    sub,
                    f"{path}[{i}]",
                    f"{show(sub)} is listed twice (first at line {seen[value]})",
                    item=True,
                )
                ok = False
            else:
                seen[value] = sub.line
                out.append(value)
                good.append((i, value, sub))
        if post is not None and not post(good, path, errs):
            ok = False
        return tuple(out) if ok else INVALID

    return check


_RANGE = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?")


def _uid_number(digits: str) -> int:
    """A uid from its digits; anything longer than any uid is just "too big" (int() of
    thousands of digits is refused by Python, and slow before that)."""
    return int(digits) if len(digits) <= 12 else UID_MAX + 1


def uid_range(node: Node, path: str, errs: Errors) -> Any:
    """A uid or "lo-hi" range as (lo, hi), inside UID_RAIL..UID_MAX."""
    v = node.value
    if type(v) is int:
        lo = hi = v
    elif isinstance(v, str) and (m := _RANGE.fullmatch(v)):
        lo = _uid_number(m.group(1))
        hi = _uid_number(m.group(2)) if m.group(2) else lo
    else:
        errs.at(
            node,
            path,
            f'expected a uid or a range like "60000-64999", got {show(node)}',
            item=True,
        )
        return INVALID
    if lo > hi:
        errs.at(node, path, f"range {v!r} starts after it ends", item=True)
        return INVALID
    if hi > UID_MAX:
        errs.at(node, path, f"uids end at {UID_MAX}, got {v!r}", item=True)
        return INVALID
    if lo < UID_RAIL:
        # The rail is fixed in code; a range reaching under it reads as if the policy decided
        # about those uids, and would make a later "raise the range" edit look like it unprotects
        # them. Say so instead of silently clipping.
        errs.at(
            node,
            path,
            f"range {v!r} reaches below {UID_RAIL}: uids 0-{UID_RAIL - 1} are "
            f"always system (a fixed rail no policy sets); start at {UID_RAIL} or above",
            item=True,
        )
        return INVALID
    return (lo, hi)


def roots_post(items: list[tuple[int, Any, Node]], path: str, errs: Errors) -> bool:
    """Cleanup roots: no system directory, and none inside another."""
    ok = True
    roots = [v for _, v, _ in items]
    for i, root, node in items:
        if root in FORBIDDEN_ROOTS:
            msg = (
                f"{root!r} can never be a cleanup root (it holds the system or home "
                "directories, not job scratch)"
            )
        elif outer := [r for r in roots if r != root and root.startswith(r + "/")]:
            msg = (
                f"{root!r} is inside cleanup root {outer[0]!r}: roots may not nest "
                "(files would be judged twice)"
            )
        else:
            continue
        errs.at(node, f"{path}[{i}]", msg, item=True)
        ok = False
    return ok


def container_base(node: Node, path: str, errs: Errors) -> Any:
    """The job_container/tmpfs BasePath: an optional path, not a system directory."""
    value = optional_path(node, path, errs)
    if value in FORBIDDEN_ROOTS:
        errs.at(node, path, f"{value!r} cannot be the job_container/tmpfs BasePath")
        return INVALID
    return value


def job_dir_item(node: Node, path: str, errs: Errors) -> Any:
    """A job directory pattern: an absolute path with {job_id} and only known placeholders."""
    value = _path_value(node, path, errs, item=True)
    if value is INVALID:
        return INVALID
    try:
        specs = [
            (f, spec, conv) for _, f, spec, conv in string.Formatter().parse(value) if f is not None
        ]
    except ValueError as e:
        errs.at(node, path, f"bad pattern {value!r}: {e}", item=True)
        return INVALID
    for name, spec, conv in specs:
        if name not in PLACEHOLDERS or spec or conv:
            errs.at(
                node,
                path,
                f"unknown placeholder {{{name}{'!' + conv if conv else ''}"
                f"{':' + spec if spec else ''}}} in {value!r} "
                f"(allowed: {{job_id}}, {{uid}}, {{user}})",
                item=True,
            )
            return INVALID
    if "job_id" not in [name for name, _, _ in specs]:
        errs.at(
            node,
            path,
            f"pattern {value!r} has no {{job_id}}: without it every job would "
            "share (and delete) one directory",
            item=True,
        )
        return INVALID
    return value


# ---------------------------------------------------------------- durations

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
MAX_DURATION = 366 * 86400.0  # longer than a year is a typo (or 400 nines), never a setting


def _bounded(seconds: float, text: str | int | float) -> float:
    if not seconds <= MAX_DURATION:  # also inf and nan
        shown = repr(text) if len(repr(text)) <= 40 else repr(text)[:37] + "..."
        raise ValueError(f"{shown} is too long a duration (at most 366d)")
    return seconds


def parse_duration(text: str | int | float) -> float:
    """Seconds in "10s" "5m" "1h30m" "500ms" "2d" (or a bare number); ValueError otherwise."""
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ValueError(f"expected a duration like 10s, 5m or 1h30m, got {text!r}")
    if not isinstance(text, str):
        if not math.isfinite(text):
            raise ValueError(f"a duration must be finite, got {text}")
        if text < 0:
            raise ValueError(f"a duration cannot be negative, got {text}")
        return _bounded(float(text), text)
    s = text.strip()
    if not s:
        raise ValueError("empty duration (write e.g. 10s)")
    if s.startswith("-"):
        raise ValueError(f"a duration cannot be negative, got {text!r}")
    if re.fullmatch(r"[0-9]+(?::[0-9]+)+(?:\.[0-9]*)?", s):
        raise ValueError(
            f"{text!r} is not a duration: clock notation is ambiguous (YAML 1.1 "
            "reads 1:30 as 90); write units, e.g. 90s, 1m30s or 1h30m"
        )
    if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", s):
        return _bounded(float(s), text)
    total, pos, last = 0.0, 0, math.inf
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m:
            raise ValueError(f"{text!r} is not a duration like 10s, 5m, 1h30m or 500ms")
        unit = m.group(2)
        if unit not in _UNITS:
            shown = f"unknown unit {unit!r}" if unit else "a number without a unit"
            raise ValueError(f"{text!r} is not a duration: {shown} (units: d, h, m, s, ms)")
        if _UNITS[unit] >= last:
            raise ValueError(
                f"{text!r} is not a duration: units must go from largest to "
                "smallest, each once (e.g. 1h30m)"
            )
        last = _UNITS[unit]
        total += float(m.group(1)) * _UNITS[unit]
        pos = m.end()
    return _bounded(total, text)

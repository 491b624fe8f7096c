"""The merged, effective policy with the origin of every value (`pruned check-config --print`).

`entries()` lists every key of the schema, in schema order, with the value in force and the
file and line that set it (None: the built-in default). `render_yaml()` prints them as a
policy file (it loads back to the same policy) with each origin as a comment; `as_json()`
gives the same as one JSON object, durations in seconds.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from pruned.model import Action, Policy
from pruned.policy.load import Loaded, schema_targets
from pruned.policy.yamltree import POLICY_VERSION


@dataclass(frozen=True, slots=True)
class Entry:
    key: str  # dotted, e.g. "kill.grace"
    value: Any  # JSON form: durations in seconds, uid ranges as "lo-hi" strings, lists
    yaml: str  # the value as it would be written in a policy file
    file: str | None  # None: the built-in default
    line: int | None

    @property
    def origin(self) -> str:
        return f"{self.file}:{self.line}" if self.file else "(default)"


_DURATION_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def format_duration(seconds: float) -> str:
    """Seconds as a policy duration that parses back to the same value: 5400 -> 1h30m."""
    ms = round(seconds * 1000)
    if not math.isfinite(seconds) or abs(ms / 1000 - seconds) > 1e-9:
        return repr(seconds)  # a bare number is seconds too
    if ms == 0:
        return "0s"
    out, rest = "", ms
    for unit, size in _DURATION_UNITS:
        n, rest = divmod(rest, size * 1000)
        if n:
            out += f"{n}{unit}"
    return out + (f"{rest}ms" if rest else "")


_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")
_NOT_STRINGS = re.compile(r"(?:~|null|Null|NULL|true|True|TRUE|false|False|FALSE)")


def _yaml_scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str) and _PLAIN.fullmatch(v) and not _NOT_STRINGS.fullmatch(v):
        return v
    return json.dumps(v)  # JSON strings are YAML 1.2 double-quoted scalars


def _forms(key: str, target: str | None, policy: Policy) -> tuple[Any, str]:
    """(JSON value, YAML text) of one key's value in force."""
    if target is None:  # actions.system/batch/adopted/whitelisted: only ever ignore
        return "ignore", "ignore"
    obj: Any = policy
    for attr in target.split("."):
        obj = getattr(obj, attr)
    if key == "mode":
        word = "report" if obj else "enforce"
        return word, word
    if isinstance(obj, Action):
        return obj.value, obj.value
    if isinstance(obj, float):  # every float in Policy is a duration
        return obj, format_duration(obj)
    if isinstance(obj, tuple):
        if obj and isinstance(obj[0], tuple):  # uid ranges
            items = [f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in obj]
            return items, "[" + ", ".join(json.dumps(i) for i in items) + "]"
        return list(obj), "[" + ", ".join(_yaml_scalar(i) for i in obj) + "]"
    return obj, _yaml_scalar(obj)


def entries(loaded: Loaded) -> list[Entry]:
    """Every schema key with the value in force and where it was set, in schema order."""
    out = []
    for key, target in schema_targets().items():
        value, text = _forms(key, target, loaded.policy)
        node = loaded.values.get(key, (None, None))[1]
        out.append(Entry(key, value, text, node.file if node else None,
                         node.key_line if node else None))
    return out


def render_yaml(loaded: Loaded, title: str) -> str:
    """The effective policy as YAML, each value's origin as a comment beside it."""
    rows: list[tuple[str, str]] = [(f"version: {POLICY_VERSION}", "")]
    opened: list[str] = []
    for e in entries(loaded):
        *sections, leaf = e.key.split(".")
        depth = 0
        while depth < min(len(opened), len(sections)) and opened[depth] == sections[depth]:
            depth += 1
        opened = opened[:depth]
        for s in sections[depth:]:
            rows.append(("  " * len(opened) + f"{s}:", ""))
            opened.append(s)
        rows.append(("  " * len(opened) + f"{leaf}: {e.yaml}", e.origin))
    width = min(max(len(t) for t, _ in rows), 44) + 2
    head = [f"# {title}", "# each value: the file:line that set it, or (default): built in"]
    body = [(f"{t:<{width}}" if len(t) < width else t + "  ") + f"# {o}" if o else t
            for t, o in rows]
    return "\n".join(head + body) + "\n"


def as_json(loaded: Loaded) -> dict[str, Any]:
    """{key: {value, file, line}} for every schema key (durations in seconds)."""
    return {e.key: {"value": e.value, "file": e.file, "line": e.line} for e in entries(loaded)}

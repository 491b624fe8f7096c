"""Policy files -> the frozen `Policy`, and the node facts the classifier needs.

Reading YAML is where PyYAML's defaults bite: it keeps the last of two duplicate keys, reads
`no` as False and `1:30` as 90. Here a strict loader resolves scalars by the YAML 1.2 core
schema only, every node keeps its line, each file is checked against a schema, then the
values merge and cross-key rules run, so that *all* errors of all files come back at once as
`file:line: dotted.path: message`.
"""

from __future__ import annotations

import difflib
import grp
import math
import os
import pwd
import re
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pruned.model import (
    UID_RAIL,
    Action,
    CleanupPolicy,
    Policy,
    SlurmSource,
    SystemPolicy,
    WhitelistPolicy,
)

# sysexits.h EX_CONFIG; the systemd unit lists it in RestartPreventExitStatus so a bad policy
# does not restart-loop.
EX_CONFIG = 78

POLICY_VERSION = 1
MAX_POLICY_BYTES = 1 << 20  # a policy is a page of YAML; refuse to parse megabytes of it
MAX_NODES = 100_000  # caps alias expansion ("billion laughs") while walking the tree
UID_MAX = 2**32 - 2  # (uid_t)-1 means "no uid"
DEBIAN_SYS_UID = (100, 999)  # login.defs defaults when SYS_UID_MIN/MAX are commented out
ETC_DIR = "/etc/pruned"
REPO_DEFAULT = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"

# Directories that can never be a cleanup root: removing "ended jobs' files" there would eat
# the operating system or home directories.
_SYSTEM_DIRS = "bin boot dev etc home lib lib64 opt proc root run sbin srv sys usr var"
FORBIDDEN_ROOTS = frozenset({"/", *(f"/{d}" for d in _SYSTEM_DIRS.split())})
PLACEHOLDERS = ("job_id", "uid", "user")
CLASSES_IGNORE_ONLY = ("system", "batch", "adopted", "whitelisted")


class PolicyError(Exception):
    """A policy that did not load; `errors` holds every problem, one line each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# ---------------------------------------------------------------- the strict loader

_CORE_RESOLVERS: list[tuple[str, str, str]] = [
    # (tag, regexp, first characters): the YAML 1.2 core schema, and nothing else.
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", "~nN"),
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    # No leading zeros: `017` is octal in YAML 1.1 and decimal in 1.2, so it stays a string
    # and the type check says why. `0o17` and `0x1f` are unambiguous.
    (
        "tag:yaml.org,2002:int",
        r"^(?:[-+]?(?:0|[1-9][0-9]*)|0o[0-7]+|0x[0-9a-fA-F]+)$",
        "-+0123456789",
    ),
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:\.[0-9]+|(?:0|[1-9][0-9]*)(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+.0123456789",
    ),
]


class StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars that refuses duplicate mapping keys."""

    yaml_implicit_resolvers: dict = {}  # noqa: RUF012 - PyYAML's class-level registry

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} (first at line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


for _tag, _rx, _first in _CORE_RESOLVERS:
    StrictLoader.add_implicit_resolver(_tag, re.compile(_rx), list(_first))
# The empty plain scalar is null too; PyYAML looks resolvers for it up under ''.
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^$"), [""])


# ---------------------------------------------------------------- located values


@dataclass(slots=True)
class _Node:
    """A YAML value with where it came from. `value` is a scalar, list[_Node] or dict."""

    value: Any
    file: str
    line: int  # where the value starts
    key_line: int  # the line of the key holding it (errors about the whole value go here)
    raw: str = ""  # the scalar as written, for messages


@dataclass(slots=True)
class _Errors:
    order: dict[str, int] = field(default_factory=dict)  # file -> load order
    items: list[tuple[int, int, str, str]] = field(default_factory=list)

    def add(self, file: str, line: int | None, path: str, msg: str) -> None:
        where = f"{file}:{line}" if line else file
        text = f"{where}: {path}: {msg}" if path else f"{where}: {msg}"
        self.items.append((self.order.get(file, -1), line or 0, path, text))

    def at(self, node: _Node, path: str, msg: str, *, item: bool = False) -> None:
        self.add(node.file, node.line if item else node.key_line, path, msg)

    def lines(self) -> list[str]:
        return [t for *_, t in sorted(self.items)]


def _scalar(node: yaml.ScalarNode) -> Any:
    """Construct one core-schema scalar from its resolved tag; ValueError if it cannot be."""
    tag, text = node.tag, node.value
    if tag == "tag:yaml.org,2002:str":
        return text
    if tag == "tag:yaml.org,2002:null":
        return None
    if tag == "tag:yaml.org,2002:bool":
        if text in ("true", "True", "TRUE"):
            return True
        if text in ("false", "False", "FALSE"):
            return False
    elif tag == "tag:yaml.org,2002:int":
        body = text.lstrip("+-")
        sign = -1 if text.startswith("-") else 1
        if re.fullmatch(r"0|[1-9][0-9]*", body):
            return sign * int(body)
        if re.fullmatch(r"0o[0-7]+", text):
            return int(text[2:], 8)
        if re.fullmatch(r"0x[0-9a-fA-F]+", text):
            return int(text[2:], 16)
    elif tag == "tag:yaml.org,2002:float":
        low = text.lower()
        if low.lstrip("+-") == ".inf":
            return -math.inf if low.startswith("-") else math.inf
        if low == ".nan":
            return math.nan
        try:
            return float(text)
        except ValueError:
            pass
    else:
        raise ValueError(f"unsupported YAML tag {tag!r}")
    raise ValueError(f"{text!r} is not a valid {tag.rsplit(':', 1)[-1]}")


def _walk(
    ynode: yaml.Node,
    file: str,
    key_line: int,
    path: str,
    errs: _Errors,
    budget: list[int],
    stack: tuple[int, ...] = (),
) -> _Node | None:
    """Turn a composed YAML node into a _Node tree, reporting duplicate and bad keys."""
    line = ynode.start_mark.line + 1
    budget[0] -= 1
    if budget[0] < 0:
        if budget[0] == -1:
            errs.add(file, line, path, f"too many values (more than {MAX_NODES}; alias bomb?)")
        return None
    if id(ynode) in stack:
        errs.add(file, line, path, "recursive alias")
        return None
    stack = (*stack, id(ynode))
    if isinstance(ynode, yaml.ScalarNode):
        try:
            value = _scalar(ynode)
        except ValueError as e:
            errs.add(file, line, path, str(e))
            return None
        return _Node(value, file, line, key_line, ynode.value)
    if isinstance(ynode, yaml.SequenceNode):
        items = []
        for i, child in enumerate(ynode.value):
            sub = _walk(child, file, child.start_mark.line + 1, f"{path}[{i}]", errs, budget, stack)
            if sub is not None:
                items.append(sub)
        return _Node(items, file, line, key_line)
    mapping: dict[str, _Node] = {}
    first: dict[str, int] = {}
    for knode, vnode in ynode.value:
        kline = knode.start_mark.line + 1
        key = knode.value if isinstance(knode, yaml.ScalarNode) else None
        if key is not None and knode.tag != "tag:yaml.org,2002:str":
            try:
                key = _scalar(knode)
            except ValueError:
                key = None
        dotted = f"{path}.{key}" if path else str(key)
        if not isinstance(key, str):
            shown = repr(key) if isinstance(knode, yaml.ScalarNode) else "a collection"
            errs.add(file, kline, path or "(top level)", f"keys must be strings, got {shown}")
            continue
        if key in first:
            errs.add(file, kline, dotted, f"duplicate key (first at line {first[key]})")
            continue
        first[key] = kline
        sub = _walk(vnode, file, kline, dotted, errs, budget, stack)
        if sub is not None:
            mapping[key] = sub
    return _Node(mapping, file, line, key_line)


def _read_file(file: str, errs: _Errors) -> _Node | None:
    """Parse one policy file into a located tree; None (and errors) when it is unusable."""
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        errs.add(file, None, "", f"cannot read: {e.strerror or e}")
        return None
    if len(data) > MAX_POLICY_BYTES:
        errs.add(file, None, "", f"cannot read: larger than {MAX_POLICY_BYTES} bytes")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        errs.add(file, None, "", f"cannot read: not UTF-8 ({e.reason} at byte {e.start})")
        return None
    try:
        root = yaml.compose(text, Loader=StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        what = ": ".join(p for p in (e.context, e.problem) if p)
        errs.add(file, line, "", f"YAML syntax error: {what}")
        return None
    except yaml.YAMLError as e:  # unmarked reader errors (e.g. control characters)
        errs.add(file, None, "", f"YAML syntax error: {e}")
        return None
    if root is None:
        errs.add(file, 1, "", "empty policy: expected a mapping that starts with 'version: 1'")
        return None
    if not isinstance(root, yaml.MappingNode):
        kind = "a list" if isinstance(root, yaml.SequenceNode) else "a scalar"
        errs.add(
            file,
            root.start_mark.line + 1,
            "",
            f"the top level must be a mapping of keys (version, mode, ...), got {kind}",
        )
        return None
    node = _walk(root, file, 1, "", errs, [MAX_NODES])
    if node is None:
        return None
    version = node.value.pop("version", None)
    if version is None:
        errs.add(file, 1, "version", "required key missing (write 'version: 1' at the top)")
    elif type(version.value) is not int:
        errs.at(version, "version", f"expected the integer 1, got {_show(version)}")
    elif version.value != POLICY_VERSION:
        errs.at(
            version,
            "version",
            f"unsupported version {version.value} (this pruned reads version {POLICY_VERSION})",
        )
    return node


def _policy_files(path: str, errs: _Errors) -> list[str]:
    """The files a policy path stands for: itself, or a directory's *.yaml in lexical order."""
    if not os.path.isdir(path):
        return [path]
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        errs.add(path, None, "", f"cannot read: {e.strerror or e}")
        return []
    # Dot-files are editor and package-manager leftovers (.#50-site.yaml, .dpkg-new...).
    files = [os.path.join(path, n) for n in names if n.endswith(".yaml") and not n.startswith(".")]
    if not files:
        errs.add(path, None, "", "no *.yaml policy files in this directory")
    return files


# ---------------------------------------------------------------- value checks

_INVALID = object()
Check = Callable[[_Node, str, _Errors], Any]


def _show(node: _Node) -> str:
    """A value as the admin wrote it, for error messages."""
    v = node.value
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(v)
    return node.raw or repr(v)


_YAML11_BOOLS = {
    "yes": "true",
    "y": "true",
    "on": "true",
    "no": "false",
    "n": "false",
    "off": "false",
}


def _bool(node: _Node, path: str, errs: _Errors) -> Any:
    if isinstance(node.value, bool):
        return node.value
    hint = ""
    if isinstance(node.value, str) and node.value.lower() in _YAML11_BOOLS:
        hint = f" (YAML 1.1 boolean? write {_YAML11_BOOLS[node.value.lower()]})"
    errs.at(node, path, f"expected true or false, got {_show(node)}{hint}")
    return _INVALID


def _int(minimum: int, maximum: int | None = None) -> Check:
    def check(node: _Node, path: str, errs: _Errors) -> Any:
        v = node.value
        if type(v) is not int:
            hint = ""
            if isinstance(v, str) and re.fullmatch(r"[-+]?0[0-9]+", v):
                hint = (
                    " (a leading zero is ambiguous: YAML 1.1 reads it as octal; "
                    "write it without the zero, or 0o17 for octal)"
                )
            errs.at(node, path, f"expected an integer, got {_show(node)}{hint}")
            return _INVALID
        if v < minimum or (maximum is not None and v > maximum):
            bound = f"at least {minimum}" if maximum is None else f"{minimum}..{maximum}"
            errs.at(node, path, f"must be {bound}, got {v}")
            return _INVALID
        return v

    return check


def _duration(positive: bool) -> Check:
    def check(node: _Node, path: str, errs: _Errors) -> Any:
        if isinstance(node.value, dict | list) or node.value is None:
            errs.at(node, path, f"expected a duration like 10s, 5m or 1h30m, got {_show(node)}")
            return _INVALID
        try:
            seconds = parse_duration(node.value)
        except ValueError as e:
            errs.at(node, path, str(e))
            return _INVALID
        if positive and seconds <= 0:
            errs.at(node, path, f"must be longer than 0s, got {_show(node)}")
            return _INVALID
        return seconds

    return check


def _enum(*allowed: str, hints: dict[str, str] | None = None) -> Check:
    def check(node: _Node, path: str, errs: _Errors) -> Any:
        v = node.value
        if isinstance(v, str) and v in allowed:
            return v
        if isinstance(v, str) and hints and v in hints:
            errs.at(node, path, hints[v])
        else:
            errs.at(node, path, f"expected one of {', '.join(allowed)}; got {_show(node)}")
        return _INVALID

    return check


def _ignore_only(cls: str) -> Check:
    def check(node: _Node, path: str, errs: _Errors) -> Any:
        if node.value == "ignore":
            return Action.IGNORE
        errs.at(
            node,
            path,
            f"only 'ignore' is allowed for class {cls} (a policy can never kill {cls} processes)",
        )
        return _INVALID

    return check


def _path_value(node: _Node, path: str, errs: _Errors, *, item: bool = False) -> Any:
    v = node.value
    if not isinstance(v, str):
        errs.at(node, path, f"expected an absolute path, got {_show(node)}", item=item)
        return _INVALID
    if not v.startswith("/"):
        errs.at(node, path, f"must be an absolute path, got {v!r}", item=item)
        return _INVALID
    if "\0" in v or ".." in v.split("/"):
        errs.at(node, path, f"'..' and NUL are not allowed in paths, got {v!r}", item=item)
        return _INVALID
    # "/tmp//x/./" and "/tmp/x" are one directory; compare roots in one spelling.
    return "/" + "/".join(p for p in v.split("/") if p not in ("", "."))


def _path(node: _Node, path: str, errs: _Errors) -> Any:
    return _path_value(node, path, errs)


def _optional_path(node: _Node, path: str, errs: _Errors) -> Any:
    return None if node.value is None else _path_value(node, path, errs)


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?")


def _name_item(node: _Node, path: str, errs: _Errors) -> Any:
    if isinstance(node.value, str) and _NAME.fullmatch(node.value):
        return node.value
    errs.at(node, path, f"expected a user or group name, got {_show(node)}", item=True)
    return _INVALID


def _path_item(node: _Node, path: str, errs: _Errors) -> Any:
    return _path_value(node, path, errs, item=True)


ListPost = Callable[[list[tuple[int, Any, _Node]], str, _Errors], bool]


def _list(item: Check, *, non_empty: bool = False, post: ListPost | None = None) -> Check:
    """A list of items: each item checked, duplicates refused, then `post` on the good ones."""

    def check(node: _Node, path: str, errs: _Errors) -> Any:
        if not isinstance(node.value, list):
            errs.at(node, path, f"expected a list, got {_show(node)}")
            return _INVALID
        if non_empty and not node.value:
            errs.at(node, path, "must not be empty")
            return _INVALID
        out, seen, ok = [], {}, True
        good: list[tuple[int, Any, _Node]] = []
        for i, sub in enumerate(node.value):
            value = item(sub, f"{path}[{i}]", errs)
            if value is _INVALID:
                ok = False
            elif value in seen:
                errs.at(
                    sub,
                    f"{path}[{i}]",
                    f"{_show(sub)} is listed twice (first at line {seen[value]})",
                    item=True,
                )
                ok = False
            else:
                seen[value] = sub.line
                out.append(value)
                good.append((i, value, sub))
        if post is not None and not post(good, path, errs):
            ok = False
        return tuple(out) if ok else _INVALID

    return check


_RANGE = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?")


def _uid_range(node: _Node, path: str, errs: _Errors) -> Any:
    v = node.value
    if type(v) is int:
        lo = hi = v
    elif isinstance(v, str) and (m := _RANGE.fullmatch(v)):
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
    else:
        errs.at(
            node,
            path,
            f'expected a uid or a range like "60000-64999", got {_show(node)}',
            item=True,
        )
        return _INVALID
    if lo > hi:
        errs.at(node, path, f"range {v!r} starts after it ends", item=True)
        return _INVALID
    if hi > UID_MAX:
        errs.at(node, path, f"uids end at {UID_MAX}, got {v!r}", item=True)
        return _INVALID
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
        return _INVALID
    return (lo, hi)


def _roots_post(items: list[tuple[int, Any, _Node]], path: str, errs: _Errors) -> bool:
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


def _container_base(node: _Node, path: str, errs: _Errors) -> Any:
    value = _optional_path(node, path, errs)
    if value in FORBIDDEN_ROOTS:
        errs.at(node, path, f"{value!r} cannot be the job_container/tmpfs BasePath")
        return _INVALID
    return value


def _job_dir_item(node: _Node, path: str, errs: _Errors) -> Any:
    value = _path_value(node, path, errs, item=True)
    if value is _INVALID:
        return _INVALID
    try:
        specs = [
            (f, spec, conv) for _, f, spec, conv in string.Formatter().parse(value) if f is not None
        ]
    except ValueError as e:
        errs.at(node, path, f"bad pattern {value!r}: {e}", item=True)
        return _INVALID
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
            return _INVALID
    if "job_id" not in [name for name, _, _ in specs]:
        errs.at(
            node,
            path,
            f"pattern {value!r} has no {{job_id}}: without it every job would "
            "share (and delete) one directory",
            item=True,
        )
        return _INVALID
    return value


# ---------------------------------------------------------------- the schema


@dataclass(frozen=True, slots=True)
class _Field:
    check: Check
    target: str | None  # Policy attribute, "sub.attr" for nested dataclasses, None: check only


_MODE = _enum("report", "enforce")
_SCHEMA: dict[str, Any] = {
    "mode": _Field(_MODE, "dry_run"),
    "actions": {
        "stray": _Field(_enum("kill", "adopt", "ignore"), "stray_action"),
        "adopt_fallback": _Field(
            _enum(
                "kill",
                "ignore",
                hints={
                    "adopt": "adopt_fallback is what happens when the uid has no running job "
                    "to adopt into, so it cannot be 'adopt' (expected kill or ignore)"
                },
            ),
            "adopt_fallback",
        ),
        **{c: _Field(_ignore_only(c), None) for c in CLASSES_IGNORE_ONLY},
    },
    "kill": {
        "grace": _Field(_duration(False), "kill_grace"),
        "max_per_sweep": _Field(_int(1), "max_kills_per_sweep"),
    },
    "min_age": _Field(_duration(False), "min_age"),
    "jobs": {
        "sources": _Field(_list(_enum("slurm", "statedir"), non_empty=True), "job_sources"),
        "slurm": {
            "cgroup_root": _Field(_path, "slurm.cgroup_root"),
            "stepd": _Field(_list(_path_item, non_empty=True), "slurm.stepd"),
        },
        "state_dir": _Field(_path, "state_dir"),
    },
    "batch_daemons": _Field(_list(_path_item), "batch_daemons"),
    "sshd_paths": _Field(_list(_path_item), "sshd_paths"),
    "system": {
        "login_defs": _Field(_bool, "system.login_defs"),
        "login_defs_path": _Field(_path, "system.login_defs_path"),
        "uid_ranges": _Field(_list(_uid_range), "system.uid_ranges"),
        "users": _Field(_list(_name_item), "system.users"),
    },
    "whitelist": {
        "users": _Field(_list(_name_item), "whitelist.users"),
        "groups": _Field(_list(_name_item), "whitelist.groups"),
        "exe": _Field(_list(_path_item), "whitelist.exe"),
        "sshd": _Field(_bool, "whitelist.sshd"),
    },
    "cleanup": {
        "enabled": _Field(_bool, "cleanup.enabled"),
        "roots": _Field(_list(_path_item, post=_roots_post), "cleanup.roots"),
        "job_dirs": _Field(_list(_job_dir_item), "cleanup.job_dirs"),
        "job_container_base": _Field(_container_base, "cleanup.job_container_base"),
        "min_age": _Field(_duration(False), "cleanup.min_age"),
        "loose_files": _Field(_bool, "cleanup.loose_files"),
        "max_listed": _Field(_int(0), "cleanup.max_listed"),
    },
    "schedule": {
        "sweep": _Field(_duration(True), "sweep_interval"),
        "clean": _Field(_duration(True), "clean_interval"),
        "jobs": _Field(_duration(True), "jobs_interval"),
    },
    "events": _Field(_bool, "events"),
    "audit": {"fallback_file": _Field(_optional_path, "audit_fallback")},
    "metrics": {"textfile": _Field(_optional_path, "metrics_textfile")},
}


def _check_tree(
    node: _Node,
    schema: dict[str, Any],
    path: str,
    errs: _Errors,
    out: dict[str, tuple[Any, _Node]],
    bad: set[str],
) -> None:
    """Check a mapping against the schema: good values land in `out`, bad paths in `bad`."""
    for key, sub in node.value.items():
        dotted = f"{path}.{key}" if path else key
        spec = schema.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            errs.add(
                sub.file, sub.key_line, dotted, f"unknown key ({hint}allowed: {', '.join(schema)})"
            )
        elif isinstance(spec, dict):
            if isinstance(sub.value, dict):
                _check_tree(sub, spec, dotted, errs, out, bad)
            else:
                bad.add(dotted)
                errs.at(
                    sub, dotted, f"expected a mapping with keys {', '.join(spec)}; got {_show(sub)}"
                )
        else:
            value = spec.check(sub, dotted, errs)
            if value is _INVALID:
                bad.add(dotted)
            else:
                out[dotted] = (value, sub)


def _contradictions(
    vals: dict[str, tuple[Any, _Node]], bad: set[str], policy: Policy, errs: _Errors
) -> None:
    """Settings that are each valid but make no sense together.

    A check is skipped when one of its keys was set but invalid: that key already has an
    error, and judging its default instead would only add a confusing second one.
    """

    def usable(*keys: str) -> bool:
        return not any(k == b or k.startswith(b + ".") for k in keys for b in bad)

    def where(*keys: str) -> tuple[str, _Node] | None:
        """The first of keys that a file set (a contradiction is reported where it was set)."""
        if not usable(*keys):
            return None
        for k in keys:
            if k in vals:
                return k, vals[k][1]
        return None

    def origin(key: str) -> str:
        node = vals.get(key, (None, None))[1]
        return f"set at {node.file}:{node.key_line}" if node else "the default"

    if (
        policy.stray_action is Action.ADOPT
        and "slurm" not in policy.job_sources
        and (w := where("actions.stray", "jobs.sources"))
    ):
        errs.at(
            w[1],
            w[0],
            "stray: adopt needs 'slurm' in jobs.sources "
            f"(adoption moves processes into Slurm job cgroups); jobs.sources is "
            f"{list(policy.job_sources)} ({origin('jobs.sources')})",
        )
    if policy.kill_grace >= policy.sweep_interval and (w := where("kill.grace", "schedule.sweep")):
        errs.at(
            w[1],
            w[0],
            f"kill.grace ({_secs(policy.kill_grace)}, {origin('kill.grace')}) "
            f"must be shorter than schedule.sweep ({_secs(policy.sweep_interval)}, "
            f"{origin('schedule.sweep')}): a kill must finish before the next sweep",
        )
    if (
        policy.whitelist.sshd
        and not policy.sshd_paths
        and (w := where("whitelist.sshd", "sshd_paths"))
    ):
        errs.at(
            w[1],
            w[0],
            "whitelist.sshd is true but sshd_paths is empty: no sshd could "
            "ever be recognised (set whitelist.sshd: false, or list the sshd binaries)",
        )

    sys_users = set(policy.system.users)
    for key, what in (("whitelist.users", "user"), ("whitelist.groups", "group")):
        if key not in vals or not usable("system.users"):
            continue
        for i, name in enumerate(vals[key][0]):
            if name in sys_users:
                errs.at(
                    vals[key][1].value[i],
                    f"{key}[{i}]",
                    f"{what} {name!r} is also in system.users "
                    f"({origin('system.users')}): list it in one place only",
                    item=True,
                )

    # Every job_dirs pattern must lie under a root: the root is what the cleanup walk trusts
    # (same filesystem, fd-based), and a pattern outside it would be deleted unwalked.
    roots = policy.cleanup.roots
    if usable("cleanup.roots", "cleanup.job_dirs"):
        for i, pattern in enumerate(policy.cleanup.job_dirs):
            if any(pattern.startswith(r + "/") for r in roots):
                continue
            msg = (
                f"pattern {pattern!r} is not under any cleanup root "
                f"({', '.join(roots) or 'none'}); add its root to cleanup.roots "
                "(job_container_base is the place for job_container/tmpfs)"
            )
            if "cleanup.job_dirs" in vals:
                node = vals["cleanup.job_dirs"][1].value[i]
                errs.at(node, f"cleanup.job_dirs[{i}]", msg, item=True)
            elif "cleanup.roots" in vals:  # the default patterns no longer fit the roots
                errs.at(vals["cleanup.roots"][1], "cleanup.roots", f"default job_dirs {msg}")


def _secs(seconds: float) -> str:
    return f"{seconds:g}s"


def _build(vals: dict[str, tuple[Any, _Node]], sources: tuple[str, ...]) -> Policy:
    """A Policy from the checked values; anything not set keeps the dataclass default."""
    top: dict[str, Any] = {"sources": sources}
    subs: dict[str, dict[str, Any]] = {"slurm": {}, "system": {}, "whitelist": {}, "cleanup": {}}
    targets = dict(_targets(_SCHEMA, ""))
    for dotted, (value, _) in vals.items():
        target = targets[dotted]
        if target is None:
            continue
        if target == "dry_run":
            value = value == "report"
        elif target in ("stray_action", "adopt_fallback"):
            value = Action(value)
        if "." in target:
            sub, attr = target.split(".")
            subs[sub][attr] = value
        else:
            top[target] = value
    return Policy(
        slurm=SlurmSource(**subs["slurm"]),
        system=SystemPolicy(**subs["system"]),
        whitelist=WhitelistPolicy(**subs["whitelist"]),
        cleanup=CleanupPolicy(**subs["cleanup"]),
        **top,
    )


def _targets(schema: dict[str, Any], path: str) -> Iterable[tuple[str, str | None]]:
    for key, spec in schema.items():
        dotted = f"{path}.{key}" if path else key
        if isinstance(spec, dict):
            yield from _targets(spec, dotted)
        else:
            yield dotted, spec.target


# ---------------------------------------------------------------- public API


def load_policy(path: str | os.PathLike) -> Policy:
    """Load a policy file or directory; raise PolicyError listing every problem."""
    path = os.fspath(path)
    errs = _Errors()
    files = _policy_files(path, errs)
    errs.order = {f: i for i, f in enumerate(files)}
    # Each file is checked on its own, so every file's mistakes are reported even where a
    # later file overrides the key. Then the checked values merge by dotted key in file
    # order: schema mappings merge key by key, a later scalar or list (a leaf) replaces.
    vals: dict[str, tuple[Any, _Node]] = {}
    bad: set[str] = set()
    unreadable = False
    for file in files:
        node = _read_file(file, errs)
        if node is None:
            unreadable = True
            continue
        checked: dict[str, tuple[Any, _Node]] = {}
        _check_tree(node, _SCHEMA, "", errs, checked, bad)
        vals.update(checked)
    policy = _build(vals, tuple(files))
    # With a whole file unreadable, what it would have set is unknown: cross-key checks on
    # the rest could only guess.
    if not unreadable:
        _contradictions(vals, bad, policy, errs)
    if errs.items:
        raise PolicyError(errs.lines())
    return policy


def default_policy_path(etc_dir: str = ETC_DIR) -> str:
    """/etc/pruned/policy.d, else /etc/pruned/policy.yaml, else the checkout's default."""
    for candidate, exists in (
        (os.path.join(etc_dir, "policy.d"), os.path.isdir),
        (os.path.join(etc_dir, "policy.yaml"), os.path.isfile),
    ):
        if exists(candidate):
            return candidate
    return str(REPO_DEFAULT)


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str | int | float) -> float:
    """Seconds in "10s" "5m" "1h30m" "500ms" "2d" (or a bare number); ValueError otherwise."""
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ValueError(f"expected a duration like 10s, 5m or 1h30m, got {text!r}")
    if not isinstance(text, str):
        if not math.isfinite(text):
            raise ValueError(f"a duration must be finite, got {text}")
        if text < 0:
            raise ValueError(f"a duration cannot be negative, got {text}")
        return float(text)
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
        return float(s)
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
    return total


# ---------------------------------------------------------------- node facts


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the policy's names and ranges mean on this node, resolved once per (re)load."""

    system_ranges: tuple[tuple[int, int], ...]  # sorted, disjoint, inclusive
    whitelist_uids: frozenset[int]
    missing: tuple[str, ...]  # names/files that do not exist here (warnings, not errors)

    def is_system_uid(self, uid: int) -> bool:
        """True if uid is in one of the system ranges."""
        return any(lo <= uid <= hi for lo, hi in self.system_ranges)


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

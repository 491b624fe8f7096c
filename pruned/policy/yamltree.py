"""Policy YAML -> a tree of values that remember their file and line.

Reading YAML is where PyYAML's defaults bite: it keeps the last of two duplicate keys, reads
`no` as False and `1:30` as 90. Here a strict loader resolves scalars by the YAML 1.2 core
schema only, and every node keeps its line, so that later checks can say `file:line`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

POLICY_VERSION = 1
MAX_POLICY_BYTES = 1 << 20  # a policy is a page of YAML; refuse to parse megabytes of it
MAX_NODES = 100_000  # caps alias expansion ("billion laughs") while walking the tree
MAX_DEPTH = 64  # a policy is four levels deep; [[[[...]]]] thousands deep is an attack


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
class Node:
    """A YAML value with where it came from. `value` is a scalar, list[Node] or dict."""

    value: Any
    file: str
    line: int  # where the value starts
    key_line: int  # the line of the key holding it (errors about the whole value go here)
    raw: str = ""  # the scalar as written, for messages


@dataclass(slots=True)
class Errors:
    """Every problem found so far, as `file:line: path: message`, sorted on output."""

    order: dict[str, int] = field(default_factory=dict)  # file -> load order
    # (load order, line, path, text, file, message): sorted by the first four
    items: list[tuple[int, int, str, str, str, str]] = field(default_factory=list)

    def add(self, file: str, line: int | None, path: str, msg: str) -> None:
        """Record one problem at file:line (line None: about the whole file)."""
        where = f"{file}:{line}" if line else file
        text = f"{where}: {path}: {msg}" if path else f"{where}: {msg}"
        self.items.append((self.order.get(file, -1), line or 0, path, text, file, msg))

    def at(self, node: Node, path: str, msg: str, *, item: bool = False) -> None:
        """Record a problem with node: at its key's line, or its own line for list items."""
        self.add(node.file, node.line if item else node.key_line, path, msg)

    def lines(self) -> list[str]:
        """The messages in load order of their files, then by line and path."""
        return [item[3] for item in sorted(self.items)]

    def details(self) -> list[dict[str, Any]]:
        """The same problems, in the same order, as {file, line, key, message, text}."""
        return [
            {"file": file, "line": line or None, "key": path or None, "message": msg,
             "text": text}
            for _, line, path, text, file, msg in sorted(self.items)
        ]  # fmt: skip


def show(node: Node) -> str:
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
    errs: Errors,
    budget: list[int],
    stack: tuple[int, ...] = (),
) -> Node | None:
    """Turn a composed YAML node into a Node tree, reporting duplicate and bad keys."""
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
    if len(stack) > MAX_DEPTH:
        errs.add(file, line, path, f"nested more than {MAX_DEPTH} levels deep")
        return None
    if isinstance(ynode, yaml.ScalarNode):
        try:
            value = _scalar(ynode)
        except ValueError as e:
            errs.add(file, line, path, str(e))
            return None
        return Node(value, file, line, key_line, ynode.value)
    if isinstance(ynode, yaml.SequenceNode):
        items = []
        for i, child in enumerate(ynode.value):
            sub = _walk(child, file, child.start_mark.line + 1, f"{path}[{i}]", errs, budget, stack)
            if sub is not None:
                items.append(sub)
        return Node(items, file, line, key_line)
    mapping: dict[str, Node] = {}
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
    return Node(mapping, file, line, key_line)


def read_bytes(file: str, errs: Errors) -> bytes | None:
    """The bytes of one policy file; None (and an error) when it cannot be read."""
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        errs.add(file, None, "", f"cannot read: {e.strerror or e}")
        return None
    if len(data) > MAX_POLICY_BYTES:
        errs.add(file, None, "", f"cannot read: larger than {MAX_POLICY_BYTES} bytes")
        return None
    return data


def read_file(file: str, errs: Errors) -> Node | None:
    """Parse one policy file into a located tree; None (and errors) when it is unusable."""
    data = read_bytes(file, errs)
    return None if data is None else parse_bytes(file, data, errs)


def parse_bytes(file: str, data: bytes, errs: Errors) -> Node | None:
    """Parse the bytes of one policy file (named `file` in errors) into a located tree."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        errs.add(file, None, "", f"cannot read: not UTF-8 ({e.reason} at byte {e.start})")
        return None
    try:
        root = yaml.compose(text, Loader=StrictLoader)
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        errs.add(file, None, "", f"YAML nested too deeply (a policy needs at most {MAX_DEPTH} "
                 "levels)")
        return None
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
        errs.at(version, "version", f"expected the integer 1, got {show(version)}")
    elif version.value != POLICY_VERSION:
        errs.at(
            version,
            "version",
            f"unsupported version {version.value} (this pruned reads version {POLICY_VERSION})",
        )
    return node


def is_fragment_name(name: str) -> bool:
    """Whether a directory entry is a policy fragment: `*.yaml`, not a dot-file.

    Dot-files are editor and package-manager leftovers (.#50-site.yaml, .dpkg-new...).
    """
    return name.endswith(".yaml") and not name.startswith(".") and "/" not in name


def fragment_names(path: str, errs: Errors) -> list[str] | None:
    """A policy directory's fragment names in lexical (merge) order; None if unreadable."""
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        errs.add(path, None, "", f"cannot read: {e.strerror or e}")
        return None
    return [n for n in names if is_fragment_name(n)]


def policy_files(path: str, errs: Errors) -> list[str]:
    """The files a policy path stands for: itself, or a directory's *.yaml in lexical order."""
    if not os.path.isdir(path):
        return [path]
    names = fragment_names(path, errs)
    if names is None:
        return []
    files = [os.path.join(path, n) for n in names]
    if not files:
        errs.add(path, None, "", "no *.yaml policy files in this directory")
    return files

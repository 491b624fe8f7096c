"""The policy loader on generated files and directories: a Policy or a PolicyError, nothing
else (the daemon's SIGHUP reload and check-config rely on it)."""

from __future__ import annotations

import os
import shutil
import tempfile

import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from pruned.model import Policy
from pruned.policy.load import PolicyError, load_policy
from pruned.policy.schema import SCHEMA
from tests.fixtures.paths import REPO
from tests.fuzz._settings import fuzz

SHIPPED = sorted((REPO / "policies").glob("*.yaml"))
GOOD = {p.name: p.read_bytes() for p in SHIPPED}

# scalars as YAML would write them, and the values each kind of check is tempted by
raw_scalars = st.sampled_from(
    [
        "true",
        "false",
        "no",
        "off",
        "yes",
        "null",
        "~",
        "",
        "0",
        "-1",
        "1",
        "017",
        "0o17",
        "0x1f",
        "1:30",
        "1e3",
        "1.5",
        ".inf",
        "-.inf",
        ".nan",
        "10s",
        "5m",
        "1h30m",
        "500ms",
        "2d",
        "-5s",
        "1h1h",
        "10 s",
        "kill",
        "adopt",
        "ignore",
        "report",
        "enforce",
        "slurm",
        "statedir",
        "/",
        "/tmp",
        "/tmp/{job_id}",
        "/tmp/{uid}/{job_id}",
        "/tmp/{nope}",
        "/tmp/{job_id:>4}",
        "/tmp/{",
        "/x/../y",
        "relative",
        "60000-64999",
        "99-100",
        "5-1",
        "root",
        "nobody",
        "'quoted'",
        '"dq"',
        "!!python/object:os.system x",
        "!!binary aGk=",
        "&a 1",
        "*a",
        "*undefined",
        "{a: 1}",
        "[1, 2]",
        "[]",
        "{}",
        "'\\x00'",
        '"\\0"',
        "99999999999999999999",
        "1e400",
        '"\\ud800"',
    ]
)
py_scalars = (
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=20)
)
leaf = st.recursive(
    py_scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def schema_tree(draw: st.DrawFn, schema: dict, depth: int = 0) -> dict:
    """A mapping using (mostly) the schema's own keys, with values of every kind."""
    out: dict = {}
    keys = draw(st.lists(st.sampled_from(sorted(schema)), unique=True, max_size=len(schema)))
    for key in keys:
        spec = schema[key]
        if isinstance(spec, dict) and draw(st.integers(0, 4)):
            out[key] = draw(schema_tree(spec, depth + 1))
        else:
            out[key] = draw(
                leaf
                | raw_scalars.map(lambda s: _RawScalar(s))
                | st.lists(raw_scalars.map(lambda s: _RawScalar(s)), max_size=3)
            )
    if draw(st.integers(0, 5)) == 0:
        out[draw(st.text(max_size=8))] = draw(leaf)  # an unknown key
    return out


class _RawScalar(str):
    """A scalar written into the YAML as is, unquoted (as an admin types it)."""


def render(tree: dict, version: object) -> str:
    raws: list[str] = []

    def mark(value: object) -> object:
        if isinstance(value, _RawScalar):
            raws.append(str(value))
            return f"RAW{len(raws) - 1:04d}X"
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    doc = mark({"version": version, **tree} if version is not None else tree)
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    for i, raw in enumerate(raws):
        text = text.replace(f"RAW{i:04d}X", raw)
    return text


@st.composite
def policy_text(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["tree", "raw", "mutated", "text"]))
    if kind == "tree":
        version = draw(st.sampled_from([1, 1, 1, 2, "1", None, 1.0, True]))
        tree = draw(schema_tree(SCHEMA))
        try:
            return render(tree, version).encode()
        except yaml.YAMLError:
            return b"version: 1\n"
    if kind == "raw":
        # hand-typed lines: unquoted scalars, anchors, aliases, tags, duplicate keys
        lines = ["version: 1"]
        for _ in range(draw(st.integers(0, 8))):
            key = draw(
                st.sampled_from(
                    [
                        "mode",
                        "min_age",
                        "kill",
                        "  grace",
                        "  brake",
                        "    max_uids",
                        "  max_per_sweep",
                        "actions",
                        "  stray",
                        "  system",
                        "jobs",
                        "  sources",
                        "  state_dir",
                        "cleanup",
                        "  job_dirs",
                        "  roots",
                        "system",
                        "  uid_ranges",
                        "whitelist",
                        "  users",
                        "schedule",
                        "  sweep",
                        "events",
                        "version",
                        "? [a]",
                        "&x mode",
                        "<<",
                    ]
                )
            )
            value = draw(raw_scalars)
            lines.append(
                f"{key}: {value}"
                if not key.endswith(
                    ("actions", "kill", "jobs", "cleanup", "system", "whitelist", "schedule")
                )
                else f"{key}:"
            )
        return ("\n".join(lines) + "\n").encode()
    if kind == "mutated":
        data = bytearray(GOOD[draw(st.sampled_from(sorted(GOOD)))])
        for _ in range(draw(st.integers(1, 5))):
            i = draw(st.integers(0, len(data)))
            op = draw(st.sampled_from(["cut", "insert", "delete", "dup-line"]))
            if op == "cut":
                data = data[:i]
            elif op == "insert":
                data[i:i] = draw(
                    st.sampled_from(
                        [
                            b":",
                            b"-",
                            b" ",
                            b"\n",
                            b"\t",
                            b"'",
                            b'"',
                            b"[",
                            b"{",
                            b"&a ",
                            b"*a",
                            b"!!str ",
                            b"\xff",
                            b"\x00",
                            b"\x1b",
                            b"no",
                            b"1:30",
                        ]
                    )
                )
            elif op == "delete":
                del data[i : i + draw(st.integers(1, 20))]
            else:
                start = data.rfind(b"\n", 0, i) + 1
                end = data.find(b"\n", i)
                line = data[start : end if end >= 0 else len(data)]
                data[start:start] = line + b"\n"
        return bytes(data)
    return draw(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))


def _check(path: str) -> None:
    try:
        policy = load_policy(path)
    except PolicyError as e:
        assert e.errors and all(isinstance(line, str) and line for line in e.errors)
        return
    assert isinstance(policy, Policy)


@fuzz(1)
@given(policy_text())
@example(b"version: 1\nmin_age: &a [*a]\n")
@example(b"version: 1\nmode: !!python/object/apply:os.system ['true']\n")
@example(b"version: 1\nkill: {grace: 1e400, brake: {max_uids: 99999999999999999999}}\n")
@example(b"version: 1\n" + b"a: &a [" + b"*a, " * 50 + b"]\n")
def test_policy_file(data: bytes) -> None:
    d = tempfile.mkdtemp(prefix="pruned-fuzz-policy-")
    try:
        path = os.path.join(d, "policy.yaml")
        with open(path, "wb") as f:
            f.write(data)
        _check(path)
    finally:
        shutil.rmtree(d)


@fuzz(0.3)
@given(
    st.lists(policy_text(), min_size=0, max_size=3),
    st.lists(st.sampled_from(sorted(GOOD)), max_size=2),
)
def test_policy_directory(files: list[bytes], shipped: list[str]) -> None:
    d = tempfile.mkdtemp(prefix="pruned-fuzz-policyd-")
    try:
        for i, name in enumerate(shipped):
            with open(os.path.join(d, f"{i:02d}-{name}"), "wb") as f:
                f.write(GOOD[name])
        for i, data in enumerate(files):
            with open(os.path.join(d, f"{50 + i}-fuzz.yaml"), "wb") as f:
                f.write(data)
        _check(d)
    finally:
        shutil.rmtree(d)

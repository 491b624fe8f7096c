"""Policy files -> the frozen `Policy`.

Each file is read strictly (yamltree) and checked against the schema, then the values merge
and the cross-key rules (contradictions) run, so that *all* errors of all files come back at
once as `file:line: dotted.path: message`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pruned.model import (
    Action,
    CleanupPolicy,
    Policy,
    SlurmSource,
    SystemPolicy,
    WhitelistPolicy,
)
from pruned.policy.contradictions import check_contradictions
from pruned.policy.schema import SCHEMA, check_tree
from pruned.policy.yamltree import (
    Errors,
    Node,
    fragment_names,
    parse_bytes,
    policy_files,
    read_bytes,
)

ETC_DIR = "/etc/pruned"
# parents[2]: pruned/policy/load.py -> the checkout root, which holds policies/.
REPO_DEFAULT = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"


class PolicyError(Exception):
    """A policy that did not load; `errors` holds every problem, one line each.

    `details` holds the same problems as {file, line, key, message, text} (for --json).
    """

    def __init__(self, errors: list[str], details: list[dict[str, Any]] | None = None) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
        self.details = details if details is not None else [{"text": e} for e in errors]


@dataclass(frozen=True, slots=True)
class Loaded:
    """A policy that passed validation, and what it was made of.

    `values`: each key a file set -> (its checked value, the node that set it: file and line);
    keys not in it keep the built-in default. `contents`: each file's bytes as validated (what
    the last-good store keeps).
    """

    policy: Policy
    values: dict[str, tuple[Any, Node]]
    files: tuple[str, ...]
    contents: dict[str, bytes] = field(default_factory=dict)


def _build(vals: dict[str, tuple[Any, Node]], sources: tuple[str, ...]) -> Policy:
    """A Policy from the checked values; anything not set keeps the dataclass default."""
    top: dict[str, Any] = {"sources": sources}
    subs: dict[str, dict[str, Any]] = {"slurm": {}, "system": {}, "whitelist": {}, "cleanup": {}}
    targets = dict(_targets(SCHEMA, ""))
    for dotted, (value, _) in vals.items():
        target = targets[dotted]
        if target is None:
            continue
        if target == "dry_run":
            value = value == "report"
        elif target in ("stray_action", "adopt_fallback", "adopt_failure"):
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
    """(dotted key, Policy target) for every leaf of the schema."""
    for key, spec in schema.items():
        dotted = f"{path}.{key}" if path else key
        if isinstance(spec, dict):
            yield from _targets(spec, dotted)
        else:
            yield dotted, spec.target


def load_policy(path: str | os.PathLike) -> Policy:
    """Load a policy file or directory; raise PolicyError listing every problem."""
    return load_path(path).policy


def load_path(path: str | os.PathLike) -> Loaded:
    """load_policy, keeping where each value came from and the bytes that were validated."""
    path = os.fspath(path)
    errs = Errors()
    return load_files(policy_files(path, errs), errs)


def load_with_candidate(directory: str, candidate: str, name: str) -> Loaded:
    """Validate `candidate` as the fragment `name` of the policy directory `directory`.

    The directory's fragments merge in lexical order as usual, with `candidate` read in the
    place of `directory/name`: it replaces the file of that name, or is merged at the position
    that name sorts to. Nothing is written; errors in the candidate name the candidate's path.
    """
    errs = Errors()
    files: list[str] = []
    if not os.path.isdir(directory):
        errs.add(directory, None, "", "not a directory (--dir takes a policy.d directory)")
    else:
        names = fragment_names(directory, errs)
        if names is not None:
            files = [
                candidate if n == name else os.path.join(directory, n)
                for n in sorted({*names, name})
            ]
    return load_files(files, errs)


def load_files(files: list[str], errs: Errors | None = None) -> Loaded:
    """Check and merge `files` in this order; raise PolicyError listing every problem."""
    errs = errs if errs is not None else Errors()
    errs.order = {f: i for i, f in enumerate(files)}
    # Each file is checked on its own, so every file's mistakes are reported even where a
    # later file overrides the key. Then the checked values merge by dotted key in file
    # order: schema mappings merge key by key, a later scalar or list (a leaf) replaces.
    vals: dict[str, tuple[Any, Node]] = {}
    bad: set[str] = set()
    contents: dict[str, bytes] = {}
    unreadable = False
    for file in files:
        data = read_bytes(file, errs)
        node = None if data is None else parse_bytes(file, data, errs)
        if node is None:
            unreadable = True
            continue
        contents[file] = data  # type: ignore[assignment]  # node is None when data is
        checked: dict[str, tuple[Any, Node]] = {}
        check_tree(node, SCHEMA, "", errs, checked, bad)
        vals.update(checked)
    policy = _build(vals, tuple(files))
    # With a whole file unreadable, what it would have set is unknown: cross-key checks on
    # the rest could only guess.
    if not unreadable:
        check_contradictions(vals, bad, policy, errs)
    if errs.items:
        raise PolicyError(errs.lines(), errs.details())
    return Loaded(policy, vals, tuple(files), contents)


def schema_targets() -> dict[str, str | None]:
    """Every schema leaf by dotted key -> the Policy attribute it fills (None: check only)."""
    return dict(_targets(SCHEMA, ""))


def default_policy_path(etc_dir: str = ETC_DIR) -> str:
    """/etc/pruned/policy.d, else /etc/pruned/policy.yaml, else the checkout's default."""
    for candidate, exists in (
        (os.path.join(etc_dir, "policy.d"), os.path.isdir),
        (os.path.join(etc_dir, "policy.yaml"), os.path.isfile),
    ):
        if exists(candidate):
            return candidate
    return str(REPO_DEFAULT)

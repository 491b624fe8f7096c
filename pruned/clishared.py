"""What every command of the CLI shares: its usage error, its one-line messages, the policy."""

from __future__ import annotations

import os
import sys

from pruned.model import Policy
from pruned.policy.load import default_policy_path, load_policy


class UsageError(Exception):
    """Bad command-line input that argparse itself cannot catch."""


def err(msg: str) -> None:
    print(f"pruned: {msg}", file=sys.stderr)


def note(msg: str) -> None:
    print(f"pruned: note: {msg}", file=sys.stderr)


def load(path: str | None) -> Policy:
    """Load the policy or raise PolicyError (main() prints it and exits 78)."""
    return load_policy(path or default_policy_path())


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise PermissionError(f"{what} needs root")

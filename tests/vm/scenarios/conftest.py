"""Session fixtures of the VM lane's scenarios (run inside the guest by guest/run-scenarios.sh)."""

from __future__ import annotations

import json

import pytest
import scene as scene_mod
from vmlib import RESULTS, Scan, pruned_scan


@pytest.fixture(scope="session")
def scene() -> scene_mod.Scene:
    """The node with every kind of process at once (scene.py); built once."""
    return scene_mod.build()


@pytest.fixture(scope="session")
def scan(scene: scene_mod.Scene) -> Scan:
    """One `pruned scan --json` of the scene, as a site admin would run it."""
    result = pruned_scan()
    (RESULTS / "scan.jsonl").write_text(
        "\n".join(json.dumps(r, sort_keys=True) for r in result.records.values()) + "\n")
    (RESULTS / "scan.stderr").write_text(result.stderr)
    return result

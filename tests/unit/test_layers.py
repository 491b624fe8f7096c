"""The layers of ARCHITECTURE.md, enforced by folder: nothing imports upward.

- `model`, `exitcodes`, `log`: the base; they import nothing of pruned.
- `rules/`: pure decisions; only `model` and `rules/`, and no stdlib module that does I/O.
- `linux/`: the kernel's interfaces; the base and `linux/`, never policy, jobs, rules or act.
- `policy/`, `jobs/`: read the world; the base, `linux/`, the pure `rules/`, themselves.
- `act/`: changes the world; everything above but policy and the top level.
- the top level (`sweep`, `service`, `cli`, ...): anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.fixtures.paths import REPO

BASE = {"model", "exitcodes", "log", "text", "__init__"}
ALLOWED = {
    "base": set(),
    "rules": {"model", "rules"},
    "linux": {"base", "linux"},
    "policy": {"base", "linux", "rules", "policy"},
    "jobs": {"base", "linux", "rules", "jobs"},
    "act": {"base", "linux", "rules", "jobs", "act"},
}
# What a pure module must not reach for: files, processes, sockets, clocks of the world.
IO_MODULES = {
    "os", "io", "subprocess", "socket", "ctypes", "pathlib", "shutil", "tempfile", "select",
    "signal", "glob", "pwd", "grp", "yaml", "time", "threading", "resource", "fcntl",
}  # fmt: skip


def layer_of(module: str) -> str:
    """'pruned.rules.trust' -> 'rules'; 'pruned.model' -> 'base'; 'pruned.sweep' -> 'top'."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in BASE:
        return "base"
    return parts[0] if parts[0] in ALLOWED else "top"


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in one file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names] if base in ("pruned", "") else []
            out += [(node.lineno, n) for n in names] or [(node.lineno, base)]
    return out


def violations(root: Path) -> list[str]:
    """Every import in the package at `root` that breaks the layering, as 'file:line: why'."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        mine = layer_of(module)
        for line, target in _imports(path, module):
            head = target.split(".")[0]
            where = f"{path.relative_to(root.parent)}:{line}"
            if head != root.name:
                if mine == "rules" and head in IO_MODULES:
                    out.append(f"{where}: rules/ imports {target}, which does I/O")
                continue
            theirs = layer_of(target)
            if mine == "top" or theirs == mine:
                continue
            sub = target.split(".")[1] if "." in target else ""
            allowed = ALLOWED[mine]
            ok = theirs in allowed or (mine == "rules" and sub == "model")
            if mine == "rules" and theirs == "base" and sub != "model":
                ok = False
            if not ok:
                out.append(f"{where}: {mine} module {module} imports {target} ({theirs})")
    return out


def test_pruned_keeps_its_layers() -> None:
    assert violations(REPO / "pruned") == []


def test_the_layers_have_their_folders() -> None:
    folders = {p.name for p in (REPO / "pruned").iterdir() if p.is_dir() and p.name[0] != "_"}
    assert folders == {"linux", "policy", "jobs", "rules", "act"}


def _tree(tmp: Path, files: dict[str, str]) -> Path:
    root = tmp / "pruned"
    for name, text in files.items():
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root


def test_an_upward_import_is_found(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "model.py": "",
            "sweep.py": "from pruned.rules import decide\n",
            "rules/__init__.py": "",
            "rules/decide.py": "from pruned.model import X\nfrom pruned.sweep import observe\n",
            "linux/__init__.py": "",
            "linux/procfs.py": "from pruned.jobs.slurm import read\nfrom pruned.model import P\n",
            "jobs/__init__.py": "",
            "jobs/slurm.py": "from pruned.act.kill import kill\n",
            "act/__init__.py": "",
            "act/kill.py": "from ..policy.load import load\nfrom pruned.linux import procfs\n",
        },
    )
    found = violations(root)
    assert found == [
        "pruned/act/kill.py:1: act module pruned.act.kill imports pruned.policy.load (policy)",
        "pruned/jobs/slurm.py:1: jobs module pruned.jobs.slurm imports pruned.act.kill (act)",
        "pruned/linux/procfs.py:1: linux module pruned.linux.procfs imports pruned.jobs.slurm"
        " (jobs)",
        "pruned/rules/decide.py:2: rules module pruned.rules.decide imports pruned.sweep (top)",
    ]


def test_rules_may_not_do_io_or_log(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {"rules/trust.py": "import os\nfrom pruned import log\nfrom pruned.exitcodes import X\n"},
    )
    assert violations(root) == [
        "pruned/rules/trust.py:1: rules/ imports os, which does I/O",
        "pruned/rules/trust.py:2: rules module pruned.rules.trust imports pruned.log (base)",
        "pruned/rules/trust.py:3: rules module pruned.rules.trust imports pruned.exitcodes (base)",
    ]

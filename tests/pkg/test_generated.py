"""The files the Debian package generates at build time (scripts/gen_manpages.py,
scripts/gen_completion.py): pruned-policy(5) names exactly the schema's keys and the build
fails when policies/README.md and the schema disagree; pruned(8) and the bash completion know
every command and option of the parser; groff and bash accept what was written.

Pure and quick (no root); the package itself is built and installed by tests/pkg/run.sh.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pruned.cli import build_parser
from pruned.policy.schema import SCHEMA
from tests.fixtures.paths import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gen_completion
import gen_manpages

C_UTF8 = dict(os.environ, LC_ALL="C.UTF-8")


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("man")
    assert gen_manpages.main(["--out", str(out)]) == 0
    return {p.name: p.read_text() for p in out.iterdir()}


def rendered(page: str) -> str:
    if not shutil.which("groff"):
        pytest.skip("groff is not installed")
    r = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou", "-rLL=200n"], input=page,
                       capture_output=True, text=True, check=True, env=C_UTF8)
    return r.stdout


def subcommands() -> dict[str, argparse.ArgumentParser]:
    return gen_completion.commands(build_parser())


def test_policy_page_names_every_schema_key(pages):
    text = rendered(pages["pruned-policy.5"])
    keys = [k for k, _ in gen_manpages.leaves(SCHEMA)]
    assert keys
    assert [k for k in keys if k not in text] == []


def test_an_undocumented_schema_key_fails_the_build(monkeypatch):
    rows = gen_manpages.key_rows((REPO / "policies" / "README.md").read_text())
    gen_manpages.check_keys(rows)  # as shipped: consistent
    fake = dict(SCHEMA, brand_new=SCHEMA["mode"])
    monkeypatch.setattr(gen_manpages, "SCHEMA", fake)
    with pytest.raises(gen_manpages.DocError, match="brand_new"):
        gen_manpages.check_keys(rows)


def test_a_row_for_a_key_the_schema_lacks_fails_the_build():
    rows = gen_manpages.key_rows((REPO / "policies" / "README.md").read_text())
    rows.append((["audit_fallback"], "path", "a name that never existed"))
    with pytest.raises(gen_manpages.DocError, match="audit_fallback"):
        gen_manpages.check_keys(rows)


def test_builtin_defaults_are_written_as_a_policy_would():
    specs = dict(gen_manpages.leaves(SCHEMA))
    from pruned.model import Policy

    p = Policy()
    assert gen_manpages.policy_value(p, specs["kill.grace"]) == "10s"
    assert gen_manpages.policy_value(p, specs["cleanup.min_age"]) == "1h"
    assert gen_manpages.policy_value(p, specs["mode"]) == "report"
    assert gen_manpages.policy_value(p, specs["system.uid_ranges"]) == '["60000-64999", "65534"]'
    assert gen_manpages.fmt_duration(90) == "1m30s"
    assert gen_manpages.fmt_duration(0.5) == "500ms"


def test_command_page_has_every_command_and_option(pages):
    text = rendered(pages["pruned.8"])
    missing = []
    for name, sp in subcommands().items():
        if name not in text:
            missing.append(name)
        for action in sp._actions:
            if not isinstance(action, argparse._HelpAction):
                missing += [o for o in action.option_strings if o not in text]
    assert missing == []
    for code in ("78", "EX_CONFIG", "77", "70"):
        assert code in text


@pytest.mark.parametrize("name", ["pruned.8", "pruned-policy.5"])
def test_groff_has_no_warnings(pages, name):
    if not shutil.which("groff"):
        pytest.skip("groff is not installed")
    r = subprocess.run(["groff", "-man", "-ww", "-z", "-Tutf8"], input=pages[name],
                       capture_output=True, text=True, env=C_UTF8)
    assert (r.returncode, r.stderr) == (0, "")


def test_completion_is_valid_bash_and_knows_every_option():
    script = gen_completion.render(build_parser())
    r = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (0, "")
    for name, sp in subcommands().items():
        assert f"        {name})" in script
        for action in sp._actions:
            for opt in action.option_strings:
                assert opt in script, (name, opt)


BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["pruned", "s"], {"scan", "sweep"}),
        (["pruned", "scan", "--cl"], {"--class"}),
        (["pruned", "scan", "--class", "st"], {"stray"}),
        (["pruned", "scan", "--class", "batch", "sy"], {"system"}),
        (["pruned", "sweep", "--uid", "roo"], {"root"}),
        (["pruned", "check-config", "/etc/host"], {"/etc/hostname", "/etc/hosts"}),
    ],
)
def test_completion_completes(tmp_path, words, expected):
    if not BASH_COMPLETION.exists():
        pytest.skip("bash-completion is not installed")
    comp = tmp_path / "pruned"
    comp.write_text(gen_completion.render(build_parser()))
    line = " ".join(words)
    prog = (
        f"source {BASH_COMPLETION}; source {comp}; "
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; "
        f"COMP_LINE={line!r}; COMP_POINT={len(line)}; "
        f"_pruned pruned {words[-1]!r} {words[-2]!r}; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    r = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, timeout=30)
    got = set(r.stdout.split())
    assert expected <= got, (r.stdout, r.stderr)

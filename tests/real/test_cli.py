"""The command line as a table: arguments -> exit code -> expected text. Never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.paths import REPO

BAD = REPO / "tests" / "policies_bad"
DEFAULT = str(REPO / "policies" / "default.yaml")


def run(*args: str, user: str | None = None, env: dict | None = None):
    argv = [sys.executable, "-m", "pruned.cli", *args]
    if user:
        argv = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, **(env or {})})


CASES = [
    # (args, exit code, text expected in stdout+stderr)
    (("check-config", DEFAULT), 0, "ok (mode report"),
    (("check-config", str(BAD / "01-duplicate-key.yaml")), 78, "01-duplicate-key.yaml:5: "
                                                              "actions.stray: duplicate key"),
    (("check-config", "/nonexistent/policy.yaml"), 78, "/nonexistent/policy.yaml"),
    (("scan", "--policy", str(BAD / "01-duplicate-key.yaml")), 78, "duplicate key"),
    (("sweep", "--once", "--policy", str(BAD / "01-duplicate-key.yaml")), 78, "duplicate key"),
    (("run", "--policy", str(BAD / "01-duplicate-key.yaml")), 78, "duplicate key"),
    (("scan", "--class", "nonsense"), 2, "invalid choice"),
    (("explain", "abc"), 2, "not a pid"),
    (("explain", "0"), 2, "not a pid"),
    (("explain", "4194304", "--policy", DEFAULT), 1, "no process 4194304"),
    (("sweep", "--uid", "no-such-user-xyz"), 2, "no such user"),
    (("frobnicate",), 2, "invalid choice"),
    ((), 2, "required"),
    (("epilog", "--policy", DEFAULT, "--dry-run"), 2, "no job id"),
    (("epilog", "--policy", DEFAULT, "--job", "5", "--dry-run"), 2, "no uid"),
    (("--version",), 0, "pruned 0.1.0"),
]


@pytest.mark.parametrize(("args", "code", "text"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_cli_table(args, code, text):
    r = run(*args, env={"SLURM_JOB_ID": "", "SLURM_JOB_UID": ""})
    out = r.stdout + r.stderr
    assert r.returncode == code, out
    assert text in out, out
    assert "Traceback" not in out


def test_every_bad_policy_exits_78_without_traceback():
    for path in sorted(BAD.glob("*.yaml")):
        r = run("check-config", str(path))
        assert r.returncode == 78, (path, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        for line in r.stderr.strip().splitlines():
            assert line.startswith(str(path)), line  # every error names the file


def test_scan_json_fields_and_class_filter():
    r = run("scan", "--json", "--class", "system", "--policy", DEFAULT)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert rows and all(x["class"] == "system" for x in rows)
    one = next(x for x in rows if x["pid"] == 1)
    for key in ("pid", "starttime", "ppid", "uid", "user", "comm", "class", "rule", "action",
                "job", "reason"):
        assert key in one


def test_explain_shows_the_chain_of_evidence():
    r = run("explain", str(os.getpid()), "--policy", DEFAULT)
    assert r.returncode == 0, r.stderr
    for text in ("ancestry (nearest first):", "cgroup (/proc/PID/cgroup):", "job lookup:",
                 "class: system", "rule: system.uid_rail", "action: ignore"):
        assert text in r.stdout, r.stdout


@pytest.mark.root
def test_non_root_says_what_it_could_not_read():
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to nobody")
    r = run("scan", "--policy", DEFAULT, user="nobody")
    assert r.returncode == 0, r.stderr
    assert "not readable" in r.stderr and "Traceback" not in r.stderr
    r = run("sweep", "--once", "--policy", str(REPO / "policies" / "slurm.yaml"), user="nobody")
    assert r.returncode == 77 and "needs root" in r.stderr, r.stderr


# ------------------------------------------------------------------ check-config for CM


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """/etc/pruned/policy.d as a site has it: the default, then the site's fragment."""
    d = tmp_path / "policy.d"
    d.mkdir()
    (d / "00-default.yaml").write_text((REPO / "policies" / "default.yaml").read_text())
    (d / "50-site.yaml").write_text("version: 1\nmode: enforce\nschedule:\n  sweep: 5m\n")
    (tmp_path / "source").write_text("version: 1\nkill:\n  grace: 2m\n")  # Ansible's %s
    (tmp_path / "bad").write_text("version: 1\nkill:\n  grace: 10m\n")
    (tmp_path / "30-new.yaml").write_text("version: 1\nmode: report\n")
    return d


DIR_CASES = [
    # (args with {d} = the policy.d dir, {t} = its parent; exit code; text in stdout+stderr)
    (("--dir", "{d}", "--as", "60-site.yaml", "{t}/source"), 0,
     "{t}/source as {d}/60-site.yaml: ok (mode enforce"),
    # The same fragment alone breaks grace < sweep: it is only valid in its directory.
    (("{t}/source",), 78, "{t}/source:3: kill.grace: kill.grace (120s, set at {t}/source:3) "
     "must be shorter than schedule.sweep (60s, the default)"),
    # Replacing 50-site.yaml takes its 5m sweep with it.
    (("--dir", "{d}", "--as", "50-site.yaml", "{t}/source"), 78,
     "{t}/source:3: kill.grace: kill.grace (120s, set at {t}/source:3) must be shorter than "
     "schedule.sweep (60s, set at {d}/00-default.yaml:"),
    (("--dir", "{d}", "--as", "60-site.yaml", "{t}/bad"), 78, "{t}/bad:3: kill.grace:"),
    # Its own name is used when it is a fragment name: 30-new sorts before 50-site.
    (("--dir", "{d}", "{t}/30-new.yaml"), 0, "ok (mode enforce"),
    (("--dir", "{d}", "{t}/source"), 2, "pass --as NAME"),
    (("--dir", "{d}", "--as", "../x.yaml", "{t}/source"), 2, "expected a fragment file name"),
    (("--dir", "{d}", "--as", "50-site.yml", "{t}/source"), 2, "expected a fragment file name"),
    (("--as", "50-site.yaml", "{t}/source"), 2, "pass --dir too"),
    (("--dir", "{t}/nope", "--as", "50-site.yaml", "{t}/source"), 78,
     "{t}/nope: not a directory"),
    (("--dir", "{d}"), 0, "{d}: ok (mode enforce"),
    (("--print", "{d}"), 0, "  sweep: 5m{pad}# {d}/50-site.yaml:4"),
    (("--print", "--dir", "{d}", "--as", "60-site.yaml", "{t}/source"), 0,
     "  grace: 2m{pad}# {t}/source:3"),
    (("--print", "{t}/source"), 78, "must be shorter than schedule.sweep"),
]


@pytest.mark.parametrize(("args", "code", "text"), DIR_CASES,
                         ids=[" ".join(c[0]) for c in DIR_CASES])
def test_check_config_dir_and_print_table(policy_dir: Path, args, code, text):
    fill = {"d": str(policy_dir), "t": str(policy_dir.parent)}
    r = run("check-config", *(a.format(**fill) for a in args))
    out = r.stdout + r.stderr
    assert r.returncode == code, out
    want = text.format(pad="", **fill)
    if "{pad}" in text:  # the origin comment is aligned: any run of spaces before it
        head, tail = (part.format(**fill) for part in text.split("{pad}"))
        assert any(ln.startswith(head) and ln.rstrip().endswith(tail.strip())
                   for ln in r.stdout.splitlines()), out
    else:
        assert want in out, out
    assert "Traceback" not in out


def test_check_config_json(policy_dir: Path):
    t = policy_dir.parent
    ok = run("check-config", "--json", "--dir", str(policy_dir), "--as", "60-site.yaml",
             str(t / "source"))
    assert ok.returncode == 0, ok.stderr
    obj = json.loads(ok.stdout)
    assert obj["ok"] is True and obj["errors"] == [] and obj["mode"] == "enforce"
    assert obj["files"] == [str(policy_dir / "00-default.yaml"),
                            str(policy_dir / "50-site.yaml"), str(t / "source")]
    assert obj["candidate"] == str(t / "source") and obj["as"] == "60-site.yaml"
    assert "values" not in obj

    bad = run("check-config", "--json", "--dir", str(policy_dir), "--as", "60-site.yaml",
              str(t / "bad"))
    assert bad.returncode == 78 and bad.stderr == "", bad.stderr
    obj = json.loads(bad.stdout)
    assert obj["ok"] is False
    [err] = obj["errors"]
    assert (err["file"], err["line"], err["key"]) == (str(t / "bad"), 3, "kill.grace")
    assert err["text"] == f"{err['file']}:3: kill.grace: {err['message']}"

    printed = run("check-config", "--json", "--print", str(policy_dir))
    assert printed.returncode == 0, printed.stderr
    values = json.loads(printed.stdout)["values"]
    assert values["schedule.sweep"] == {"value": 300.0, "file": str(policy_dir / "50-site.yaml"),
                                        "line": 4}
    assert values["min_age"]["value"] == 10.0
    assert values["epilog.drain_on_survivor"]["value"] is True

    every_bad = run("check-config", "--json", str(BAD / "49-many-errors.yaml"))
    assert every_bad.returncode == 78
    assert len(json.loads(every_bad.stdout)["errors"]) == 7


def test_print_output_is_a_policy_that_loads_to_the_same(policy_dir: Path, tmp_path: Path):
    r = run("check-config", "--print", str(policy_dir))
    assert r.returncode == 0, r.stderr
    (tmp_path / "effective.yaml").write_text(r.stdout)
    again = run("check-config", "--print", str(tmp_path / "effective.yaml"))
    assert again.returncode == 0, again.stderr
    strip = [ln.split("#")[0].rstrip() for ln in r.stdout.splitlines() if not ln.startswith("#")]
    strip2 = [ln.split("#")[0].rstrip() for ln in again.stdout.splitlines()
              if not ln.startswith("#")]
    assert strip == strip2


@pytest.mark.root
def test_check_config_keeps_the_last_good_policy(policy_dir: Path, last_good_store: Path):
    """As root, a valid policy becomes the last good one of its path (what pruned-epilog
    falls back to); a rejected one or a candidate does not replace it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from pruned.policy import lastgood

    r = run("check-config", str(policy_dir))
    assert r.returncode == 0 and "kept as the last good policy" in r.stderr, r.stderr
    saved = lastgood.current(str(policy_dir), str(last_good_store))
    assert saved is not None and saved.saved_by == "check-config"
    assert [os.path.basename(f) for f in saved.files] == ["00-default.yaml", "50-site.yaml"]
    r = run("check-config", str(policy_dir))  # unchanged: nothing written, nothing said
    assert r.returncode == 0 and "last good" not in r.stderr
    assert lastgood.current(str(policy_dir), str(last_good_store)).directory == saved.directory

    (policy_dir / "50-site.yaml").write_text("version: 1\nmode: enforcing\n")
    assert run("check-config", str(policy_dir)).returncode == 78
    r = run("check-config", "--dir", str(policy_dir), "--as", "60-x.yaml",
            str(policy_dir.parent / "30-new.yaml"))
    assert r.returncode == 78  # the directory itself is broken now
    assert lastgood.current(str(policy_dir), str(last_good_store)).directory == saved.directory
    # Without $PRUNED_LAST_GOOD_DIR only policies under /etc/pruned are kept.
    env = {k: v for k, v in os.environ.items() if k != lastgood.STORE_ENV}
    r = subprocess.run([sys.executable, "-m", "pruned.cli", "check-config", DEFAULT],
                       capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert r.returncode == 0 and "last good" not in r.stderr, r.stderr


def test_epilog_with_a_broken_policy_exits_0(tmp_path: Path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nmode: [\n")
    r = run("epilog", "--policy", str(broken), "--job", "4711", "--uid", "30001", "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"policy {broken} rejected: {broken}:" in r.stdout
    assert "no last good policy" in r.stdout and "doing nothing" in r.stdout


def test_reload_refuses_a_process_that_is_not_pruned():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    r = run("reload", "1")
    assert r.returncode == 2 and "not a running `pruned run` daemon" in r.stderr, r.stderr

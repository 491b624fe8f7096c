"""Policy loading: the malformed-policy corpus, shipped policies, merging, durations, facts."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
import yaml

from pruned.exitcodes import EX_CONFIG
from pruned.model import UID_RAIL, Action, CleanupPolicy, Policy, SystemPolicy, WhitelistPolicy
from pruned.policy import effective
from pruned.policy.facts import merge_ranges, parse_login_defs, resolve_facts, sys_uid_range
from pruned.policy.fields import parse_duration
from pruned.policy.load import (
    PolicyError,
    default_policy_path,
    load_path,
    load_policy,
    load_with_candidate,
    schema_targets,
)
from pruned.policy.yamltree import StrictLoader
from tests.fixtures.paths import REPO

TESTS = REPO / "tests"
BAD = TESTS / "policies_bad"
GOOD = TESTS / "policies_good"
SHIPPED = TESTS.parent / "policies"

# Each case is a *.yaml file or a directory in tests/policies_bad, with a sidecar
# <case>.expected: the exact error lines, `{file}` standing for the path that was loaded.
BAD_CASES = sorted(
    p for p in BAD.iterdir() if p.suffix == ".yaml" or (p.is_dir() and not p.name.startswith("_"))
)
ERROR_LINE = re.compile(r"^\S+?(:\d+)?: \S.*$")


def _expected(case: Path) -> list[str]:
    sidecar = case.parent / (case.name.removesuffix(".yaml") + ".expected")
    return sidecar.read_text().replace("{file}", str(case)).splitlines()


def _errors(path: Path | str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return info.value.errors


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------- the corpus


def test_corpus_is_big_enough_and_complete() -> None:
    assert len(BAD_CASES) >= 30
    for case in BAD_CASES:
        assert (case.parent / (case.name.removesuffix(".yaml") + ".expected")).is_file(), case


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda p: p.name)
def test_bad_policy_reports_exact_errors(case: Path) -> None:
    errors = _errors(case)
    assert errors == _expected(case)
    for line in errors:
        assert ERROR_LINE.match(line) and "\n" not in line, line
        assert "Traceback" not in line


def test_error_text_is_the_exception_message() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(BAD / "49-many-errors.yaml")
    assert str(info.value) == "\n".join(info.value.errors)
    assert len(info.value.errors) == 7  # every problem at once, not the first one
    assert EX_CONFIG == 78


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert _errors(missing) == [f"{missing}: cannot read: No such file or directory"]
    # A directory called *.yaml inside a policy directory cannot be read as a file.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "00-x.yaml").mkdir()
    assert _errors(tmp_path / "d") == [
        f"{tmp_path / 'd' / '00-x.yaml'}: cannot read: Is a directory"
    ]


def test_errors_sorted_by_file_order_then_line(tmp_path: Path) -> None:
    _write(tmp_path / "00-a.yaml", "version: 1\n\n\n\nevents: no\n")
    _write(tmp_path / "50-b.yaml", "version: 1\nmode: on\n")
    _write(tmp_path / "90-c.yaml", "version: 1\nkill:\n  grace: 1:30\nmin_age: 5x\n")
    assert _errors(tmp_path) == [
        f"{tmp_path}/00-a.yaml:5: events: expected true or false, got 'no' "
        "(YAML 1.1 boolean? write false)",
        f"{tmp_path}/50-b.yaml:2: mode: expected one of report, enforce; got 'on'",
        f"{tmp_path}/90-c.yaml:3: kill.grace: '1:30' is not a duration: clock notation is "
        "ambiguous (YAML 1.1 reads 1:30 as 90); write units, e.g. 90s, 1m30s or 1h30m",
        f"{tmp_path}/90-c.yaml:4: min_age: '5x' is not a duration: unknown unit 'x' "
        "(units: d, h, m, s, ms)",
    ]


def test_truncated_policies_never_traceback() -> None:
    """Any prefix of the default policy either loads or fails with PolicyError lines."""
    text = (SHIPPED / "default.yaml").read_text()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.yaml"
        for cut in range(0, len(text), 53):
            path.write_text(text[:cut])
            try:
                load_policy(path)
            except PolicyError as e:
                assert e.errors and all(ERROR_LINE.match(x) for x in e.errors), e.errors


def test_alias_bomb_is_an_error_not_a_hang(tmp_path: Path) -> None:
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
        f"*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
        for i in range(1, 9)
    ]
    errors = _errors(_write(tmp_path / "bomb.yaml", "\n".join(lines) + "\n"))
    assert any("too many values" in e for e in errors)


# ---------------------------------------------------------------- good policies


@pytest.mark.parametrize("name", sorted(p.name for p in SHIPPED.glob("*.yaml")))
def test_shipped_policy_loads(name: str) -> None:
    policy = load_policy(SHIPPED / name)
    assert policy.sources == (str(SHIPPED / name),)


def test_shipped_examples_say_what_they_promise() -> None:
    slurm = load_policy(SHIPPED / "slurm.yaml")
    assert (slurm.dry_run, slurm.stray_action, slurm.adopt_fallback) == (
        False,
        Action.ADOPT,
        Action.KILL,
    )
    pbs = load_policy(SHIPPED / "torque-pbs.yaml")
    assert pbs.job_sources == ("statedir",) and "/usr/sbin/pbs_mom" in pbs.batch_daemons
    glexec = load_policy(SHIPPED / "glexec-pool.yaml")
    assert glexec.job_sources == ("statedir",) and glexec.stray_action is Action.KILL
    assert not glexec.dry_run


def test_default_policy_is_the_model_default_and_safe() -> None:
    policy = load_policy(SHIPPED / "default.yaml")
    expected = dataclasses.replace(
        Policy(),
        cleanup=dataclasses.replace(CleanupPolicy(), job_container_base="/var/spool/slurm-jc"),
        sources=(str(SHIPPED / "default.yaml"),),
    )
    assert policy == expected
    assert policy.dry_run  # report mode out of the box


def test_default_policy_comments_every_setting() -> None:
    """Line-by-line documentation: each key has a comment on its line, above it (through
    sibling keys), or — for a section — right below it."""
    lines = (SHIPPED / "default.yaml").read_text().splitlines()
    key = re.compile(r"^(\s*)[a-z_]+:")
    for i, line in enumerate(lines):
        m = key.match(line)
        if not m or "#" in line:
            continue
        j = i - 1
        while j >= 0 and (s := key.match(lines[j])) and s.group(1) == m.group(1):
            j -= 1  # siblings share the comment block above them
        above = j >= 0 and lines[j].lstrip().startswith("#")
        below = line.rstrip().endswith(":") and lines[i + 1].lstrip().startswith("#")
        assert above or below, f"default.yaml:{i + 1} has no comment: {line}"


def test_version_only_gives_model_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.yaml", "version: 1\n")
    assert load_policy(path) == dataclasses.replace(Policy(), sources=(str(path),))


def test_every_field_is_settable_from_yaml() -> None:
    policy = load_policy(GOOD / "full.yaml")
    default = Policy()
    for f in dataclasses.fields(Policy):
        if f.name == "sources":
            continue
        got, base = getattr(policy, f.name), getattr(default, f.name)
        assert got != base, f.name
        if dataclasses.is_dataclass(base):
            for sub in dataclasses.fields(base):
                assert getattr(got, sub.name) != getattr(base, sub.name), f"{f.name}.{sub.name}"
    assert policy.system == SystemPolicy(
        login_defs=False,
        login_defs_path="/etc/login.defs.site",
        uid_ranges=((70000, 70999), (99, 99), (80000, 80001)),
        users=("munge", "slurm"),
    )
    assert policy.whitelist == WhitelistPolicy(
        users=("alice",), groups=("hpcadmin",), exe=("/opt/monitor/bin/agent",), sshd=False
    )
    assert (policy.kill_grace, policy.min_age, policy.jobs_interval) == (2.5, 90.0, 0.5)
    assert policy.stray_action is Action.ADOPT and policy.adopt_fallback is Action.IGNORE


def test_paths_are_normalised(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.yaml", "version: 1\njobs:\n  state_dir: /var//lib/./pruned/\n")
    assert load_policy(path).state_dir == "/var/lib/pruned"


def test_directory_merge_order(tmp_path: Path) -> None:
    _write(
        tmp_path / "00-default.yaml",
        "version: 1\nmode: enforce\nkill: {grace: 5s, brake: {max_uids: 7}}\n"
        "batch_daemons: [/a, /b]\nwhitelist: {users: [x], sshd: false}\n",
    )
    _write(
        tmp_path / "50-site.yaml",
        "version: 1\nkill: {grace: 3s}\nbatch_daemons: [/c]\nwhitelist: {users: [y]}\n",
    )
    # Lexical, not numeric: "9-late" sorts after "50-site" and wins.
    _write(tmp_path / "9-late.yaml", "version: 1\nkill: {grace: 2s}\n")
    # Ignored: not *.yaml, or a dot-file left by an editor.
    _write(tmp_path / "99-ignored.yml", "version: 1\nmode: report\n")
    _write(tmp_path / ".50-site.yaml.swp.yaml", "garbage: [\n")
    _write(tmp_path / "README", "not a policy\n")
    policy = load_policy(tmp_path)
    assert policy.dry_run is False
    assert policy.kill_grace == 2.0  # later file, key by key
    assert policy.brake_max_uids == 7  # untouched key of a merged mapping survives
    assert policy.batch_daemons == ("/c",)  # lists replace, never append
    assert policy.whitelist.users == ("y",) and policy.whitelist.sshd is False
    assert policy.sources == tuple(
        str(tmp_path / n) for n in ("00-default.yaml", "50-site.yaml", "9-late.yaml")
    )


def test_shipped_default_plus_site_overlay(tmp_path: Path) -> None:
    (tmp_path / "00-default.yaml").write_text((SHIPPED / "default.yaml").read_text())
    (tmp_path / "50-site.yaml").write_text((SHIPPED / "slurm.yaml").read_text())
    policy = load_policy(tmp_path)
    assert policy.stray_action is Action.ADOPT and not policy.dry_run
    assert policy.whitelist.groups == ("hpcadmin",)
    assert policy.cleanup.roots == ("/tmp", "/var/tmp", "/dev/shm")


def test_every_file_of_a_directory_needs_a_version(tmp_path: Path) -> None:
    _write(tmp_path / "00-a.yaml", "version: 1\n")
    _write(tmp_path / "50-b.yaml", "mode: enforce\n")
    assert _errors(tmp_path) == [
        f"{tmp_path}/50-b.yaml:1: version: required key missing (write 'version: 1' at the top)"
    ]


def test_default_policy_path(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    assert default_policy_path(str(etc)) == str(SHIPPED / "default.yaml")
    (etc / "policy.yaml").write_text("version: 1\n")
    assert default_policy_path(str(etc)) == str(etc / "policy.yaml")
    (etc / "policy.d").mkdir()
    assert default_policy_path(str(etc)) == str(etc / "policy.d")
    assert os.path.isfile(default_policy_path(str(tmp_path / "none")))


# ---------------------------------------------------------------- the strict loader


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("no", "no"),
        ("off", "off"),
        ("Yes", "Yes"),
        ("y", "y"),
        ("on", "on"),
        ("true", True),
        ("False", False),
        ("1:30", "1:30"),
        ("190:20:30", "190:20:30"),
        ("017", "017"),
        ("0o17", 15),
        ("0x1f", 31),
        ("12", 12),
        ("-3", -3),
        ("0", 0),
        ("1_000", "1_000"),
        ("1.5", 1.5),
        ("1e3", 1000.0),
        ("~", None),
        ("null", None),
        ("2024-01-01", "2024-01-01"),
        ("=", "="),
    ],
)
def test_strict_loader_uses_yaml12_core_scalars(text: str, value: object) -> None:
    assert yaml.load(f"k: {text}\n", Loader=StrictLoader) == {"k": value}


def test_strict_loader_rejects_duplicate_keys() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match=r"duplicate key 'a'.*line 1"):
        yaml.load("a: 1\nb: 2\na: 3\n", Loader=StrictLoader)


def test_strict_loader_does_not_change_pyyaml_defaults() -> None:
    assert yaml.safe_load("k: no") == {"k": False}  # other users of SafeLoader unaffected


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("1h 30m", 5400.0),
        ("0s", 0.0),
        (" 10s ", 10.0),
        ("2d3h4m5s6ms", 183845.006),
        ("10", 10.0),
        (10, 10.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1:30", "clock notation is ambiguous"),
        ("01:30:00", "clock notation is ambiguous"),
        ("10min", "unknown unit 'min'"),
        ("10 seconds", "unknown unit 'seconds'"),
        ("5", None),
        ("-5s", "cannot be negative"),
        (-1, "cannot be negative"),
        ("", "empty duration"),
        ("s", "not a duration"),
        ("30m1h", "largest to smallest"),
        ("1h1h", "largest to smallest"),
        ("1h30", "a number without a unit"),
        (True, "expected a duration"),
        (None, "expected a duration"),
        (float("inf"), "finite"),
        (float("nan"), "finite"),
    ],
)
def test_parse_duration_errors(text: object, message: str | None) -> None:
    if message is None:
        assert parse_duration(text) == 5.0  # a bare number is seconds
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_duration(text)


# ---------------------------------------------------------------- login.defs and facts


LOGIN_DEFS = """\
# comment SYS_UID_MIN 5
MAIL_DIR        /var/mail
UID_MIN                  1000
UID_MAX                 60000
#SYS_UID_MIN              100
SYS_UID_MAX              0x3e7
ENCRYPT_METHOD SHA512
"""


def test_parse_login_defs() -> None:
    defs = parse_login_defs(LOGIN_DEFS)
    assert defs["MAIL_DIR"] == "/var/mail" and defs["UID_MIN"] == "1000"
    assert defs["SYS_UID_MIN"] == "100"  # commented out: Debian default
    assert sys_uid_range(defs) == (100, 999)  # hex, as shadow's getdef reads it
    assert sys_uid_range(parse_login_defs("")) == (100, 999)
    assert sys_uid_range(parse_login_defs("SYS_UID_MIN 201\nSYS_UID_MAX 0777\n")) == (201, 511)
    assert sys_uid_range(parse_login_defs("SYS_UID_MIN 900\nSYS_UID_MAX 800\n")) == (100, 999)
    assert sys_uid_range(parse_login_defs("SYS_UID_MIN lots\n")) == (100, 999)


def test_merge_ranges() -> None:
    assert merge_ranges([(5, 9), (0, 3), (4, 4), (20, 30), (25, 26)]) == ((0, 9), (20, 30))
    assert merge_ranges([]) == ()


def test_resolve_facts_without_names(tmp_path: Path) -> None:
    defs = _write(tmp_path / "login.defs", "SYS_UID_MIN 150\nSYS_UID_MAX 400\n")
    policy = Policy(system=SystemPolicy(login_defs_path=str(defs), uid_ranges=((401, 500),)))
    facts = resolve_facts(policy)
    assert facts.system_ranges == ((0, UID_RAIL - 1), (150, 500))
    assert facts.is_system_uid(98) and not facts.is_system_uid(99) and facts.is_system_uid(500)
    assert facts.whitelist_uids == frozenset() and facts.missing == ()

    gone = Policy(
        system=SystemPolicy(login_defs_path=str(tmp_path / "none"), uid_ranges=()),
        whitelist=WhitelistPolicy(users=("nosuchuser-x1",), groups=("nosuchgrp-x1",)),
    )
    facts = resolve_facts(gone)
    assert facts.system_ranges == ((0, 98), (100, 999))  # login.defs unreadable: Debian defaults
    assert [m.split(" ")[0] for m in facts.missing] == ["file", "whitelist", "whitelist"]
    off = resolve_facts(Policy(system=SystemPolicy(login_defs=False, uid_ranges=())))
    assert off.system_ranges == ((0, 98),)  # the rail is always there


def test_overridden_mistakes_are_still_reported(tmp_path: Path) -> None:
    """A later file fixing a key does not hide the earlier file's error for it."""
    _write(tmp_path / "00-a.yaml", "version: 1\nkill:\n  grace: 5x\n")
    _write(tmp_path / "50-b.yaml", "version: 1\nkill:\n  grace: 5s\n")
    assert _errors(tmp_path) == [
        f"{tmp_path}/00-a.yaml:3: kill.grace: '5x' is not a duration: unknown unit 'x' "
        "(units: d, h, m, s, ms)"
    ]


# ---------------------------------------------------------------- a candidate in its directory


def _policy_dir(tmp_path: Path) -> Path:
    d = tmp_path / "policy.d"
    d.mkdir()
    _write(d / "00-default.yaml", "version: 1\nschedule:\n  sweep: 5m\n")
    _write(d / "50-site.yaml", "version: 1\nmode: enforce\nkill:\n  grace: 4s\n")
    return d


def test_candidate_valid_only_in_its_directory(tmp_path: Path) -> None:
    """The case Ansible's validate: needs: alone the fragment breaks a cross-key rule (grace
    2m against the default 1m sweep); with the directory's 5m sweep it is fine."""
    d = _policy_dir(tmp_path)
    cand = _write(tmp_path / "tmpXYZ", "version: 1\nkill:\n  grace: 2m\n")
    assert any("must be shorter than schedule.sweep" in e for e in _errors(cand))
    loaded = load_with_candidate(str(d), str(cand), "50-site.yaml")
    assert loaded.policy.kill_grace == 120.0 and loaded.policy.sweep_interval == 300.0
    # It replaced 50-site.yaml: that file's mode: enforce is gone with it.
    assert loaded.policy.dry_run is True
    assert loaded.files == (str(d / "00-default.yaml"), str(cand))
    assert loaded.values["kill.grace"][1].file == str(cand)
    assert loaded.values["schedule.sweep"][1].file == str(d / "00-default.yaml")
    assert (d / "50-site.yaml").read_text().startswith("version: 1\nmode: enforce")  # untouched


def test_candidate_joins_at_its_names_place(tmp_path: Path) -> None:
    d = _policy_dir(tmp_path)
    cand = _write(tmp_path / "c.yaml", "version: 1\nmode: report\nkill:\n  grace: 7s\n")
    early = load_with_candidate(str(d), str(cand), "30-early.yaml")  # before 50-site
    assert early.files == (str(d / "00-default.yaml"), str(cand), str(d / "50-site.yaml"))
    assert early.policy.kill_grace == 4.0 and early.policy.dry_run is False  # 50-site wins
    late = load_with_candidate(str(d), str(cand), "90-late.yaml")  # after it
    assert late.policy.kill_grace == 7.0 and late.policy.dry_run is True


def test_candidate_errors_name_the_candidate(tmp_path: Path) -> None:
    d = _policy_dir(tmp_path)
    cand = _write(tmp_path / "source", "version: 1\nkill:\n  grace: 10m\n")
    with pytest.raises(PolicyError) as info:
        load_with_candidate(str(d), str(cand), "50-site.yaml")
    assert info.value.errors == [
        f"{cand}:3: kill.grace: kill.grace (600s, set at {cand}:3) must be shorter than "
        f"schedule.sweep (300s, set at {d}/00-default.yaml:3): a kill must finish before the "
        "next sweep"
    ]
    assert info.value.details == [
        {"file": str(cand), "line": 3, "key": "kill.grace", "text": info.value.errors[0],
         "message": info.value.errors[0].split("kill.grace: ", 1)[1]}
    ]


def test_candidate_in_an_empty_or_missing_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    cand = _write(tmp_path / "c", "version: 1\n")
    assert load_with_candidate(str(tmp_path / "empty"), str(cand), "00-x.yaml").files == (
        str(cand),
    )
    with pytest.raises(PolicyError) as info:
        load_with_candidate(str(tmp_path / "nope"), str(cand), "00-x.yaml")
    assert info.value.errors == [
        f"{tmp_path / 'nope'}: not a directory (--dir takes a policy.d directory)"
    ]


def test_load_path_keeps_the_bytes_it_validated(tmp_path: Path) -> None:
    d = _policy_dir(tmp_path)
    loaded = load_path(d)
    assert loaded.contents == {str(f): f.read_bytes() for f in sorted(d.iterdir())}
    assert load_policy(d) == loaded.policy


# ---------------------------------------------------------------- the effective policy


def test_print_shows_every_key_with_its_origin_and_loads_back(tmp_path: Path) -> None:
    d = _policy_dir(tmp_path)
    loaded = load_path(d)
    by_key = {e.key: e for e in effective.entries(loaded)}
    assert set(by_key) == set(schema_targets())
    assert by_key["kill.grace"].origin == f"{d}/50-site.yaml:4"
    assert by_key["mode"].value == "enforce" and by_key["mode"].line == 2
    assert by_key["schedule.sweep"].yaml == "5m"
    assert by_key["min_age"].origin == "(default)" and by_key["min_age"].value == 10.0
    assert by_key["system.uid_ranges"].value == ["60000-64999", "65534"]
    assert by_key["actions.system"].value == "ignore"
    text = effective.render_yaml(loaded, "test")
    assert "grace: 4s" in text and f"# {d}/50-site.yaml:4" in text
    out = _write(tmp_path / "effective.yaml", text)
    assert dataclasses.replace(load_policy(out), sources=()) == dataclasses.replace(
        loaded.policy, sources=()
    )
    as_json = effective.as_json(loaded)
    assert as_json["kill.grace"] == {"value": 4.0, "file": f"{d}/50-site.yaml", "line": 4}
    assert as_json["cleanup.job_container_base"] == {"value": None, "file": None, "line": None}


@pytest.mark.parametrize("name", [*sorted(p.name for p in SHIPPED.glob("*.yaml")), "full"])
def test_print_of_every_shipped_policy_loads_back(tmp_path: Path, name: str) -> None:
    path = GOOD / "full.yaml" if name == "full" else SHIPPED / name
    loaded = load_path(path)
    out = _write(tmp_path / "effective.yaml", effective.render_yaml(loaded, name))
    assert dataclasses.replace(load_policy(out), sources=()) == dataclasses.replace(
        loaded.policy, sources=()
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (10, "10s"), (90, "1m30s"), (5400, "1h30m"), (0.5, "500ms"), (2.5, "2s500ms"),
     (172800, "2d"), (3601.001, "1h1s1ms")],
)
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert effective.format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


# ---------------------------------------------------------------- hostile sizes (fuzz finds)


def test_deep_nesting_is_an_error_not_a_recursion_error(tmp_path: Path) -> None:
    deep = _write(tmp_path / "deep.yaml", "version: 1\nmin_age: " + "[" * 5000 + "\n")
    assert _errors(deep) == [f"{deep}: YAML nested too deeply (a policy needs at most 64 levels)"]
    medium = _write(tmp_path / "medium.yaml", "version: 1\nmin_age: " + "[" * 80 + "]" * 80 + "\n")
    assert f"{medium}:2: min_age" + "[0]" * 63 + ": nested more than 64 levels deep" in (
        _errors(medium)
    )


def test_huge_numbers_are_errors(tmp_path: Path) -> None:
    uids = _write(tmp_path / "u.yaml", f'version: 1\nsystem:\n  uid_ranges: ["{"1" * 5000}"]\n')
    [err] = _errors(uids)
    assert err.startswith(f"{uids}:3: system.uid_ranges[0]: uids end at 4294967294, got")
    sweep = _write(tmp_path / "s.yaml", f"version: 1\nschedule:\n  sweep: {'9' * 400}s\n")
    [err] = _errors(sweep)
    assert err.endswith("... is too long a duration (at most 366d)")
    assert parse_duration("366d") == 366 * 86400
    with pytest.raises(ValueError, match="too long a duration"):
        parse_duration("367d")

"""doctor's pure parsers and judges (the real-file tests are tests/real/test_doctor.py)."""

from __future__ import annotations

from pruned.doctor import (
    Finding,
    Level,
    PamLine,
    exit_status,
    judge_journald,
    judge_pam_systemd,
    parse_pam,
    parse_slurm_conf,
)


def test_parse_pam_rules_includes_and_brackets() -> None:
    text = ("# comment\n@include common-auth\n"
            "auth [success=1 default=ignore]\tpam_unix.so nullok\n"
            "-session optional pam_systemd.so # trailing\nsession  substack  other\nbogus\n")
    assert parse_pam(text) == [
        (2, "@include", "", "common-auth"),
        (3, "auth", "[success=1 default=ignore]", "pam_unix.so"),
        (4, "session", "optional", "pam_systemd.so"),
        (5, "session", "substack", "other"),
    ]


def test_parse_slurm_conf_keys_includes_and_node_lines() -> None:
    text = ("ProctrackType=proctrack/cgroup # x\nINCLUDE\t/etc/slurm/more.conf\n"
            "NodeName=n1 PrologFlags=ignored\nprologflags=Contain TaskPlugin=task/cgroup\n")
    assert parse_slurm_conf(text) == [
        (1, "proctracktype", "proctrack/cgroup"),
        (2, "include", "/etc/slurm/more.conf"),
        (4, "prologflags", "Contain"),
        (4, "taskplugin", "task/cgroup"),
    ]


def test_pam_systemd_only_in_the_session_stack() -> None:
    rules = [PamLine("/etc/pam.d/sshd", 3, "account", "pam_systemd.so"),
             PamLine("/etc/pam.d/sshd", 4, "session", "/lib/security/pam_systemd.so")]
    got = judge_pam_systemd(rules, [])
    assert [f.fix.split(";")[0] for f in got] == ["comment out /etc/pam.d/sshd:4"]


def test_exit_status_and_journald() -> None:
    warn = Finding(Level.WARNING, "x", "w", "f")
    err = Finding(Level.ERROR, "x", "e", "f")
    assert exit_status([], False) == 0 and exit_status([warn], False) == 0
    assert exit_status([warn], True) == 1 and exit_status([err], False) == 1
    assert judge_journald(True, None) == []
    assert "/x/audit.jsonl" in judge_journald(False, "/x/audit.jsonl")[0].what
    assert warn.line() == "WARNING x: w — fix: f"

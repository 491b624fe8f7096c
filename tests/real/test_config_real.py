"""Policy loading: the malformed-policy corpus, shipped policies, merging, durations, facts."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from pruned.model import Policy, SystemPolicy, WhitelistPolicy
from pruned.policy.facts import NodeFacts, resolve_facts
from pruned.policy.load import load_policy
from tests.unit.test_config import _write


@pytest.mark.root
def test_resolve_facts_with_real_users(make_user, tmp_path: Path) -> None:
    member, by_primary, service, outsider = (make_user("prc") for _ in range(4))
    group = f"prg{secrets.token_hex(3)}"
    subprocess.run(["groupadd", group], check=True)
    try:
        subprocess.run(["usermod", "-aG", group, member.name], check=True)
        defs = _write(tmp_path / "login.defs", "SYS_UID_MAX 999\n")
        policy = Policy(
            system=SystemPolicy(login_defs_path=str(defs), users=(service.name, "nosuchsvc-q")),
            # by_primary's user-private group has its own name: a primary-gid member.
            whitelist=WhitelistPolicy(groups=(group, by_primary.name)),
        )
        facts = resolve_facts(policy)
        assert isinstance(facts, NodeFacts)
        assert facts.whitelist_uids == {member.uid, by_primary.uid}
        assert outsider.uid not in facts.whitelist_uids
        assert facts.is_system_uid(service.uid) and not facts.is_system_uid(member.uid)
        assert (service.uid, service.uid) in facts.system_ranges
        assert facts.missing == ("system user 'nosuchsvc-q'",)
    finally:
        subprocess.run(["groupdel", group], capture_output=True)


@pytest.mark.root
def test_whitelisted_user_in_policy_file_resolves(make_user, tmp_path: Path) -> None:
    user = make_user("prw")
    path = _write(tmp_path / "p.yaml", f"version: 1\nwhitelist:\n  users: [{user.name}]\n")
    assert resolve_facts(load_policy(path)).whitelist_uids == {user.uid}



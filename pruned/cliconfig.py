"""`pruned check-config` and `pruned reload`: the commands configuration management runs."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from pruned.clishared import UsageError, err, need_root, note
from pruned.exitcodes import EX_CONFIG, EX_FAILED, EX_OK
from pruned.policy.facts import resolve_facts
from pruned.policy.load import PolicyError, default_policy_path


def _candidate_name(args: argparse.Namespace) -> str:
    """The name the candidate is merged as in --dir: --as, else its own name if a fragment's."""
    from pruned.policy.yamltree import is_fragment_name

    if args.as_name is not None:
        if not is_fragment_name(args.as_name):
            raise UsageError(f"--as {args.as_name!r}: expected a fragment file name like "
                             "50-site.yaml (ends in .yaml, no '/', not a dot-file)")
        return args.as_name
    name = os.path.basename(args.path)
    if not is_fragment_name(name):
        raise UsageError(
            f"cannot tell which fragment of {args.dir} the candidate {args.path} is: its name "
            f"is not *.yaml; pass --as NAME, the name it will have there (Ansible's %s is a "
            "temporary file: validate: pruned check-config --dir DIR --as 50-site.yaml %s)")
    return name


def _keep_last_good(path: str, loaded) -> str:
    """Keep a validated policy as the last good one of its path; what happened, one line."""
    from pruned.policy import lastgood
    from pruned.policy.load import ETC_DIR

    if os.geteuid() != 0:
        return "not kept as the last good policy (only root keeps it)"
    if not lastgood.keeps(path):
        return f"not kept as the last good policy (not under {ETC_DIR})"
    try:
        saved = lastgood.save(path, loaded.contents, saved_by="check-config")
    except (OSError, lastgood.LastGoodError) as e:
        why = getattr(e, "strerror", None) or str(e)
        return f"could not keep it as the last good policy: {why}"
    if saved is None:
        return "unchanged since it was last kept as the last good policy"
    return f"kept as the last good policy of {saved.policy_path} in {saved.directory}"


def cmd_check_config(args: argparse.Namespace) -> int:
    from pruned.policy import effective
    from pruned.policy.load import load_path, load_with_candidate

    if args.as_name is not None and args.dir is None:
        raise UsageError("--as names the candidate's place in --dir DIR: pass --dir too")
    candidate = name = None
    if args.dir is not None and args.path is not None:
        candidate, name = args.path, _candidate_name(args)
        label = f"{candidate} as {os.path.join(args.dir, name)}"
        path = args.dir
    else:
        path = args.dir or args.path or default_policy_path()
        label = path
    report: dict = {"path": path, "dir": args.dir, "candidate": candidate, "as": name}
    try:
        loaded = (load_with_candidate(args.dir, candidate, name) if candidate
                  else load_path(path))
    except PolicyError as e:
        if not args.json:
            raise
        print(json.dumps({"ok": False, **report, "errors": e.details}, sort_keys=True))
        return EX_CONFIG
    policy = loaded.policy
    notes = [f"{m} does not exist on this node" for m in resolve_facts(policy).missing]
    # A candidate is not in force yet (Ansible moves it in place only after validate:), so
    # only a policy validated where it lives becomes the epilog's fallback.
    kept = (f"not kept as the last good policy (a candidate is not in {args.dir} yet)"
            if candidate else _keep_last_good(path, loaded))
    mode = "report" if policy.dry_run else "enforce"
    if args.json:
        out = {"ok": True, **report, "files": list(loaded.files), "mode": mode,
               "stray_action": policy.stray_action.value, "notes": notes, "last_good": kept,
               "errors": []}
        if args.print:
            out["values"] = effective.as_json(loaded)
        print(json.dumps(out, sort_keys=True))
        return EX_OK
    for line in notes:
        note(line)
    if args.print:
        print(effective.render_yaml(loaded, f"effective policy of {label}: "
                                    + ", ".join(loaded.files)), end="")
    else:
        shown = "report (dry-run)" if policy.dry_run else "enforce"
        print(f"{label}: ok (mode {shown}, strays: {policy.stray_action.value}, "
              f"files: {', '.join(policy.sources)})")
    if not kept.startswith(("unchanged", "not kept")):
        note(kept)
    return EX_OK


def cmd_reload(args: argparse.Namespace) -> int:
    """SIGHUP the daemon and wait for its verdict: 0 applied, 78 rejected (errors on stderr),
    1 no answer. The unit's ExecReload=, so that `systemctl reload pruned` tells the truth."""
    from pruned.service import is_pruned_daemon, read_reload_status

    need_root("reload")
    pid = args.pid
    if not is_pruned_daemon(pid):
        raise UsageError(f"process {pid} is not a running `pruned run` daemon")
    before = read_reload_status(pid)
    seen = before["generation"] if before else -1
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + args.timeout
    while True:
        status = read_reload_status(pid)
        if status is not None and status["generation"] > seen:
            break
        if not is_pruned_daemon(pid):
            err(f"pruned {pid} exited during the reload")
            return EX_FAILED
        if time.monotonic() > deadline:
            err(f"no answer from pruned {pid} within {args.timeout:g}s: the reload may or may "
                 "not have been applied (journalctl -t pruned says)")
            return EX_FAILED
        time.sleep(0.05)
    if status.get("ok"):
        print(f"pruned: {status.get('policy')} reloaded (mode {status.get('mode')})")
        return EX_OK
    for line in status.get("errors") or ():
        print(line, file=sys.stderr)
    err(f"policy {status.get('policy')} rejected; pruned {pid} keeps running with the last "
         "good one")
    return EX_CONFIG

"""Command line: scan, explain, check-config, doctor, sweep, clean, run, prolog, epilog.

Every command turns bad input into one line on stderr and a documented exit code
(pruned.exitcodes); a traceback is a bug, shown only with PRUNED_DEBUG=1.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import signal
import sys
import time
import traceback
from collections.abc import Sequence

from pruned import __version__, text
from pruned.cliconfig import cmd_check_config, cmd_reload
from pruned.clishared import UsageError, load
from pruned.clishared import err as _err
from pruned.clishared import need_root as _need_root
from pruned.clishared import note as _note
from pruned.exitcodes import EX_CONFIG, EX_FAILED, EX_NOPERM, EX_OK, EX_SOFTWARE, EX_USAGE
from pruned.linux.users import user_label, user_name
from pruned.model import Action, Decision, Policy, ProcClass
from pruned.policy.facts import resolve_facts
from pruned.policy.load import PolicyError, default_policy_path
from pruned.rules.classify import ancestry


def _uid_arg(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such user or uid: {text!r}") from None


def _pid_arg(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"not a pid: {text!r}")
    return int(text)


# ---------------------------------------------------------------- scan / explain


def _action_text(d: Decision) -> str:
    if d.action is Action.IGNORE:
        return "-"
    text = d.action.value + (f"->{d.target_job}" if d.target_job else "")
    return f"({text})" if d.held else text


def decision_json(d: Decision, snap) -> dict:
    """One scan row as JSON values; names and paths escaped as in the audit (pruned.text)."""
    p, v = d.proc, d.verdict
    row = {
        "pid": p.pid,
        "starttime": p.starttime,
        "ppid": p.ppid,
        "uid": p.uid,
        "user": user_name(p.uid),
        "comm": p.comm,
        "state": p.state,
        "exe": p.exe,
        "class": v.cls.value,
        "rule": v.rule,
        "action": d.action.value,
        "target_job": d.target_job,
        "held": d.held,
        "job": v.job_id,
        "reason": v.reason if d.action is Action.IGNORE else f"{v.reason}; {d.reason}",
        "evidence": [text.printable(e) for e in v.evidence],
        "age": round(snap.age(p), 1),
    }
    return {k: text.printable(x) if isinstance(x, str) else x for k, x in row.items()}


def _print_notes(obs) -> None:
    for line in obs.snap.unreadable:
        _note(line)
    if obs.snap.vanished:
        _note(f"{obs.snap.vanished} processes exited while /proc was read")
    for line in obs.jobs.problems:
        _note(f"job source: {line} (a sweep now would be report-only)")
    if obs.plan.brake:
        _note(obs.plan.brake)


def cmd_scan(args: argparse.Namespace) -> int:
    from pruned.sweep import observe

    policy = load(args.policy)
    obs = observe(policy, resolve_facts(policy))
    wanted = set(args.classes or [])
    rows = [d for d in obs.plan.decisions if not wanted or d.verdict.cls.value in wanted]
    if args.json:
        for d in rows:
            print(json.dumps(decision_json(d, obs.snap), sort_keys=True))
    else:
        print(f"{'PID':>7} {'PPID':>7} {'USER':<12} {'CLASS':<11} {'ACTION':<12} {'JOB':<8} "
              f"{'COMM':<16} REASON")
        for d in rows:
            p, v = d.proc, d.verdict
            reason = v.reason if d.action is Action.IGNORE else f"{v.reason}; {d.reason}"
            if d.held:
                reason += f" [held: {d.held}]"
            print(text.printable(
                f"{p.pid:>7} {p.ppid:>7} {user_label(p.uid)[:12]:<12} {v.cls.value:<11} "
                f"{_action_text(d)[:12]:<12} {(v.job_id or '-')[:8]:<8} {p.comm[:16]:<16} "
                f"{reason}"
            ))  # a comm or path may hold control characters: never raw to a terminal
        mode = "report (dry-run)" if policy.dry_run else "enforce"
        counts = ", ".join(
            f"{n} {c}"
            for c, n in sorted(
                {c.value: sum(1 for d in obs.plan.decisions if d.verdict.cls is c)
                 for c in ProcClass}.items()
            )
        )
        print(f"# {len(obs.plan.decisions)} processes: {counts}; policy mode {mode}; "
              f"policy {', '.join(policy.sources)}")
    _print_notes(obs)
    return EX_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from pruned.linux import procfs
    from pruned.sweep import observe

    policy = load(args.policy)
    obs = observe(policy, resolve_facts(policy))
    pid = args.pid
    if pid not in obs.snap.procs:
        _err(f"no process {pid} (it may have exited)")
        return EX_FAILED
    d = next(d for d in obs.plan.decisions if d.proc.pid == pid)
    p, v = d.proc, d.verdict
    full = procfs.read_proc(pid)
    out: list[str] = []
    start = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(obs.snap.start_epoch(p)))
    out.append(f"process {pid} ({p.comm}) uid {p.uid} ({user_label(p.uid)}), state {p.state}, "
               f"started {start}, starttime {p.starttime} ticks")
    if full is not None:
        out.append(f"  exe: {full.exe or '(unreadable)'}; real uid {full.uid}, effective "
                   f"uid {full.euid}")
    out.append("ancestry (nearest first):")
    for a in ancestry(pid, obs.snap.procs):
        mark = "  <- decided" if v.decider == a.pid else ""
        out.append(f"  {a.pid:>7} ppid {a.ppid:<7} uid {a.uid:<6} {a.comm!r:<18} "
                   f"exe={a.exe or '-'}{mark}")
    out.append("cgroup (/proc/PID/cgroup):")
    for line in (full.cgroups if full else ()) or ("(unreadable or gone)",):
        out.append(f"  {line}")
    m = obs.jobs.membership.get(pid)
    out.append("job lookup:")
    if m is not None:
        job = obs.jobs.job(m.job_id)
        state = "unknown" if job is None else ("running" if job.running
                                              else f"not running: {job.why_not_running}")
        out.append(f"  member of job {m.job_id} step {m.step or '-'} via {m.cgroup}: {state}")
    else:
        out.append("  not in any job cgroup")
    running = obs.jobs.running_for(p.uid)
    newest = obs.jobs.newest_for(p.uid)
    if running:
        ids = ", ".join(j.job_id + (" (newest)" if j is newest else "") for j in running)
        out.append(f"  uid {p.uid} has running jobs on this node: {ids}")
    else:
        out.append(f"  uid {p.uid} has no running job on this node")
    for line in obs.jobs.problems:
        out.append(f"  job source problem: {line}")
    out.append(f"class: {v.cls.value}   rule: {v.rule}")
    out.append(f"reason: {v.reason}")
    for e in v.evidence:
        out.append(f"  evidence: {e}")
    act = d.action.value + (f" into job {d.target_job}" if d.target_job else "")
    out.append(f"action: {act} — {d.reason}")
    if d.held:
        out.append(f"held: {d.held}")
    mode = "dry-run (policy mode report)" if policy.dry_run else "enforce"
    out.append(f"policy: {', '.join(policy.sources)} ({mode})")
    print("\n".join(text.printable(line) for line in out))  # no raw control characters
    return EX_OK


# ---------------------------------------------------------------- acting commands


def _sink(policy: Policy):
    from pruned.act.audit import default_fallback_path, make_sink

    return make_sink(policy.audit_fallback or default_fallback_path())


def _loop(interval: float, once: bool, fn) -> int:
    """Run fn once, or every interval seconds until SIGINT/SIGTERM; exit code of the last run."""
    stop = {"now": False}

    def on_signal(_signo, _frame) -> None:
        stop["now"] = True

    if not once:
        signal.signal(signal.SIGTERM, on_signal)
    rc = fn()
    while not once and not stop["now"]:
        deadline = time.monotonic() + interval
        while not stop["now"] and time.monotonic() < deadline:
            time.sleep(min(0.5, deadline - time.monotonic()))
        if not stop["now"]:
            rc = fn()
    return rc


def cmd_sweep(args: argparse.Namespace) -> int:
    from pruned.sweep import run_sweep

    policy = load(args.policy)
    dry = True if args.dry_run else None
    if dry is None and not policy.dry_run:
        _need_root("an enforcing sweep")
    from pruned.act.adopt import AdoptFailures
    from pruned.lineage import LineageMemory

    sink = _sink(policy)
    uids = set(args.uids) if args.uids else None
    # Without --once, one memory for the whole loop, as the daemon keeps it.
    lineage, failures = LineageMemory(), AdoptFailures()

    def once() -> int:
        report = run_sweep(policy, resolve_facts(policy), sink, dry_run=dry, uids=uids,
                           lineage=lineage, adopt_failures=failures)
        for o in report.outcomes:
            d = o.decision
            print(f"{o.result.value:<7} {d.action.value:<6} pid {d.proc.pid} "
                  f"({d.proc.comm}, uid {d.proc.uid} {user_label(d.proc.uid)}) "
                  f"{d.verdict.rule}" + (f" -> job {d.target_job}" if d.target_job else "")
                  + f": {o.detail}")
        print(report.summary())
        _print_notes(report.observation)
        return EX_FAILED if report.failed else EX_OK

    return _loop(policy.sweep_interval, args.once, once)


def cmd_clean(args: argparse.Namespace) -> int:
    from pruned.filesweep import run_clean

    policy = load(args.policy)
    dry = True if args.dry_run else None
    if not (dry or policy.dry_run):
        _need_root("an enforcing clean")
    sink = _sink(policy)

    def once() -> int:
        report = run_clean(policy, resolve_facts(policy), sink, dry_run=dry)
        for line in report.lines():
            print(line)
        return EX_FAILED if report.failed else EX_OK

    return _loop(policy.clean_interval, args.once, once)


def cmd_run(args: argparse.Namespace) -> int:
    from pruned.service import run_daemon

    _need_root("the daemon")
    return run_daemon(args.policy or default_policy_path(), uids=args.uids)


def _job_args(args: argparse.Namespace) -> tuple[str, int, str | None]:
    job = args.job or os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID")
    uid_text = args.uid if args.uid is not None else (os.environ.get("SLURM_JOB_UID") or None)
    user = args.user or os.environ.get("SLURM_JOB_USER")
    if not job:
        raise UsageError("no job id: pass --job or set SLURM_JOB_ID")
    if uid_text is None and user:
        uid_text = user
    if uid_text is None:
        raise UsageError("no uid: pass --uid or set SLURM_JOB_UID")
    try:
        uid = _uid_arg(str(uid_text))
    except argparse.ArgumentTypeError as e:
        raise UsageError(str(e)) from None
    return job, uid, user or user_name(uid)


def cmd_prolog(args: argparse.Namespace) -> int:
    from pruned.epilog import prolog_command

    job, uid, user = _job_args(args)
    return prolog_command(args.policy or default_policy_path(), job, uid, user,
                          need_root=_need_root)


def cmd_epilog(args: argparse.Namespace) -> int:
    """Never 78 or 70: Slurm drains the node on any non-zero Epilog exit (pruned.epilog)."""
    job, uid, user = _job_args(args)
    try:
        from pruned.epilog import epilog_command
    except Exception as e:  # a broken install must not drain every node either
        _err(f"epilog of job {job}: internal error: {type(e).__name__}: {e}; exiting 0 so "
             "Slurm does not drain the node")
        return EX_OK
    return epilog_command(args.policy or default_policy_path(), job, uid, user,
                          dry_run=args.dry_run, need_root=_need_root)


def _doctor(args: argparse.Namespace) -> int:
    from pruned.doctor import cmd_doctor

    if not os.path.isdir(args.root):
        raise UsageError(f"--root {args.root}: not a directory")
    return cmd_doctor(args)


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pruned",
        description="Keep batch compute nodes clean of the processes and files jobs leave behind.",
    )
    p.add_argument("--version", action="version", version=f"pruned {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def policy_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--policy", metavar="PATH",
                        help="policy file or directory (default: /etc/pruned/policy.d, "
                             "/etc/pruned/policy.yaml, or the checkout's policies/default.yaml)")

    sp = sub.add_parser("scan", help="classify every process and show what a sweep would do")
    policy_opt(sp)
    sp.add_argument("--json", action="store_true", help="one JSON object per line")
    sp.add_argument("--class", dest="classes", nargs="+", action="extend", metavar="CLASS",
                    choices=[c.value for c in ProcClass], help="only these classes")
    sp.set_defaults(fn=cmd_scan)

    sp = sub.add_parser("explain", help="the chain of evidence behind one process's class")
    sp.add_argument("pid", type=_pid_arg)
    policy_opt(sp)
    sp.set_defaults(fn=cmd_explain)

    sp = sub.add_parser(
        "check-config",
        help="validate a policy (exit 78 when invalid)",
        description="Validate a policy file or directory (default: the node's policy): exit 0 "
        "when valid, 78 with every error as file:line: key: message. Run as root, a valid "
        "policy under /etc/pruned is kept as the last good one of its path, which "
        "pruned-epilog falls back to when the policy is broken.",
    )
    sp.add_argument("path", nargs="?", metavar="PATH|CANDIDATE",
                    help="the policy to check; with --dir, a candidate fragment for DIR")
    sp.add_argument("--dir", metavar="DIR",
                    help="check CANDIDATE as one fragment of this policy.d directory: it "
                    "replaces the file of its name there, or joins at that name's place in the "
                    "lexical merge order (nothing is written)")
    sp.add_argument("--as", dest="as_name", metavar="NAME",
                    help="the candidate's file name in DIR (e.g. 50-site.yaml); needed when "
                    "CANDIDATE is a temporary file, as with Ansible's validate: %%s")
    sp.add_argument("--print", action="store_true",
                    help="print the merged effective policy, each value with the file:line "
                    "that set it (or (default))")
    sp.add_argument("--json", action="store_true",
                    help="one JSON object on stdout: ok, files, errors (file, line, key, "
                    "message), with --print the values")
    sp.set_defaults(fn=cmd_check_config)

    sp = sub.add_parser(
        "doctor",
        help="check the node settings that let processes escape jobs or leave pruned blind",
        description="Check the node's settings (sshd's PAM stack, linger, slurm.conf, "
        "job_container.conf, cgroup.conf, the cgroup tree, daemon paths, journald, ptrace) "
        "against the "
        "policy: one line per finding, `LEVEL check: what — fix: how`. Exit 0 without errors, "
        "1 with one (--strict: or a warning): an NHC check (check_pruned). Reads only.",
    )
    policy_opt(sp)
    sp.add_argument("--root", default="/", metavar="DIR",
                    help="read the node's files under DIR (a prefix for /etc, /var, /run, "
                    "/sys, /proc; default /)")
    sp.add_argument("--slurm-conf", metavar="PATH",
                    help="slurm.conf, under --root (default: $SLURM_CONF, else "
                    "/etc/slurm/slurm.conf); cgroup.conf and job_container.conf beside it")
    sp.add_argument("--strict", action="store_true", help="warnings fail too (exit 1)")
    sp.add_argument("--quiet", action="store_true",
                    help="print only the findings that fail the check, no summary")
    sp.add_argument("--json", action="store_true",
                    help="one JSON object: ok, root, findings (level, check, what, fix)")
    sp.set_defaults(fn=_doctor)

    sp = sub.add_parser("sweep", help="apply the policy to every process")
    policy_opt(sp)
    sp.add_argument("--once", action="store_true", help="one sweep, then exit")
    sp.add_argument("--dry-run", action="store_true", help="only report what would be done")
    sp.add_argument("--uid", dest="uids", type=_uid_arg, nargs="+", action="extend",
                    metavar="UID", help="act only on processes of these uids (or user names)")
    sp.set_defaults(fn=cmd_sweep)

    sp = sub.add_parser("clean", help="remove per-job tmp dirs and files of ended jobs")
    policy_opt(sp)
    sp.add_argument("--once", action="store_true", help="one pass, then exit")
    sp.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    sp.set_defaults(fn=cmd_clean)

    sp = sub.add_parser("run", help="the daemon (systemd Type=notify service)")
    policy_opt(sp)
    sp.add_argument("--uid", dest="uids", type=_uid_arg, nargs="+", action="extend",
                    metavar="UID", help="act only on these uids (staged roll-out, tests)")
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser(
        "reload",
        help="make a running daemon reload its policy, and wait for the verdict",
        description="Send SIGHUP to the daemon PID and wait until it says whether the policy "
        "was applied (exit 0) or rejected (exit 78, every error on stderr; the daemon keeps "
        "the last good one); 1 when it does not answer. The unit's ExecReload=.",
    )
    sp.add_argument("pid", type=_pid_arg, metavar="PID", help="the daemon ($MAINPID)")
    sp.add_argument("--timeout", type=float, default=45.0, metavar="SECONDS",
                    help="how long to wait for the verdict (default 45; systemd gives 60)")
    sp.set_defaults(fn=cmd_reload)

    for name, fn, what in (("prolog", cmd_prolog, "record a job start"),
                           ("epilog", cmd_epilog, "clean up after a job that ended")):
        sp = sub.add_parser(name, help=f"{what} (batch system {name})")
        policy_opt(sp)
        sp.add_argument("--job", help="job id (default: $SLURM_JOB_ID)")
        sp.add_argument("--uid", help="job owner's uid or name (default: $SLURM_JOB_UID)")
        sp.add_argument("--user", help="job owner's name (default: $SLURM_JOB_USER)")
        if name == "epilog":
            sp.add_argument("--dry-run", action="store_true", help="only report")
        sp.set_defaults(fn=fn)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # A comm, path or file name a user chose may not be UTF-8: print its bytes as \xNN
    # rather than die in the middle of a table (pruned.text).
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=text.ERRORS)
    # ... and a control character in one (ESC, CR, a newline in a comm) as \xNN, not raw
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = text.EscapingWriter(sys.stdout), text.EscapingWriter(sys.stderr)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = saved


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad usage, with argparse's one-line message
    try:
        return args.fn(args)
    except PolicyError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return EX_CONFIG
    except UsageError as e:
        parser.print_usage(sys.stderr)
        _err(str(e))
        return EX_USAGE
    except PermissionError as e:
        _err(f"{e} (run as root)")
        return EX_NOPERM
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EX_OK
    except Exception as e:  # the promise: no traceback for bad input; a bug says so in one line
        if os.environ.get("PRUNED_DEBUG"):
            traceback.print_exc()
        _err(f"internal error: {type(e).__name__}: {e} (set PRUNED_DEBUG=1 for the trace)")
        return EX_SOFTWARE


def prolog_main() -> int:
    """`pruned-prolog`: for Slurm's Prolog= (a program path without arguments)."""
    return main(["prolog", *sys.argv[1:]])


def epilog_main() -> int:
    """`pruned-epilog`: for Slurm's Epilog= (a program path without arguments)."""
    return main(["epilog", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())

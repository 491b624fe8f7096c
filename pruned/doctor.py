"""`pruned doctor`: the node settings that let processes escape their jobs or leave pruned blind.

Each check reads its facts with a thin reader (every path under `Paths.root`, so a test can
build a misconfigured node in a tmp dir; `--root` is a prefix, not a chroot: an absolute
symlink still points at the host) and judges them in a pure function that returns findings,
each with the fix. Nothing is written, no process is signalled.

Levels: `error` when pruned would misjudge processes or be blind (a job's processes taken for
strays, every sweep report-only); `warning` when processes can escape a job, or pruned works
but degraded. Exit (an NHC check, contrib/nhc/pruned.nhc): 0 without errors, 1 with one;
`--strict` counts warnings too.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from pruned.jobs.slurm import DEFAULT_SLURMD_PATHS, SlurmCgroupSource
from pruned.model import Policy

DEFAULT_SLURM_CONF = "/etc/slurm/slurm.conf"
PAM_DIR = "/etc/pam.d"
LINGER_DIR = "/var/lib/systemd/linger"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
_MAX_INCLUDE_DEPTH = 8  # PAM stacks and slurm.conf Includes deeper than this are a loop
# type, control ("[success=1 default=ignore]" holds spaces), module path or included file
_PAM_RULE = re.compile(r"(\S+)\s+(\[[^\]]*\]|\S+)\s+(\S+)")


class Level(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Finding:
    level: Level
    check: str
    what: str
    fix: str

    def line(self) -> str:
        return f"{self.level.value.upper()} {self.check}: {self.what} — fix: {self.fix}"


@dataclass(frozen=True, slots=True)
class Paths:
    """Where the node's files are: `root` prefixes every absolute path."""

    root: str = "/"
    slurm_conf: str | None = None  # a node path (under root); None: $SLURM_CONF or the default

    def at(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/")) if self.root != "/" else path

    def slurm_conf_path(self) -> str:
        return self.slurm_conf or os.environ.get("SLURM_CONF") or DEFAULT_SLURM_CONF


def _read(path: str) -> str | None:
    """A small config file's text; None when there is no such file. Other errors (permission:
    doctor runs as root) go to main(), which names them."""
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20).decode("utf-8", "replace")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


# ---------------------------------------------------------------- PAM


@dataclass(frozen=True, slots=True)
class PamLine:
    file: str  # node path
    line: int
    type: str  # "session", "auth", ...
    module: str  # as written: "pam_systemd.so" or an absolute path
    via: str = ""  # the service file's include line that led here ("" for its own rules)


def parse_pam(text: str) -> list[tuple[int, str, str, str]]:
    """(line, type, control, module-or-included-file) of each rule; `@include F` as
    (line, "@include", "", F). PURE."""
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("@include"):
            parts = line.split()
            if len(parts) >= 2:
                out.append((n, "@include", "", parts[1]))
            continue
        m = _PAM_RULE.match(line)
        if m:  # "-session": load if installed, which it then is
            out.append((n, m[1].lstrip("-").lower(), m[2].lower(), m[3]))
    return out


def read_pam_stack(paths: Paths, service: str = "sshd") -> tuple[list[PamLine], list[str]]:
    """Every rule of a PAM service with its @include, include and substack files expanded;
    problems (a missing included file, a loop)."""
    rules: list[PamLine] = []
    problems: list[str] = []

    def walk(name: str, only: str | None, depth: int, via: str = "") -> None:
        node = name if name.startswith("/") else f"{PAM_DIR}/{name}"
        if depth > _MAX_INCLUDE_DEPTH:
            problems.append(f"{node}: includes nest deeper than {_MAX_INCLUDE_DEPTH}")
            return
        text = _read(paths.at(node))
        if text is None:
            if depth:
                problems.append(f"{node}: included but missing")
            return
        for n, typ, control, target in parse_pam(text):
            here = via or f"{node}:{n}"
            if typ == "@include":
                walk(target, only, depth + 1, here)
            elif only is not None and typ != only:
                continue
            elif control in ("include", "substack"):
                walk(target, typ, depth + 1, here)
            else:
                rules.append(PamLine(node, n, typ, target, via))

    walk(service, None, 0)
    return rules, problems


def judge_pam_systemd(rules: Iterable[PamLine], problems: Iterable[str]) -> list[Finding]:
    """pam_systemd in sshd's session stack: logind moves each ssh session into
    user-UID.slice, out of the job's cgroup that pam_slurm_adopt put it in. PURE."""
    out = [Finding(Level.WARNING, "pam-systemd", f"cannot follow sshd's PAM stack: {p}",
                   "fix the include") for p in problems]
    for r in rules:
        if r.type != "session" or os.path.basename(r.module) != "pam_systemd.so":
            continue
        if r.via:  # a shared file (common-session also serves console logins)
            fix = (f"in {r.via.rsplit(':', 1)[0]}, replace the include at line "
                   f"{r.via.rsplit(':', 1)[1]} by {r.file}'s lines without pam_systemd.so "
                   f"(or comment out {r.file}:{r.line} if only sshd uses it)")
        else:
            fix = f"comment out {r.file}:{r.line}"
        out.append(Finding(
            Level.WARNING, "pam-systemd",
            f"sshd's PAM session stack loads pam_systemd ({r.file}:{r.line}"
            + (f", included at {r.via}" if r.via else "") + "): logind moves every ssh session "
            "into user-UID.slice, out of the job pam_slurm_adopt adopted it into, and starts a "
            "systemd --user manager outside any job",
            fix + "; Slurm's pam_slurm_adopt documentation asks for this"))
    return out


# ---------------------------------------------------------------- linger


def read_linger(paths: Paths) -> list[str]:
    """Users with linger enabled (systemd keeps a file per user name)."""
    try:
        return sorted(os.listdir(paths.at(LINGER_DIR)))
    except (FileNotFoundError, NotADirectoryError):
        return []


def judge_linger(users: Iterable[str]) -> list[Finding]:
    """Linger starts user@UID.service at boot and keeps it after logout: a user's services
    and timers run outside every job. PURE."""
    return [Finding(Level.WARNING, "linger",
                    f"user {u} has linger enabled ({LINGER_DIR}/{u}): systemd runs their "
                    "user manager, services and timers from boot on, outside any job",
                    f"loginctl disable-linger {u}") for u in users]


# ---------------------------------------------------------------- slurm.conf


@dataclass(slots=True)
class SlurmConf:
    path: str  # node path of slurm.conf
    settings: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # key -> v, file, line
    problems: list[str] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        v = self.settings.get(key.lower())
        return v[0] if v else None

    def where(self, key: str) -> str:
        v = self.settings.get(key.lower())
        return f"{v[1]}:{v[2]}" if v else self.path


def parse_slurm_conf(text: str) -> list[tuple[int, str, str]]:
    """(line, key lowercased, value) of each Key=Value, and (line, "include", path) of each
    Include; a NodeName/PartitionName line's other pairs are that node's, not global. PURE."""
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        head, *rest = line.split(None, 1)
        if head.lower() == "include":
            out.append((n, "include", rest[0].strip() if rest else ""))
            continue
        pairs = [p.partition("=") for p in line.split()]
        if pairs and pairs[0][0].lower() in ("nodename", "partitionname", "nodeset",
                                             "frontendname", "downnodes"):
            continue
        out += [(n, k.lower(), v) for k, sep, v in pairs if sep]
    return out


def read_slurm_conf(paths: Paths, name: str | None = None) -> SlurmConf | None:
    """slurm.conf (or `name` beside it, e.g. cgroup.conf) with its Includes; the last
    setting of a key wins. None when the file does not exist."""
    top = paths.slurm_conf_path()
    if name is not None:
        top = os.path.join(os.path.dirname(top), name)
    if _read(paths.at(top)) is None:
        return None
    conf = SlurmConf(top)

    def walk(node: str, depth: int) -> None:
        text = _read(paths.at(node))
        if text is None:
            conf.problems.append(f"{node}: included but missing")
            return
        for n, key, value in parse_slurm_conf(text):
            if key != "include":
                conf.settings[key] = (value, node, n)
                continue
            if depth >= _MAX_INCLUDE_DEPTH:
                conf.problems.append(f"{node}:{n}: Includes nest deeper than {_MAX_INCLUDE_DEPTH}")
                continue
            target = value if value.startswith("/") else os.path.join(os.path.dirname(top), value)
            matches = sorted(m for m in glob.glob(paths.at(target)) if os.path.isfile(m))
            if not value or not matches:
                conf.problems.append(f"{node}:{n}: Include {value}: no such file")
            for m in matches:
                walk("/" + os.path.relpath(m, paths.root) if paths.root != "/" else m, depth + 1)

    walk(top, 0)
    return conf


def judge_slurm_conf(conf: SlurmConf, policy: Policy) -> list[Finding]:
    """PrologFlags=Contain and ProctrackType. PURE."""
    out = [Finding(Level.WARNING, "slurm-conf", p, "fix the Include") for p in conf.problems]
    flags = {f.strip().lower() for f in (conf.get("PrologFlags") or "").split(",")}
    if not flags & {"contain", "x11"}:  # X11 implies Contain
        out.append(Finding(
            Level.WARNING, "prolog-contain",
            f"slurm.conf has no PrologFlags=Contain ({conf.where('PrologFlags')}): jobs get no "
            "extern step, so pam_slurm_adopt has nowhere to put ssh sessions and pruned sees "
            "them outside every job",
            f"PrologFlags=Contain in {conf.path}, then restart slurmctld and slurmd"))
    proctrack = (conf.get("ProctrackType") or "proctrack/cgroup").lower()
    if proctrack in ("proctrack/linuxproc", "proctrack/pgid"):
        blind = "slurm" in policy.job_sources
        out.append(Finding(
            Level.ERROR if blind else Level.WARNING, "proctrack",
            f"ProctrackType={proctrack} ({conf.where('ProctrackType')}): jobs have no cgroups, "
            "a double fork leaves its job unnoticed"
            + (", and pruned's slurm job source cannot see any job: every sweep is report-only"
               if blind else ""),
            f"ProctrackType=proctrack/cgroup with TaskPlugin=task/cgroup in {conf.path}"
            + (", or jobs.sources: [statedir] with pruned prolog/epilog" if blind else "")))
    return out


def read_basepath(paths: Paths, conf: SlurmConf) -> tuple[str | None, str]:
    """job_container.conf's BasePath (the global one, else the first) and where it is set."""
    node = os.path.join(os.path.dirname(conf.path), "job_container.conf")
    text = _read(paths.at(node))
    found: tuple[str | None, str] = (None, node)
    for n, raw in enumerate((text or "").splitlines(), 1):
        pairs = dict(p.partition("=")[::2] for p in raw.split("#", 1)[0].split() if "=" in p)
        pairs = {k.lower(): v for k, v in pairs.items()}
        if "basepath" in pairs and (found[0] is None or "nodename" not in pairs):
            found = (pairs["basepath"].rstrip("/") or "/", f"{node}:{n}")
            if "nodename" not in pairs:
                break
    return found


def judge_job_container(
    conf: SlurmConf, basepath: str | None, where: str, policy: Policy
) -> list[Finding]:
    """job_container/tmpfs's BasePath against cleanup.job_container_base. PURE.

    Slurm 25.11 renamed the plugin: `NamespaceType=namespace/tmpfs`, same job_container.conf
    and the same BasePath/<job> layout."""
    key = next((k for k, v in (("JobContainerType", "job_container/tmpfs"),
                               ("NamespaceType", "namespace/tmpfs"))
                if (conf.get(k) or "").lower() == v), None)
    tmpfs = key is not None
    ours = policy.cleanup.job_container_base
    if tmpfs and basepath is None:
        return [Finding(Level.WARNING, "job-container",
                        f"{key}={conf.get(key)} but {where} sets no BasePath",
                        f"set BasePath= in {where}")]
    if tmpfs and basepath != ours:
        return [Finding(
            Level.WARNING, "job-container",
            f"job_container/tmpfs BasePath={basepath} ({where}) but the policy's "
            f"cleanup.job_container_base is {ours or 'unset'}: the per-job /tmp of ended jobs "
            "there is never cleaned",
            f"cleanup.job_container_base: {basepath} in the policy")]
    if not tmpfs and ours:
        return [Finding(
            Level.WARNING, "job-container",
            f"cleanup.job_container_base is {ours} but slurm.conf does not use "
            f"job_container/tmpfs or namespace/tmpfs ({conf.where('JobContainerType')})",
            "remove cleanup.job_container_base from the policy, or enable job_container/tmpfs")]
    return []


# ---------------------------------------------------------------- daemons


@dataclass(frozen=True, slots=True)
class DaemonProc:
    pid: int
    comm: str
    exe: str | None


def read_daemon_procs(paths: Paths, names: Iterable[str] = ("slurmd", "slurmstepd")) -> list[
    DaemonProc
]:
    """Processes whose comm is one of `names`, with their exe (names are only a hint here:
    doctor reports, it never trusts)."""
    proc = paths.at("/proc")
    wanted = set(names)
    out = []
    try:
        pids = [int(d) for d in os.listdir(proc) if d.isdigit()]
    except OSError:
        return []
    for pid in sorted(pids):
        try:
            with open(f"{proc}/{pid}/comm", "rb") as f:
                comm = f.read(64).decode(errors="replace").strip()
        except OSError:
            continue
        if comm not in wanted:
            continue
        try:
            exe: str | None = os.readlink(f"{proc}/{pid}/exe").removesuffix(" (deleted)")
        except OSError:
            exe = None
        out.append(DaemonProc(pid, comm, exe))
    return out


def resolve(paths: Paths, names: Iterable[str]) -> set[str]:
    """Node paths and the node paths their symlinks lead to (/proc/PID/exe shows those)."""
    out = set()
    for p in names:
        out.add(p)
        real = os.path.realpath(paths.at(p))
        out.add("/" + os.path.relpath(real, paths.root) if paths.root != "/" else real)
    return out


def judge_daemons(
    procs: Iterable[DaemonProc], exists: Callable[[str], bool], known: Callable[..., set[str]],
    policy: Policy,
) -> list[Finding]:
    """slurmd and slurmstepd where the policy (and pruned's slurm source) look for them. PURE
    but for the two callables, which the caller gives as readers."""
    out: list[Finding] = []
    slurm = "slurm" in policy.job_sources
    # The slurm source counts a job as running by a stepd at jobs.slurm.stepd; without it,
    # batch_daemons make the lineage below a stepd batch.
    stepd_key = "jobs.slurm.stepd" if slurm else "batch_daemons"
    stepds = known(*policy.slurm.stepd) if slurm else known(*policy.batch_daemons)
    slurmds = known(*DEFAULT_SLURMD_PATHS)
    if slurm and not any(exists(p) for p in policy.slurm.stepd):
        out.append(Finding(
            Level.ERROR, "daemon-paths",
            f"none of jobs.slurm.stepd ({', '.join(policy.slurm.stepd)}) exists: no job "
            "counts as running, and a crashed-step verdict would make job processes strays",
            "set jobs.slurm.stepd to where slurmstepd is installed"))
    for p in procs:
        if p.exe is None:
            continue
        if p.comm == "slurmstepd" and p.exe not in stepds:
            out.append(Finding(
                Level.ERROR, "daemon-paths",
                f"slurmstepd pid {p.pid} runs {p.exe}, which is not in {stepd_key}: its job "
                "does not count as running and its processes are judged strays",
                f"add {p.exe} to {stepd_key}"))
        elif p.comm == "slurmd" and slurm and p.exe not in slurmds:
            out.append(Finding(
                Level.ERROR, "daemon-paths",
                f"slurmd pid {p.pid} runs {p.exe}, but pruned looks for slurmd at "
                f"{', '.join(DEFAULT_SLURMD_PATHS)}: it takes slurmd for down and holds every "
                "sweep with running jobs report-only",
                f"make {DEFAULT_SLURMD_PATHS[0]} the slurmd binary (a symlink to {p.exe} will "
                "do)"))
    return out


# ---------------------------------------------------------------- journald


def judge_journald(is_socket: bool, fallback: str | None) -> list[Finding]:
    """No journald: audit records go to the fallback file, which nobody may read. PURE."""
    if is_socket:
        return []
    where = fallback or "/var/log/pruned/audit.jsonl"
    return [Finding(Level.WARNING, "journald",
                    f"no journald socket at {JOURNAL_SOCKET}: audit records go to {where}, not "
                    "the journal",
                    "run systemd-journald on the node, or collect that file "
                    "(audit.fallback_file)")]


# ---------------------------------------------------------------- whitelist.exe

PTRACE_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"


def judge_ptrace(policy: Policy, scope: str | None) -> list[Finding]:
    """whitelist.exe trusts what a process runs; a user who may ptrace their own genuine
    whitelisted process can run any code in it. Only Yama's scope 2 (admin-only attach) or 3
    (none) rules that out. PURE."""
    if not policy.whitelist.exe or (scope or "").strip() in ("2", "3"):
        return []
    now = f"kernel.yama.ptrace_scope is {scope.strip()}" if scope else "Yama is not enabled"
    return [Finding(Level.WARNING, "ptrace",
                    f"whitelist.exe is set and {now}: a user can ptrace a whitelisted process of "
                    "their own and run their code in it, whitelisted",
                    "kernel.yama.ptrace_scope=2 (sysctl.d), or whitelist accounts instead of "
                    "executables")]


# ---------------------------------------------------------------- cgroups


def read_layout(paths: Paths, cgroup_root: str) -> str:
    """'v2' (pure unified), 'hybrid' (v1 controllers and a v2 `unified` mount), 'v1' or
    'none', by what the cgroup root holds."""
    top = paths.at(cgroup_root)
    try:
        entries = os.listdir(top)
    except OSError:
        return "none"
    if "cgroup.controllers" in entries:
        return "v2"
    v1 = any(os.path.isfile(os.path.join(top, e, "cgroup.procs")) for e in entries
             if e != "unified")
    unified = os.path.isfile(os.path.join(top, "unified", "cgroup.controllers"))
    return "hybrid" if v1 and unified else "v1" if v1 else "v2" if unified else "none"


def judge_cgroups(
    layout: str, plugin: str | None, where: str, problems: Iterable[str], policy: Policy
) -> list[Finding]:
    """The cgroup layout against cgroup.conf's CgroupPlugin, and what pruned's own Slurm
    reader (pruned.jobs.slurm) could not understand. PURE."""
    out = []
    root = policy.slurm.cgroup_root
    plugin = (plugin or "autodetect").lower()
    conf = where.split(":")[0]
    if layout == "none":  # the job source's problems say the same again
        return [Finding(Level.ERROR, "cgroup-layout",
                        f"no cgroup hierarchy at {root} (jobs.slurm.cgroup_root)",
                        "mount cgroup2 there, or set jobs.slurm.cgroup_root to the mount")]
    elif plugin == "cgroup/v1" and layout == "v2":
        out.append(Finding(Level.ERROR, "cgroup-layout",
                           f"CgroupPlugin=cgroup/v1 ({where}) on a pure cgroup v2 node: slurmd "
                           "cannot make job cgroups",
                           f"CgroupPlugin=cgroup/v2 (or autodetect) in {conf}"))
    elif plugin == "cgroup/v2" and layout in ("v1", "hybrid"):
        out.append(Finding(Level.ERROR if layout == "v1" else Level.WARNING, "cgroup-layout",
                           f"CgroupPlugin=cgroup/v2 ({where}) on a {layout} cgroup node: "
                           "Slurm's v2 plugin needs the controllers in the unified hierarchy",
                           "boot with systemd.unified_cgroup_hierarchy=1, or "
                           f"CgroupPlugin=cgroup/v1 in {conf}"))
    for p in problems:
        if "slurmstepd pid" in p:
            fix = "ProctrackType=proctrack/cgroup; if a step was only starting, run doctor again"
        elif "not a layout pruned knows" in p:
            fix = ("a Slurm release or cgroup.conf setting pruned does not know yet: report it "
                   "with `pruned explain PID` of a process there; until then those processes "
                   "are left alone")
        elif "slurmd is not running" in p:
            fix = "start slurmd (or see daemon-paths)"
        else:
            fix = "make the cgroup tree readable by root at jobs.slurm.cgroup_root"
        out.append(Finding(Level.ERROR, "cgroup-layout",
                           f"pruned's Slurm job source: {p}: sweeps are report-only", fix))
    return out


def read_source_problems(paths: Paths, policy: Policy) -> list[str]:
    """What pruned's real Slurm reader says about this node's tree. Stepds outside any job
    cgroup are looked for only on the real node (a fake /proc under --root has no stat)."""
    top = paths.at(policy.slurm.cgroup_root)
    src = SlurmCgroupSource(top, policy.slurm.stepd, proc_root=paths.at("/proc"),
                            find_outside_stepds=paths.root == "/")
    # Messages name node paths, not where --root put them.
    return [p.replace(top, policy.slurm.cgroup_root) for p in src.read().problems]


# ---------------------------------------------------------------- all of it


def run_checks(paths: Paths, policy: Policy) -> list[Finding]:
    """Every check against the node under `paths`."""
    rules, pam_problems = read_pam_stack(paths)
    out = judge_pam_systemd(rules, pam_problems)
    out += judge_linger(read_linger(paths))
    slurm = "slurm" in policy.job_sources
    conf = read_slurm_conf(paths)
    if conf is None:
        if slurm:
            out.append(Finding(
                Level.WARNING, "slurm-conf",
                f"no slurm.conf at {paths.slurm_conf_path()}: the Slurm checks are skipped",
                "point SLURM_CONF (or --slurm-conf) at it"))
    else:
        out += judge_slurm_conf(conf, policy)
        out += judge_job_container(conf, *read_basepath(paths, conf), policy)
    out += judge_daemons(read_daemon_procs(paths), lambda p: os.path.exists(paths.at(p)),
                         lambda *names: resolve(paths, names), policy)
    try:
        is_sock = stat.S_ISSOCK(os.stat(paths.at(JOURNAL_SOCKET)).st_mode)
    except OSError:
        is_sock = False
    out += judge_journald(is_sock, policy.audit_fallback)
    out += judge_ptrace(policy, _read(paths.at(PTRACE_SCOPE)))
    if slurm:
        cg = read_slurm_conf(paths, "cgroup.conf")
        plugin, where = (cg.get("CgroupPlugin"), cg.where("CgroupPlugin")) if cg else (
            None, "cgroup.conf")
        out += judge_cgroups(read_layout(paths, policy.slurm.cgroup_root), plugin, where,
                             read_source_problems(paths, policy), policy)
    return out


def exit_status(findings: Iterable[Finding], strict: bool) -> int:
    """1 when a finding counts (errors; with strict, warnings too), else 0."""
    counted = {Level.ERROR, Level.WARNING} if strict else {Level.ERROR}
    return 1 if any(f.level in counted for f in findings) else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from pruned.clishared import load

    policy = load(args.policy)
    paths = Paths(args.root, args.slurm_conf)
    findings = run_checks(paths, policy)
    rc = exit_status(findings, args.strict)
    if args.json:
        print(json.dumps({"ok": rc == 0, "root": paths.root, "findings": [
            {**asdict(f), "level": f.level.value} for f in findings]}, sort_keys=True))
        return rc
    counted = {Level.ERROR, Level.WARNING} if args.strict else {Level.ERROR}
    for f in findings:
        if not args.quiet or f.level in counted:
            print(f.line())
    if not args.quiet:
        errors = sum(f.level is Level.ERROR for f in findings)
        print(f"# doctor: {errors} errors, {len(findings) - errors} warnings "
              f"(root {paths.root}, policy {', '.join(policy.sources)})")
    return rc

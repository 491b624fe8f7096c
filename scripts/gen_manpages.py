#!/usr/bin/env python3
"""Write the man pages pruned(8) and pruned-policy(5) from the code and docs they describe.

    python3 scripts/gen_manpages.py --out DIR     # DIR/pruned.8, DIR/pruned-policy.5
    python3 scripts/gen_manpages.py --check       # only the consistency checks

Run at package build time (debian/rules), so the pages cannot drift from the program:

- pruned-policy(5) lists exactly the keys of `pruned/policy/schema.py`'s SCHEMA, in its order,
  each with the built-in default read from `pruned.model.Policy()` and the value the shipped
  `policies/default.yaml` sets where that differs. The words for each key come from the
  "Every key" table of `policies/README.md`; a schema key without a row there, or a row naming
  a key the schema does not have, fails the build (exit 1) and says which. The other sections
  of that README (lookup order, merge order, YAML rules, contradictions) are converted as they
  are.
- pruned(8) takes every command, option and help text from `pruned.cli.build_parser()`, the
  exit codes from `pruned/exitcodes.py`, and the sections on classes, safety rails, the audit
  trail, the Slurm prolog/epilog and metrics from README.md.

Only the standard library and the pruned package (PyYAML) are needed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pruned import __version__  # noqa: E402
from pruned.model import Policy  # noqa: E402
from pruned.policy.schema import SCHEMA  # noqa: E402

# Keys a policy file may set that the schema table does not hold (yamltree checks them).
NON_SCHEMA_KEYS = ("version",)
DOC_EXAMPLES = "/usr/share/doc/pruned/examples"


class DocError(Exception):
    """The docs and the code disagree; the message says where and what to fix."""


# ---------------------------------------------------------------- groff text

_GLYPHS = {
    "\u2014": r"\(em", "\u2013": r"\(en", "\u2192": r"\(->", "\u2190": r"\(<-",
    "\u2265": r"\(>=", "\u2264": r"\(<=", "\u2026": "...", "\u00d7": r"\(mu",
    "\u00b5": r"\(mc", "\u2018": r"\(oq", "\u2019": r"\(cq", "\u201c": r"\(lq",
    "\u201d": r"\(rq", "\u00a0": r"\~", "\u2248": r"\(~~", "\u2260": r"\(!=",
}


def esc(text: str, *, literal: bool = False) -> str:
    """Plain text -> groff: backslashes, non-ASCII glyphs, and minus signs in literals."""
    text = text.replace("\\", r"\e")
    out = []
    for ch in text:
        if ord(ch) < 128:
            out.append(r"\-" if literal and ch == "-" else ch)
        else:
            out.append(_GLYPHS.get(ch, f"\\[u{ord(ch):04X}]"))
    return "".join(out)


_INLINE = re.compile(r"`([^`]+)`|\*\*(.+?)\*\*|(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])")


def inline(md: str) -> str:
    """Markdown inline text (code spans, **bold**, *italic*, [links](x)) -> groff."""
    md = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", md)
    out, pos = [], 0
    for m in _INLINE.finditer(md):
        out.append(esc(md[pos:m.start()]))
        code, bold, ital = m.groups()
        if code is not None:
            out.append(r"\fB" + esc(code, literal=True) + r"\fR")
        elif bold is not None:
            out.append(r"\fB" + inline(bold) + r"\fR")
        else:
            out.append(r"\fI" + inline(ital) + r"\fR")
        pos = m.end()
    out.append(esc(md[pos:]))
    return "".join(out)


def line(text: str) -> str:
    """One groff text line: a leading . or ' would be read as a request."""
    text = text.strip()
    return r"\&" + text if text.startswith((".", "'")) else text


def quoted(text: str) -> str:
    return '"' + text.replace('"', r"\(dq") + '"'


# ---------------------------------------------------------------- Markdown -> groff


@dataclass
class Section:
    level: int
    title: str
    body: list[str]


def md_sections(text: str) -> list[Section]:
    """A Markdown file split at its headings (code blocks are not searched for them)."""
    sections = [Section(0, "", [])]
    fence = False
    for raw in text.splitlines():
        if raw.startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"(#{1,6}) (.*)", raw)
        if m:
            sections.append(Section(len(m.group(1)), m.group(2).strip(), []))
        else:
            sections[-1].body.append(raw)
    return sections


def md_section(sections: list[Section], title: str) -> list[str] | None:
    """The lines of the section titled `title` with its subsections (as ### lines)."""
    for i, s in enumerate(sections):
        if s.title == title:
            lines = list(s.body)
            for sub in sections[i + 1:]:
                if sub.level <= s.level:
                    break
                lines.append("#" * sub.level + " " + sub.title)
                lines.extend(sub.body)
            return lines
    return None


def table_rows(lines: list[str]) -> list[list[str]]:
    """The body rows of a Markdown table (header and |---| rule left out)."""
    rows = [_cells(ln) for ln in lines]
    return [r for r in rows[1:] if not all(re.fullmatch(r":?-+:?", c) for c in r if c)]


def _cells(row: str) -> list[str]:
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row)]


def md_to_groff(lines: list[str], *, top: int = 2) -> list[str]:
    """Block-level Markdown (paragraphs, lists, tables, code blocks, sub-headings) -> groff.

    A table becomes a tagged list: the first cells are the tag, the last cell the text.
    """
    out: list[str] = []
    i = 0
    while i < len(lines):
        raw = lines[i]
        s = raw.strip()
        if not s or s == "---":
            i += 1
        elif s.startswith("```"):
            j = i + 1
            out += [".PP", ".RS 4", ".nf"]
            while j < len(lines) and not lines[j].strip().startswith("```"):
                out.append(line(esc(lines[j].rstrip(), literal=True)) or r"\&")
                j += 1
            out += [".fi", ".RE"]
            i = j + 1
        elif m := re.match(r"(#{1,6}) (.*)", s):
            macro = ".SH" if len(m.group(1)) <= top else ".SS"
            title = m.group(2).upper() if macro == ".SH" else m.group(2)
            out.append(f"{macro} {quoted(inline(title))}")
            i += 1
        elif s.startswith("|"):
            j = i
            while j < len(lines) and lines[j].strip().startswith("|"):
                j += 1
            for cells in table_rows(lines[i:j]):
                text = r" \(em ".join(inline(c) for c in cells[1:] if c)
                out += [".TP", line(inline(cells[0]) or r"\&"), line(text or r"\&")]
            out.append(".PP")
            i = j
        elif re.match(r"(- |\d+\. )", s):
            bullet = r"\(bu" if s.startswith("- ") else s.split()[0]
            text = s.split(" ", 1)[1]
            j = i + 1
            while (j < len(lines) and lines[j].startswith(" ") and lines[j].strip()
                   and not re.match(r"(- |\d+\. )", lines[j].strip())):
                text += " " + lines[j].strip()
                j += 1
            out += [f".IP {bullet} 4", line(inline(text))]
            i = j
        else:
            para = [s]
            j = i + 1
            while (j < len(lines) and lines[j].strip()
                   and not re.match(r"(#{1,6} |```|\||- |\d+\. )", lines[j].strip())):
                para.append(lines[j].strip())
                j += 1
            out += [".PP", line(inline(" ".join(para)))]
            i = j
    return out


# ---------------------------------------------------------------- the schema


def leaves(schema: dict[str, Any], path: str = "") -> list[tuple[str, Any]]:
    """(dotted key, _Field) for every leaf of the schema, in table order."""
    out = []
    for key, spec in schema.items():
        dotted = f"{path}.{key}" if path else key
        out += leaves(spec, dotted) if isinstance(spec, dict) else [(dotted, spec)]
    return out


def fmt_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    ms = round(seconds * 1000)
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000),
                       ("ms", 1)):
        n, ms = divmod(ms, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts)


def fmt_value(value: Any, spec: Any) -> str:
    """A Policy value written the way a policy file would set it."""
    if getattr(spec.check, "__qualname__", "").startswith("duration."):
        return fmt_duration(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if hasattr(value, "value"):  # an Action enum
        return str(value.value)
    if isinstance(value, tuple):
        items = []
        for v in value:
            if isinstance(v, tuple) and len(v) == 2:  # a uid range
                items.append(f'"{v[0]}-{v[1]}"' if v[0] != v[1] else f'"{v[0]}"')
            else:
                items.append(str(v))
        return "[" + ", ".join(items) + "]"
    return str(value)


def policy_value(policy: Policy, spec: Any) -> str:
    if spec.target is None:
        return "ignore"  # the ignore-only classes
    if spec.target == "dry_run":
        return "report" if policy.dry_run else "enforce"
    obj: Any = policy
    for attr in spec.target.split("."):
        obj = getattr(obj, attr)
    return fmt_value(obj, spec)


def key_rows(readme: str) -> list[tuple[list[str], str, str]]:
    """The "Every key" table of policies/README.md: (keys, type cell, meaning cell).

    A first cell like "`schedule.sweep` / `clean` / `jobs`" stands for siblings of the first.
    """
    lines = md_section(md_sections(readme), "Every key")
    if lines is None:
        raise DocError("policies/README.md has no '## Every key' section")
    rows = []
    for cells in table_rows([ln for ln in lines if ln.strip().startswith("|")]):
        if len(cells) < 3:
            raise DocError(f"policies/README.md 'Every key': a row needs 3 cells: {cells}")
        names = re.findall(r"`([^`]+)`", cells[0])
        if not names:
            raise DocError(f"policies/README.md 'Every key': no `key` in {cells[0]!r}")
        parent = names[0].rpartition(".")[0]
        keys = [names[0]] + [f"{parent}.{n}" if parent else n for n in names[1:]]
        rows.append((keys, cells[1], cells[2]))
    return rows


def check_keys(rows: list[tuple[list[str], str, str]]) -> None:
    documented = [k for keys, _, _ in rows for k in keys]
    schema = [k for k, _ in leaves(SCHEMA)]
    missing = [k for k in schema if k not in documented]
    extra = [k for k in documented if k not in schema and k not in NON_SCHEMA_KEYS]
    twice = sorted({k for k in documented if documented.count(k) > 1})
    problems = []
    if missing:
        problems.append("schema keys with no row in policies/README.md 'Every key' (add one): "
                        + ", ".join(missing))
    if extra:
        problems.append("rows in policies/README.md 'Every key' for keys the schema does not "
                        "have (pruned/policy/schema.py): " + ", ".join(extra))
    if twice:
        problems.append("keys with two rows in policies/README.md 'Every key': " + ", ".join(twice))
    if problems:
        raise DocError("; ".join(problems))


def keys_section(rows: list[tuple[list[str], str, str]]) -> list[str]:
    """KEYS: every schema key in schema order, with its built-in and shipped defaults."""
    from pruned.policy.load import load_policy

    specs = dict(leaves(SCHEMA))
    builtin = Policy()
    shipped = load_policy(REPO / "policies" / "default.yaml")
    by_key = {k: (keys, typ, meaning) for keys, typ, meaning in rows for k in keys}
    out = [".SH KEYS",
           ".PP",
           "Every key a policy file may set, in the order of the schema. A dotted key "
           r"\fBa.b\fR is written as \fBb:\fR inside the mapping \fBa:\fR. "
           "\\(lqBuilt-in\\(rq is the value used when no file sets the key; "
           "\\(lqshipped\\(rq is what \\fI/etc/pruned/policy.d/00-default.yaml\\fR sets "
           "where that differs."]
    done: set[str] = set()
    order = list(NON_SCHEMA_KEYS) + [k for k, _ in leaves(SCHEMA)]
    for key in order:
        if key in done or key not in by_key:
            continue
        keys, typ, meaning = by_key[key]
        done.update(keys)
        out += [".TP", line(", ".join(r"\fB" + esc(k, literal=True) + r"\fR" for k in keys))]
        out.append(line(inline(f"Type: {typ}.")))
        out += [".br", line(inline(meaning))]
        values = [(k, policy_value(builtin, specs[k]), policy_value(shipped, specs[k]))
                  for k in keys if k in specs]
        facts = [f"built-in `{b}`" + ("" if s == b else f", shipped `{s}`")
                 for _, b, s in values]
        if len(set(facts)) > 1:
            facts = [f"{k}: {f}" for (k, _, _), f in zip(values, facts, strict=True)]
        elif len(facts) > 1:
            facts = [facts[0] + " for each"]
        if facts:
            out += [".br", line(inline("Default: " + "; ".join(facts) + "."))]
    return out


# ---------------------------------------------------------------- the pages


def header(name: str, section: int, title: str, date: str) -> list[str]:
    return [
        f'.\\" Generated by scripts/gen_manpages.py from the pruned {__version__} sources;',
        '.\\" edit those, not this file.',
        f'.TH {name.upper()} {section} "{date}" "pruned {__version__}" {quoted(title)}',
        ".SH NAME",
    ]


def policy_page(date: str) -> str:
    readme = (REPO / "policies" / "README.md").read_text()
    rows = key_rows(readme)
    check_keys(rows)
    secs = md_sections(readme)
    out = header("pruned-policy", 5, "File Formats", date)
    out += [r"pruned\-policy \- the policy files of pruned(8)",
            ".SH SYNOPSIS",
            r"\fI/etc/pruned/policy.d/*.yaml\fR",
            ".br",
            r"\fI/etc/pruned/policy.yaml\fR",
            ".SH DESCRIPTION",
            ".PP",
            r"A policy tells \fBpruned\fR(8) how to classify the processes of a batch node, "
            "what to do with strays, which files of ended jobs to remove and how often. It is "
            "YAML, read strictly: every file starts with \\fBversion: 1\\fR, unknown and "
            "duplicate keys are errors, and a policy with any error is never used.",
            ".PP",
            r"The package installs the default as \fI/etc/pruned/policy.d/00-default.yaml\fR "
            r"(\fBmode: report\fR: it changes nothing), commented line by line. Put site "
            r"changes in a later file of the same directory, e.g. \fI50-site.yaml\fR, which "
            "keeps the default a pristine conffile across upgrades. Examples for Slurm, "
            r"Torque/PBS and gLExec pools are in \fI" + esc(DOC_EXAMPLES) + r"\fR.",
            ".PP",
            r"Check a policy with \fBpruned check\-config\fR [\fIPATH\fR]: it prints every error "
            r"as \fIfile\fB:\fIline\fB:\fR \fIdotted.key\fB:\fR \fImessage\fR and exits 78. "
            "The daemon refuses to start with a bad policy, and a reload (SIGHUP) with a bad "
            "policy keeps the old one."]
    for s in secs:
        if s.level != 2 or s.title == "Every key":
            if s.title == "Every key":
                out += keys_section(rows)
            continue
        out += md_to_groff([f"## {s.title}", *md_section(secs, s.title)])
    out += [".SH FILES",
            ".TP", r"\fI/etc/pruned/policy.d/\fR",
            r"all \fB*.yaml\fR files, merged in lexical order (first choice)",
            ".TP", r"\fI/etc/pruned/policy.yaml\fR",
            r"a single policy file, used when \fIpolicy.d/\fR does not exist",
            ".TP", r"\fI" + esc(DOC_EXAMPLES) + r"/\fR",
            "example policies",
            ".SH SEE ALSO",
            r"\fBpruned\fR(8)"]
    return "\n".join(out) + "\n"


README_SECTIONS = (  # (README.md heading, man section title)
    ("Classes (first rule wins)", "CLASSES"),
    ("Safety rails (no policy lifts them)", "SAFETY RAILS"),
    ("Audit trail", "AUDIT TRAIL"),
    ("Slurm Prolog/Epilog", "SLURM PROLOG AND EPILOG"),
    ("Metrics", "METRICS"),
)


def _usage(parser: argparse.ArgumentParser) -> str:
    text = " ".join(parser.format_usage().split())
    return text.removeprefix("usage: ")


def _opt_tag(action: argparse.Action) -> str:
    if not action.option_strings:
        return r"\fI" + esc(action.metavar or action.dest) + r"\fR"
    names = ", ".join(r"\fB" + esc(o, literal=True) + r"\fR" for o in action.option_strings)
    if action.nargs == 0:
        return names
    if action.metavar:
        meta = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    elif action.choices:
        meta = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        meta = action.dest.upper()
    more = r" ..." if action.nargs in ("+", "*") else ""
    return f"{names} \\fI{esc(meta)}\\fR{more}"


def command_section(parser: argparse.ArgumentParser) -> list[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    out = [".SH COMMANDS"]
    for name, sp in sub.choices.items():
        out += [f".SS {quoted(esc(name, literal=True))}",
                line(r"\fB" + esc(_usage(sp), literal=True) + r"\fR"),
                ".PP", line(esc((helps.get(name) or "").rstrip(".") + "."))]
        formatter = sp._get_formatter()
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            help_text = formatter._expand_help(action) if action.help else ""
            if action.choices and action.option_strings and action.metavar:
                help_text += " (" + ", ".join(map(str, action.choices)) + ")"
            out += [".TP", line(_opt_tag(action)), line(esc(help_text) or r"\&")]
    return out


def exit_codes() -> list[tuple[str, int, str]]:
    text = (REPO / "pruned" / "exitcodes.py").read_text()
    codes = []
    for m in re.finditer(r"^(EX_\w+)\s*=\s*(\d+)\s*(?:#\s*(.*))?$", text, re.M):
        codes.append((m.group(1), int(m.group(2)), (m.group(3) or "success").strip()))
    if not codes:
        raise DocError("pruned/exitcodes.py: no EX_NAME = N lines found")
    return codes


def pruned_page(date: str) -> str:
    from pruned.cli import build_parser

    parser = build_parser()
    readme = md_sections((REPO / "README.md").read_text())
    out = header("pruned", 8, "System Administration", date)
    out += [r"pruned, pruned\-prolog, pruned\-epilog \- keep batch compute nodes clean of the "
            "processes and files jobs leave behind",
            ".SH SYNOPSIS",
            line(r"\fB" + esc(_usage(parser), literal=True) + r"\fR"),
            ".br",
            r"\fBpruned\-prolog\fR [\fIoptions\fR]",
            ".br",
            r"\fBpruned\-epilog\fR [\fIoptions\fR]",
            ".SH DESCRIPTION",
            ".PP",
            r"\fBpruned\fR walks the process table of a batch compute node and classifies every "
            r"process as exactly one of \fBsystem\fR, \fBbatch\fR, \fBadopted\fR, "
            r"\fBwhitelisted\fR or \fBstray\fR, each with the rule and the evidence that "
            "decided it. By policy it kills strays (the whole tree, through pidfds), adopts "
            "them into the user's newest job on the node, or ignores them; it removes the "
            "per-job directories and loose files of ended jobs; and it records every decision "
            "in the systemd journal. All job knowledge is node-local (Slurm's cgroup tree, or "
            r"records written by \fBpruned prolog\fR and \fBpruned epilog\fR).",
            ".PP",
            r"The shipped policy has \fBmode: report\fR: it decides and logs what it would do "
            r"and changes nothing. \fBpruned scan\fR shows, read-only, what a sweep would do "
            "on this node now. The package does not enable the service: after reviewing the "
            r"policy (\fBpruned\-policy\fR(5)), run \fBsystemctl enable \-\-now pruned\fR.",
            ".PP",
            r"\fBpruned\-prolog\fR and \fBpruned\-epilog\fR are \fBpruned prolog\fR and "
            r"\fBpruned epilog\fR as programs without arguments, which is what Slurm's "
            r"\fBProlog=\fR and \fBEpilog=\fR take."]
    out += command_section(parser)
    for title, man_title in README_SECTIONS:
        body = md_section(readme, title)
        if body is None:
            print(f"gen_manpages: README.md has no section {title!r}; pruned(8) leaves out "
                  f"{man_title}", file=sys.stderr)
            continue
        out += md_to_groff([f"## {man_title}", *body])
    out += [".SH EXIT STATUS"]
    for name, code, what in exit_codes():
        out += [".TP", f"\\fB{code}\\fR ({esc(name)})", line(esc(what))]
    out += [".SH ENVIRONMENT",
            ".TP", r"\fBPRUNED_DEBUG\fR",
            "set to any value: an internal error prints its traceback",
            ".TP", r"\fBSLURM_JOB_ID\fR, \fBSLURM_JOB_UID\fR, \fBSLURM_JOB_USER\fR",
            r"the job that \fBprolog\fR and \fBepilog\fR act for, when \fB\-\-job\fR, "
            r"\fB\-\-uid\fR, \fB\-\-user\fR are not given (\fBPBS_JOBID\fR too)",
            ".TP", r"\fBNOTIFY_SOCKET\fR, \fBWATCHDOG_USEC\fR",
            r"set by systemd for \fBpruned run\fR (Type=notify, the watchdog)",
            ".SH FILES",
            ".TP", r"\fI/etc/pruned/policy.d/*.yaml\fR",
            r"the policy, merged in lexical order; see \fBpruned\-policy\fR(5)",
            ".TP", r"\fI/var/lib/pruned/\fR",
            "root-only state: job records, the ended-job history",
            ".TP", r"\fI/var/log/pruned/audit.jsonl\fR",
            "audit records, one JSON object a line, when journald cannot take them",
            ".TP", r"\fI/lib/systemd/system/pruned.service\fR",
            r"the unit (\fBType=notify\fR, watchdog, \fBsystemctl reload\fR re-reads the policy)",
            ".SH SEE ALSO",
            r"\fBpruned\-policy\fR(5), \fBjournalctl\fR(1), \fBsystemd.service\fR(5), "
            r"\fBslurm.conf\fR(5)",
            ".PP",
            r"\fI/usr/share/doc/pruned/README.md\fR"]
    return "\n".join(out) + "\n"


def build_date() -> str:
    """SOURCE_DATE_EPOCH (set by dpkg-buildpackage from debian/changelog), else today."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (_dt.datetime.fromtimestamp(int(epoch), _dt.UTC) if epoch and epoch.isdigit()
            else _dt.datetime.now(_dt.UTC))
    return when.strftime("%Y-%m-%d")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write pruned.8 and pruned-policy.5 here")
    ap.add_argument("--check", action="store_true", help="only check; write nothing")
    args = ap.parse_args(argv)
    if not args.out and not args.check:
        ap.error("give --out DIR or --check")
    try:
        date = build_date()
        pages = {"pruned.8": pruned_page(date), "pruned-policy.5": policy_page(date)}
    except DocError as e:
        print(f"gen_manpages: {e}", file=sys.stderr)
        return 1
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, text in pages.items():
            (args.out / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

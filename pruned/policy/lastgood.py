"""The last-good-policy store: the newest policy of each policy path that passed validation.

`pruned-epilog` must not drain a node because configuration management pushed a bad policy,
so whenever the daemon loads or reloads a policy, `pruned check-config` validates one, or the
epilog loads one, the exact bytes that passed are kept here; an epilog whose policy is
rejected or unreadable runs with them instead.

Where: always `/var/lib/pruned/last-good-policy` ($PRUNED_LAST_GOOD_DIR overrides it, for
tests and unusual layouts), never `jobs.state_dir`: the epilog has to find the store exactly
when it cannot read the policy that would name another place. What: the policies under
/etc/pruned (`keeps`), or any policy path while $PRUNED_LAST_GOOD_DIR is set. One entry per
policy path (`/etc/pruned/policy.d` and `/etc/pruned/policy.yaml` never overwrite each
other), each a directory holding the files under their own names with their content as
validated, so `file:line` in any message about them still points at the right line:

    last-good-policy/                        0700 root
      .lock                                  writers take it (flock)
      %2Fetc%2Fpruned%2Fpolicy%2Ed -> .%2Fetc%2Fpruned%2Fpolicy%2Ed.<ns>    the current entry
      .%2Fetc%2Fpruned%2Fpolicy%2Ed.<ns>/     0700: 00-default.yaml  50-site.yaml  .source.json
      reload-<pid>.json                      the daemon's latest reload verdict (service.py)

A save writes a new version directory (files fsynced), then renames a symlink over the entry:
a reader sees the old version or the new one, never a mix. The previous version is kept (a
reader may still be in it) and older ones removed. Nothing is read from a store or version
directory that is not ours (owner, no group/other write): a user who could plant a policy
there could choose what the epilog kills.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

from pruned.linux.atomic import ensure_private_dir, write_atomic
from pruned.model import Policy
from pruned.policy.load import ETC_DIR, PolicyError, load_files

STORE_ENV = "PRUNED_LAST_GOOD_DIR"
DEFAULT_STORE = "/var/lib/pruned/last-good-policy"
META = ".source.json"
LOCK = ".lock"
FORMAT = 1
MAX_KEY = 180  # longer (quoted) policy paths are named by their hash: NAME_MAX is 255


class LastGoodError(Exception):
    """There is no usable last good policy; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class Saved:
    """One stored last-good policy."""

    policy_path: str  # the policy path it is the last good one of
    directory: str  # the version directory holding the files
    files: tuple[str, ...]  # the files in it, in merge order
    sources: tuple[str, ...]  # where each file was read from when it passed validation
    saved_at: float  # epoch seconds
    saved_by: str  # "daemon", "check-config", "epilog"

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.saved_at))
        return (f"last good policy of {self.policy_path} (saved {when} by {self.saved_by}, "
                f"in {self.directory}: {', '.join(os.path.basename(f) for f in self.files)})")


def store_dir() -> str:
    """The store: $PRUNED_LAST_GOOD_DIR, else /var/lib/pruned/last-good-policy."""
    return os.environ.get(STORE_ENV) or DEFAULT_STORE


def keeps(path: str) -> bool:
    """Whether a validated policy of `path` is kept: the node's own policies (under
    /etc/pruned, what pruned-epilog, run by Slurm without arguments, reads), or any when
    $PRUNED_LAST_GOOD_DIR names a store. A draft in /tmp, a package's tree at build time or a
    test harness's policy leaves nothing behind in /var/lib/pruned."""
    where = normal_path(path)
    return bool(os.environ.get(STORE_ENV)) or where == ETC_DIR or where.startswith(ETC_DIR + "/")


def normal_path(path: str) -> str:
    """One spelling per policy path: absolute, no `//`, `/./` or trailing `/`."""
    return os.path.normpath(os.path.abspath(path))


def key_for(path: str) -> str:
    """The store entry name of a policy path: the path percent-quoted, `.` too, so that a key
    holds no `.` and `.<key>.<ns>` names exactly one key's versions."""
    raw = os.fsencode(normal_path(path))  # a name that is not UTF-8 keeps its own bytes
    key = quote(raw, safe="").replace(".", "%2E")
    if len(key) > MAX_KEY:
        key = "sha256-" + hashlib.sha256(raw).hexdigest()
    return key


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_ours(path: str, what: str, *, directory: bool = True) -> None:
    """Refuse a store part another user could have written (LastGoodError)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise LastGoodError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise LastGoodError(f"{what} {path}: {e.strerror}") from None
    kind = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    if not kind:
        raise LastGoodError(f"{what} {path} is not a {'directory' if directory else 'file'}")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise LastGoodError(
            f"{what} {path} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}: "
            "not trusted (it must be ours and writable by nobody else)"
        )


def _is_version(name: str, key: str) -> bool:
    """Whether a store entry is a version directory name of `key`: `.<key>.<digits>`."""
    head, _, ns = name.rpartition(".")
    return head == f".{key}" and ns.isdigit()


def _version_of(store: str, key: str) -> str | None:
    """The version directory name the entry points at, or None when there is no entry."""
    try:
        target = os.readlink(os.path.join(store, key))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LastGoodError(f"{os.path.join(store, key)}: {e.strerror}") from None
    if not _is_version(target, key):
        raise LastGoodError(f"{os.path.join(store, key)} points outside the store: {target!r}")
    return target


def current(path: str, store: str | None = None) -> Saved | None:
    """The stored last good policy of `path`, or None when none was saved.

    LastGoodError when there is an entry that cannot be trusted or read.
    """
    store = store or store_dir()
    key = key_for(path)
    if not os.path.lexists(store):
        return None
    _check_ours(store, "last-good store")
    version = _version_of(store, key)
    if version is None:
        return None
    vdir = os.path.join(store, version)
    _check_ours(vdir, "last-good policy")
    try:
        with open(os.path.join(vdir, META), "rb") as f:
            meta = json.loads(f.read(1 << 20))
        names = [e["name"] for e in meta["files"]]
        sources = [e["source"] for e in meta["files"]]
        saved_at, saved_by = float(meta["saved_at"]), str(meta["saved_by"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LastGoodError(f"{vdir}/{META} is unreadable: {e}") from None
    if not names or any("/" in n or n in ("", ".", "..", META) for n in names):
        raise LastGoodError(f"{vdir}/{META} names no usable files")
    files = tuple(os.path.join(vdir, n) for n in names)
    return Saved(normal_path(path), vdir, files, tuple(sources), saved_at, saved_by)


def load(path: str, store: str | None = None) -> tuple[Policy, Saved]:
    """The last good policy of `path`, validated again (a pruned upgrade may have changed the
    schema since it was saved). LastGoodError with the reason when there is none to use."""
    saved = current(path, store)
    if saved is None:
        raise LastGoodError(f"no last good policy of {normal_path(path)} in {store or store_dir()}")
    for f in saved.files:
        _check_ours(f, "last-good policy file", directory=False)
    try:
        loaded = load_files(list(saved.files))
    except PolicyError as e:
        raise LastGoodError(
            f"the {saved.describe()} no longer passes validation: {e.errors[0]}"
        ) from None
    return loaded.policy, saved


def _same(saved: Saved | None, entries: list[tuple[str, str, bytes]]) -> bool:
    """Whether the stored version holds exactly these files (names, sources and bytes)."""
    if saved is None or len(saved.files) != len(entries):
        return False
    if [s for _, s, _ in entries] != list(saved.sources):
        return False
    for f, (name, _src, data) in zip(saved.files, entries, strict=True):
        if os.path.basename(f) != name:
            return False
        try:
            with open(f, "rb") as fh:
                if _digest(fh.read()) != _digest(data):
                    return False
        except OSError:
            return False
    return True


def _names(contents: Mapping[str, bytes]) -> list[tuple[str, str, bytes]]:
    """(name in the version dir, source path, bytes) per file, in merge order."""
    out, used = [], set()
    for i, (src, data) in enumerate(contents.items()):
        name = os.path.basename(src) or f"{i:02d}.yaml"
        if name in used or name in (META, LOCK) or name.startswith("."):
            name = f"{i:02d}-{name.lstrip('.')}"
        used.add(name)
        out.append((name, src, data))
    return out


def save(
    path: str,
    contents: Mapping[str, bytes],
    *,
    saved_by: str,
    store: str | None = None,
) -> Saved | None:
    """Keep `contents` (source file -> the bytes that passed validation, in merge order) as
    the last good policy of `path`. None when the store already holds exactly that.

    OSError (or LastGoodError for an untrusted store) when it cannot be kept; callers report
    that and carry on: a failed save never fails the load that validated the policy.
    """
    if not contents:
        raise ValueError("nothing to save")
    store = store or store_dir()
    key = key_for(path)
    entries = _names(contents)
    ensure_private_dir(store)
    _check_ours(store, "last-good store")
    fd = os.open(os.path.join(store, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "r+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            previous = current(path, store)
        except LastGoodError:
            previous = None  # a broken entry is simply replaced
        if _same(previous, entries):
            return None
        now = time.time()
        version = f".{key}.{time.time_ns()}"
        vdir = os.path.join(store, version)
        os.mkdir(vdir, 0o700)
        try:
            for name, _src, data in entries:
                write_atomic(os.path.join(vdir, name), data)
            meta = {
                "format": FORMAT,
                "policy_path": normal_path(path),
                "saved_at": now,
                "saved_by": saved_by,
                "files": [{"name": n, "source": s, "sha256": _digest(d)} for n, s, d in entries],
            }
            write_atomic(os.path.join(vdir, META),
                         json.dumps(meta, indent=1, sort_keys=True).encode() + b"\n")
            link = os.path.join(store, f".{key}.link.{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
            os.symlink(version, link)
            os.replace(link, os.path.join(store, key))
        except BaseException:
            _remove_version(vdir)
            raise
        _fsync_dir(store)
        keep = {version, os.path.basename(previous.directory) if previous else ""}
        for entry in os.listdir(store):
            if _is_version(entry, key) and entry not in keep:
                _remove_version(os.path.join(store, entry))
    return Saved(normal_path(path), vdir, tuple(os.path.join(vdir, n) for n, _, _ in entries),
                 tuple(s for _, s, _ in entries), now, saved_by)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_version(vdir: str) -> None:
    """Remove one version directory (plain files only: the store never holds anything else)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(vdir):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(vdir, name))
        os.rmdir(vdir)

"""Remove files in directories users can write to, by directory file descriptor only.

Every directory is opened with O_NOFOLLOW relative to the fd of its already-verified parent,
then identified with statx on the open fd and compared with the lstat seen while listing the
parent: a directory swapped for a symlink fails the open (ELOOP), one swapped for another
directory fails the (st_dev, st_ino) check. No path string through a user-writable
directory is ever resolved, so a symlink race (CVE-2013-4392, CVE-2018-6954, bpo-4489)
cannot point a removal outside the tree. The walk stays on one mount: other filesystems,
bind mounts of the same filesystem (different mount id) and file mounts are skipped.
Kept on purpose: FIFOs, device nodes, unix sockets someone bound (listed in /proc/net/unix),
and files with a lock in /proc/locks.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from pruned.model import Result
from pruned.rules.cleanplan import CleanupPlan, JobDirItem, LooseFilesItem

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_OPEN_FDS = 256  # ancestors beyond this are closed and re-opened via ".." (then verified)
REL_DEPTH = 24  # names kept in a reported relative path (deep trees stay readable)
MAX_REPORTED = 1000  # skipped/errors kept per call; the rest are only counted
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_BASIC = 0x7FF
_STATX_MNT_ID = 0x1000
_S_IFMT = stat.S_IFMT


class WalkError(Exception):
    """A root or parent path cannot be opened safely; the message is one line."""


# ---------------------------------------------------------------- results


@dataclass(slots=True)
class RemoveStats:
    """What one removal did (or, dry-run, would do). Paths are relative to the walked root."""

    files: int = 0  # non-directories removed
    dirs: int = 0  # directories removed
    # Space freed: st_blocks * 512 of removed files whose last link went; remove_tree's real
    # runs measure the filesystem's free space before and after instead (approximate).
    bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relpath, why)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (relpath, strerror)
    listed: list[str] = field(default_factory=list)  # first max_listed removed relpaths
    more_skipped: int = 0  # skipped beyond MAX_REPORTED
    more_errors: int = 0
    removed_root: bool = False  # remove_tree: the named directory itself is gone
    raced: int = 0  # entries that changed between listing and acting (swaps, vanishing)

    def skip(self, rel: str, why: str) -> None:
        if len(self.skipped) < MAX_REPORTED:
            self.skipped.append((rel, why))
        else:
            self.more_skipped += 1

    def error(self, rel: str, why: str) -> None:
        if len(self.errors) < MAX_REPORTED:
            self.errors.append((rel, why))
        else:
            self.more_errors += 1


@dataclass(frozen=True, slots=True)
class Guards:
    """Files that look like garbage but are in use, read once per sweep."""

    locked: frozenset[tuple[int, int]] = frozenset()  # (st_dev, st_ino) locked in /proc/locks
    socket_names: frozenset[str] = frozenset()  # basenames of bound unix sockets


def parse_locks(text: str) -> frozenset[tuple[int, int]]:
    """(st_dev, st_ino) of every lock (and waiter) in /proc/locks text ("maj:min:ino", hex dev).

    The device is the superblock's: right for tmpfs and ext4/xfs, not for btrfs subvolumes
    (their st_dev is an anonymous one), where a held lock would go unseen.
    """
    out = set()
    for line in text.splitlines():
        for tok in line.split():
            parts = tok.split(":")
            if len(parts) == 3 and parts[2].isdigit():
                with contextlib.suppress(ValueError):
                    out.add((os.makedev(int(parts[0], 16), int(parts[1], 16)), int(parts[2])))
                break
    return frozenset(out)


def parse_unix_sockets(text: str) -> frozenset[str]:
    """Basenames of the filesystem unix sockets in /proc/net/unix text (abstract ones skipped)."""
    out = set()
    for line in text.splitlines()[1:]:
        cols = line.split(None, 7)
        if len(cols) == 8 and not cols[7].startswith("@"):
            out.add(cols[7].rstrip("/").rsplit("/", 1)[-1])
    return frozenset(out)


def read_guards(proc: str = "/proc") -> Guards:
    """The locks and bound sockets of the node now (only this network namespace's sockets)."""

    def read(path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    return Guards(parse_locks(read(f"{proc}/locks")), parse_unix_sockets(read(f"{proc}/net/unix")))


# ---------------------------------------------------------------- statx on an open fd


class _Statx:
    """statx(fd, "", AT_EMPTY_PATH) through libc: identity and mount id of an open directory."""

    def __init__(self) -> None:
        self.buf = ctypes.create_string_buffer(256)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self.fn = libc.statx
            self.fn.argtypes = [
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.c_uint,
                ctypes.c_void_p,
            ]
        except (AttributeError, OSError):
            self.fn = None

    def __call__(self, fd: int) -> tuple[int, int, int | None]:
        """(st_dev, st_ino, mount id or None when the kernel cannot say)."""
        if self.fn is not None:
            rc = self.fn(
                fd,
                b"",
                _AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW,
                _STATX_BASIC | _STATX_MNT_ID,
                self.buf,
            )
            if rc == 0:
                raw = self.buf.raw
                mask = struct.unpack_from("=I", raw, 0)[0]
                ino = struct.unpack_from("=Q", raw, 32)[0]
                major, minor = struct.unpack_from("=II", raw, 136)
                mnt = struct.unpack_from("=Q", raw, 144)[0] if mask & _STATX_MNT_ID else None
                return os.makedev(major, minor), ino, mnt
        st = os.fstat(fd)
        return st.st_dev, st.st_ino, None


def _unescape(field_: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for space, ...)."""
    if "\\" not in field_:
        return field_
    return field_.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def mount_points(mountinfo: str) -> list[str]:
    """Mount point paths in /proc/self/mountinfo text, in mount order."""
    out = []
    for line in mountinfo.splitlines():
        cols = line.split()
        if len(cols) > 4:
            out.append(_unescape(cols[4]))
    return out


def _read_mountinfo() -> str:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return f.read()


# ---------------------------------------------------------------- opening a path safely


def open_dir_path(path: str) -> int:
    """An O_RDONLY fd of directory `path`, opened component by component from / with
    O_NOFOLLOW: a symlink anywhere in the path is refused (WalkError), never followed."""
    if not path.startswith("/"):
        raise WalkError(f"{path}: not an absolute path")
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise WalkError(f"{path}: '.' or '..' in path")
    fd = os.open("/", O_DIR)
    try:
        for i, part in enumerate(parts):
            try:
                nfd = os.open(part, O_DIR, dir_fd=fd)
            except OSError as e:
                where = "/" + "/".join(parts[: i + 1])
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise WalkError(f"{where}: not a directory (or a symlink)") from None
                raise WalkError(f"{where}: {e.strerror}") from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


# ---------------------------------------------------------------- the walker


class _Frame:
    """One open directory on the walk's explicit stack."""

    __slots__ = ("clean", "dev", "fd", "ino", "mode", "name", "parent", "pending", "removable")

    def __init__(
        self,
        parent: _Frame | None,
        name: str,
        fd: int | None,
        dev: int,
        ino: int,
        mode: int,
        removable: bool,
    ) -> None:
        self.parent = parent
        self.name = name
        self.fd = fd
        self.dev = dev
        self.ino = ino
        self.mode = mode
        self.removable = removable  # remove this dir itself once it is empty
        self.clean = True  # every entry in it has been removed (or would be)
        self.pending: list[tuple[str, int, int, int, bool]] = []  # subdirs to visit

    def rel(self) -> str:
        """Path below the walk's start; deep paths keep only their last REL_DEPTH names."""
        names = []
        f: _Frame | None = self
        while f is not None and f.parent is not None:
            if len(names) == REL_DEPTH:
                names.append("…")
                break
            names.append(f.name)
            f = f.parent
        return "/".join(reversed(names)) or "."


class _Walker:
    """Remove a tree (everything) or one uid's old entries, from one open parent fd."""

    def __init__(
        self,
        *,
        dry_run: bool,
        uid: int | None,
        cutoff: float | None,
        guards: Guards,
        max_listed: int,
        root_dev: int,
        root_mnt: int | None,
        mounts: frozenset[str] | None,
        base_path: str,
    ) -> None:
        self.dry_run = dry_run
        self.uid = uid  # None: remove everything; else only entries owned by uid
        self.cutoff = cutoff  # entries whose mtime and ctime are both before this
        self.guards = guards
        self.max_listed = max_listed
        self.root_dev = root_dev
        self.root_mnt = root_mnt
        self.mounts = mounts  # mount point paths, only when statx gives no mount id
        self.base_path = base_path
        self.stats = RemoveStats()
        self.statx = _Statx()
        self.open_fds = 0

    # -- helpers

    def _rel(self, frame: _Frame, name: str) -> str:
        r = frame.rel()
        return name if r == "." else f"{r}/{name}"

    def _list(self, frame: _Frame, name: str) -> None:
        if len(self.stats.listed) < self.max_listed:
            self.stats.listed.append(self._rel(frame, name))

    def _open_child(self, frame: _Frame, name: str, dev: int, ino: int) -> int | None:
        """fd of subdir `name` of frame, verified to be the (dev, ino) listed, else None."""
        assert frame.fd is not None
        try:
            fd = os.open(name, O_DIR, dir_fd=frame.fd)
        except OSError as e:
            if e.errno == errno.EACCES and not self.dry_run:
                fd = self._open_after_chmod(frame, name, dev, ino)
                if fd is None:
                    return None
            elif e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                self.stats.raced += 1
                self.stats.skip(self._rel(frame, name), "changed during the walk")
                return None
            else:
                self.stats.error(self._rel(frame, name), e.strerror or str(e))
                return None
        why = self._check_dir(fd, dev, ino, lambda: self._rel(frame, name))
        if why:
            os.close(fd)
            self.stats.skip(self._rel(frame, name), why)
            return None
        return fd

    def _check_dir(self, fd: int, dev: int, ino: int, rel) -> str:
        """Why the open dir fd must not be walked ('' when it may)."""
        fdev, fino, mnt = self.statx(fd)
        if (fdev, fino) != (dev, ino):
            self.stats.raced += 1
            return "replaced during the walk"
        if fdev != self.root_dev:
            return "other filesystem"
        if mnt is not None and self.root_mnt is not None:
            if mnt != self.root_mnt:
                return "mount point"
        elif self.mounts is not None and f"{self.base_path}/{rel()}" in self.mounts:
            return "mount point"
        return ""

    def _open_after_chmod(self, frame: _Frame, name: str, dev: int, ino: int) -> int | None:
        """Open a dir the owner made unreadable (only matters without CAP_DAC_OVERRIDE)."""
        assert frame.fd is not None
        rel = self._rel(frame, name)
        try:
            pfd = os.open(name, O_DIR_PATH, dir_fd=frame.fd)
        except OSError as e:
            self.stats.error(rel, e.strerror or str(e))
            return None
        try:
            st = os.fstat(pfd)
            if (st.st_dev, st.st_ino) != (dev, ino):
                self.stats.raced += 1
                self.stats.skip(rel, "replaced during the walk")
                return None
            # fchmod refuses O_PATH fds; the /proc magic link reaches exactly this inode.
            os.chmod(f"/proc/self/fd/{pfd}", stat.S_IMODE(st.st_mode) | 0o700)
            return os.open(name, O_DIR, dir_fd=frame.fd)
        except OSError as e:
            self.stats.error(rel, e.strerror or str(e))
            return None
        finally:
            os.close(pfd)

    def _retry_writable(self, frame: _Frame, op, name: str) -> None:
        """Make frame's dir u+rwx through its fd (a user's chmod 0500) and run op again."""
        assert frame.fd is not None
        os.fchmod(frame.fd, stat.S_IMODE(frame.mode) | 0o700)
        frame.mode |= 0o700
        op(name, dir_fd=frame.fd)

    def _remove(self, frame: _Frame, op, name: str) -> bool:
        """unlink/rmdir name in frame; False (and reported) when it did not go."""
        assert frame.fd is not None
        if self.dry_run:
            return True
        try:
            op(name, dir_fd=frame.fd)
            return True
        except FileNotFoundError:
            self.stats.raced += 1
            return False
        except OSError as e:
            # A user's chmod 0500 stops us only without CAP_DAC_OVERRIDE; never chmod the
            # walk's own parent (e.g. /tmp itself): only directories being emptied.
            if (
                e.errno in (errno.EACCES, errno.EPERM)
                and frame.parent is not None
                and frame.mode & 0o300 != 0o300
            ):
                try:
                    self._retry_writable(frame, op, name)
                    return True
                except OSError as e2:
                    e = e2
            if e.errno == errno.EBUSY:
                self.stats.skip(self._rel(frame, name), "mount point")
            elif e.errno == errno.ENOTEMPTY:
                self.stats.raced += 1
                self.stats.skip(self._rel(frame, name), "not empty (changed during the walk)")
            else:
                self.stats.error(self._rel(frame, name), e.strerror or str(e))
            return False

    # -- the walk

    def scan_all(self, frame: _Frame) -> None:
        """scan() for remove_tree: everything goes, so non-directories need no stat at all.

        The dirent type says what an entry is; only directories are lstat'ed (for the
        identity check before opening), plus anything whose type the filesystem left unknown.
        """
        assert frame.fd is not None
        stats = self.stats
        fd = frame.fd
        locked = self.guards.locked
        check_locks = any(dev == frame.dev for dev, _ in locked)
        socks = self.guards.socket_names
        unlink = os.unlink
        dry = self.dry_run
        with os.scandir(fd) as it:
            for entry in it:
                name = entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        if stat.S_ISDIR(st.st_mode):
                            if st.st_dev != self.root_dev:
                                frame.clean = False
                                stats.skip(self._rel(frame, name), "other filesystem")
                            else:
                                frame.pending.append((name, st.st_dev, st.st_ino, st.st_mode, True))
                            continue
                        fmt = stat.S_IFMT(st.st_mode)
                    elif entry.is_file(follow_symlinks=False):
                        fmt = stat.S_IFREG
                    elif entry.is_symlink():
                        fmt = stat.S_IFLNK
                    else:  # sockets, fifos, devices: rare, ask the inode itself
                        fmt = stat.S_IFMT(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
                except FileNotFoundError:
                    stats.raced += 1
                    continue
                except OSError as e:
                    stats.error(self._rel(frame, name), e.strerror or str(e))
                    frame.clean = False
                    continue
                why = ""
                if fmt == stat.S_IFREG:
                    if check_locks:
                        try:
                            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        except OSError:
                            st = None
                        if st is None or (st.st_dev, st.st_ino) in locked:
                            why = "locked"
                    if dry and not why:
                        try:
                            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                            if st.st_nlink <= 1:
                                stats.bytes += st.st_blocks * 512
                        except OSError:
                            pass
                elif fmt == stat.S_IFSOCK:
                    if name in socks:
                        why = "socket in use"
                elif fmt == stat.S_IFIFO:
                    why = "fifo"
                elif fmt != stat.S_IFLNK:
                    why = "device node"
                if why:
                    frame.clean = False
                    stats.skip(self._rel(frame, name), why)
                    continue
                if not dry:
                    try:
                        unlink(name, dir_fd=fd)
                    except FileNotFoundError:
                        stats.raced += 1
                        continue
                    except OSError:
                        if not self._remove(frame, unlink, name):
                            frame.clean = False
                            continue
                stats.files += 1
                if len(stats.listed) < self.max_listed:
                    self._list(frame, name)
        frame.pending.reverse()

    def scan(self, frame: _Frame, top: bool) -> None:
        """Remove frame's wanted non-directories now; queue its wanted subdirectories."""
        assert frame.fd is not None
        stats = self.stats
        guards = self.guards
        locked = guards.locked
        socks = guards.socket_names
        root_dev = self.root_dev
        uid = self.uid
        cutoff = self.cutoff
        fd = frame.fd
        lstat = os.stat
        unlink = os.unlink
        dry = self.dry_run
        with os.scandir(fd) as it:
            for entry in it:
                name = entry.name
                try:
                    st = lstat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    stats.raced += 1
                    continue
                except OSError as e:
                    stats.error(self._rel(frame, name), e.strerror or str(e))
                    frame.clean = False
                    continue
                if uid is not None and st.st_uid != uid:
                    frame.clean = False
                    if not top:
                        stats.skip(self._rel(frame, name), f"owned by uid {st.st_uid}")
                    continue
                mode = st.st_mode
                fmt = _S_IFMT(mode)
                if fmt == stat.S_IFDIR:
                    if st.st_dev != root_dev:  # never even open it (it may be an automount)
                        frame.clean = False
                        stats.skip(self._rel(frame, name), "other filesystem")
                        continue
                    old = cutoff is None or (st.st_mtime < cutoff and st.st_ctime < cutoff)
                    frame.pending.append((name, st.st_dev, st.st_ino, mode, old))
                    continue
                if cutoff is not None and (st.st_mtime >= cutoff or st.st_ctime >= cutoff):
                    frame.clean = False
                    stats.skip(self._rel(frame, name), "younger than min_age")
                    continue
                why = ""
                if st.st_dev != root_dev:
                    why = "mount point"
                elif fmt == stat.S_IFREG:
                    if locked and (st.st_dev, st.st_ino) in locked:
                        why = "locked"
                elif fmt == stat.S_IFLNK:
                    pass
                elif fmt == stat.S_IFSOCK:
                    if name in socks:
                        why = "socket in use"
                elif fmt == stat.S_IFIFO:
                    why = "fifo"
                else:
                    why = "device node"
                if why:
                    frame.clean = False
                    stats.skip(self._rel(frame, name), why)
                    continue
                if dry:
                    ok = True
                else:
                    try:
                        unlink(name, dir_fd=fd)
                        ok = True
                    except FileNotFoundError:
                        stats.raced += 1
                        continue
                    except OSError:
                        ok = self._remove(frame, unlink, name)
                if ok:
                    stats.files += 1
                    if st.st_nlink <= 1:
                        stats.bytes += st.st_blocks * 512
                    if len(stats.listed) < self.max_listed:
                        self._list(frame, name)
                else:
                    frame.clean = False
        frame.pending.reverse()  # pop() then visits subdirs in listing order

    def run(self, root: _Frame, top_is_root: bool) -> None:
        """Walk from an already opened and verified root frame, depth first, no recursion."""
        stack = [root]
        self.open_fds = 1
        everything = self.uid is None and self.cutoff is None
        if everything:
            self.scan_all(root)
        else:
            self.scan(root, top_is_root)
        while stack:
            frame = stack[-1]
            if frame.pending:
                name, dev, ino, mode, old = frame.pending.pop()
                if frame.fd is None and not self._reopen(stack):
                    return
                fd = self._open_child(frame, name, dev, ino)
                if fd is None:
                    frame.clean = False
                    continue
                child = _Frame(frame, name, fd, dev, ino, mode, old)
                stack.append(child)
                self.open_fds += 1
                if self.open_fds > MAX_OPEN_FDS:
                    self._close_oldest(stack)
                if everything:
                    self.scan_all(child)
                else:
                    self.scan(child, False)
                continue
            stack.pop()
            parent = frame.parent
            if parent is None or not stack:
                self._close(frame)
                continue
            if parent.fd is None and not self._reopen_parent(frame):
                self._close(frame)
                self._abandon(stack)
                return
            self._close(frame)
            if frame.clean and frame.removable and self._remove(parent, os.rmdir, frame.name):
                self.stats.dirs += 1
                if len(self.stats.listed) < self.max_listed:
                    self.stats.listed.append(frame.rel() + "/")
            else:
                parent.clean = False

    def _close(self, frame: _Frame) -> None:
        if frame.fd is not None:
            os.close(frame.fd)
            frame.fd = None
            self.open_fds -= 1

    def _close_oldest(self, stack: list[_Frame]) -> None:
        # Keep the root (index 0, owned by the caller's setup) and the newest frames open.
        for f in stack[1:]:
            if f.fd is not None:
                self._close(f)
                return

    def _reopen(self, stack: list[_Frame]) -> bool:
        """Unreachable: a frame with pending work is the top of the stack and is open."""
        self.stats.error(stack[-1].rel(), "internal: directory fd closed")
        return False

    def _reopen_parent(self, frame: _Frame) -> bool:
        """Re-open frame's parent through '..' of frame's fd, verified by (dev, ino)."""
        parent = frame.parent
        assert parent is not None and frame.fd is not None
        try:
            fd = os.open("..", O_DIR, dir_fd=frame.fd)
        except OSError as e:
            self.stats.error(parent.rel(), e.strerror or str(e))
            return False
        fdev, fino, _ = self.statx(fd)
        if (fdev, fino) != (parent.dev, parent.ino):
            os.close(fd)
            self.stats.raced += 1
            self.stats.error(frame.rel(), "moved out of its directory during the walk: stopped")
            return False
        parent.fd = fd
        self.open_fds += 1
        return True

    def _abandon(self, stack: list[_Frame]) -> None:
        for f in stack:
            f.clean = False
            self._close(f)
        stack.clear()


def _free_bytes(fd: int) -> int:
    v = os.fstatvfs(fd)
    return v.f_bfree * v.f_frsize


def _mounts_if_needed(mnt: int | None) -> frozenset[str] | None:
    return frozenset(mount_points(_read_mountinfo())) if mnt is None else None


# ---------------------------------------------------------------- public entry points


def remove_tree(
    parent: str | int,
    name: str,
    *,
    root_dev: int | None = None,
    dry_run: bool,
    guards: Guards | None = None,
    max_listed: int = 20,
    owners: Iterable[int] | None = None,
    allow_own_mount: bool = False,
) -> RemoveStats:
    """Remove directory `name` inside `parent` (a path opened component-wise, or a dir fd).

    Stays on `root_dev` (default: the parent's device) and the parent's mount; `owners`
    (when given) must include the directory's owner, else nothing is touched. With
    `allow_own_mount` the directory may itself be a mount (job_container dry-runs).
    Raises WalkError when the parent cannot be opened safely.
    """
    if not name or "/" in name or name in (".", ".."):
        raise WalkError(f"{name!r}: not a single path component")
    pfd = open_dir_path(parent) if isinstance(parent, str) else os.dup(parent)
    base = parent if isinstance(parent, str) else f"/proc/self/fd/{parent}"
    stats = RemoveStats()
    try:
        statx = _Statx()
        pdev, pino, pmnt = statx(pfd)
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return stats
        if not stat.S_ISDIR(st.st_mode):
            stats.skip(name, "not a directory")
            return stats
        if owners is not None and st.st_uid not in set(owners):
            stats.skip(name, f"owned by uid {st.st_uid}")
            return stats
        dev = pdev if root_dev is None else root_dev
        try:
            fd = os.open(name, O_DIR, dir_fd=pfd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                stats.raced += 1
                stats.skip(name, "changed before it could be opened")
            else:
                stats.error(name, e.strerror or str(e))
            return stats
        fdev, fino, fmnt = statx(fd)
        root_mnt = fmnt if allow_own_mount else pmnt
        why = ""
        if (fdev, fino) != (st.st_dev, st.st_ino):
            why = "replaced before it could be opened"
            stats.raced += 1
        elif fdev != dev:
            why = "other filesystem"
        elif fmnt is not None and pmnt is not None and fmnt != pmnt and not allow_own_mount:
            why = "mount point"
        if why:
            os.close(fd)
            stats.skip(name, why)
            return stats
        walker = _Walker(
            dry_run=dry_run,
            uid=None,
            cutoff=None,
            guards=guards if guards is not None else read_guards(),
            max_listed=max_listed,
            root_dev=dev,
            root_mnt=root_mnt,
            mounts=_mounts_if_needed(root_mnt),
            base_path=f"{base}/{name}",
        )
        walker.stats = stats
        parent_frame = _Frame(None, "", pfd, pdev, pino, 0, False)
        top = _Frame(parent_frame, name, fd, fdev, fino, st.st_mode, False)
        free_before = _free_bytes(fd)
        try:
            walker.run(top, False)
        finally:
            if top.fd is not None:
                os.close(top.fd)
        if top.clean and walker._remove(parent_frame, os.rmdir, name):
            stats.dirs += 1
            stats.removed_root = True
        if not dry_run:
            # Files are not stat'ed one by one (that halves the speed): count what the
            # filesystem got back instead. Other writers on it make this approximate.
            stats.bytes = max(0, _free_bytes(pfd) - free_before)
        return stats
    finally:
        os.close(pfd)


def remove_owned_files(
    root: str,
    uid: int,
    *,
    min_age: float,
    now: float,
    dry_run: bool,
    max_listed: int = 20,
    guards: Guards | None = None,
) -> RemoveStats:
    """Remove what `uid` owns in `root` whose mtime and ctime are older than now - min_age.

    Directories owned by uid are descended (whatever their age) and removed only once
    empty and old; entries of other uids are left, and the root itself is never removed.
    Raises WalkError when root cannot be opened safely.
    """
    fd = open_dir_path(root)
    statx = _Statx()
    dev, ino, mnt = statx(fd)
    walker = _Walker(
        dry_run=dry_run,
        uid=uid,
        cutoff=now - min_age,
        guards=guards if guards is not None else read_guards(),
        max_listed=max_listed,
        root_dev=dev,
        root_mnt=mnt,
        mounts=_mounts_if_needed(mnt),
        base_path=root.rstrip("/"),
    )
    frame = _Frame(None, "", fd, dev, ino, 0o1777, False)
    try:
        walker.run(frame, True)
    finally:
        if frame.fd is not None:
            os.close(frame.fd)
    return walker.stats


# ---------------------------------------------------------------- job_container leftovers


def mounts_below(path: str, mountinfo: str) -> list[str]:
    """Mount points at `path` or under it, deepest (and latest) first."""
    path = path.rstrip("/")
    found = [m for m in mount_points(mountinfo) if m == path or m.startswith(path + "/")]
    return list(reversed(found))


def detach_mounts(path: str, *, dry_run: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """Lazily unmount everything mounted at or below `path`: (detached, [(mount, error)])."""
    done: list[str] = []
    errors: list[tuple[str, str]] = []
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(64):  # stacked mounts on one point come off one per pass
        todo = [m for m in mounts_below(path, _read_mountinfo()) if m not in dict(errors)]
        if not todo:
            break
        if dry_run:
            return todo, errors
        for m in todo:
            if libc.umount2(m.encode(), MNT_DETACH | UMOUNT_NOFOLLOW) == 0:
                done.append(m)
            else:
                err = ctypes.get_errno()
                if err != errno.EINVAL:  # EINVAL: already gone with its parent
                    errors.append((m, os.strerror(err)))
    return done, errors


def container_nodes(base: str) -> list[str]:
    """Names of the real subdirectories of a job_container BasePath (its node names)."""
    try:
        fd = open_dir_path(base)
    except (WalkError, OSError):
        return []
    try:
        with os.scandir(fd) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    finally:
        os.close(fd)


# ---------------------------------------------------------------- executing a plan


@dataclass(frozen=True, slots=True)
class CleanupOutcome:
    """One plan item carried out (or, dry-run, checked): the facts an audit record needs.

    `result`: DONE/WOULD removed something, GONE nothing there to remove, SKIPPED only
    things that must stay, FAILED an error (counts still say what went).
    """

    kind: str  # "job_dir" or "loose"
    uid: int
    path: str
    result: Result
    job_id: str | None = None
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    listed: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()  # "relpath: why", capped at max_listed
    errors: tuple[str, ...] = ()  # "relpath: strerror", capped at max_listed
    detail: str = ""


def _outcome(
    kind: str,
    uid: int,
    path: str,
    job_id: str | None,
    s: RemoveStats,
    dry_run: bool,
    cap: int,
    detail: str = "",
) -> CleanupOutcome:
    if s.errors:
        res = Result.FAILED
    elif s.files or s.dirs:
        res = Result.WOULD if dry_run else Result.DONE
    elif s.skipped:
        res = Result.SKIPPED
    else:
        res = Result.GONE
    notes = [detail] if detail else []
    if s.more_skipped or s.more_errors:
        notes.append(f"{s.more_skipped} more skipped, {s.more_errors} more errors")
    return CleanupOutcome(
        kind=kind,
        uid=uid,
        path=path,
        result=res,
        job_id=job_id,
        files=s.files,
        dirs=s.dirs,
        bytes=s.bytes,
        listed=tuple(s.listed[:cap]),
        skipped=tuple(f"{p}: {w}" for p, w in s.skipped[:cap]),
        errors=tuple(f"{p}: {w}" for p, w in s.errors[:cap]),
        detail="; ".join(notes),
    )


def _job_dir(item: JobDirItem, dry_run: bool, guards: Guards, cap: int) -> CleanupOutcome:
    parent, _, name = item.path.rstrip("/").rpartition("/")
    owners = (item.uid, 0)
    detail = ""
    try:
        if item.container:
            try:
                os.lstat(item.path)  # root-only BasePath: a plain path is fine for a probe
            except FileNotFoundError:
                return CleanupOutcome("job_dir", item.uid, item.path, Result.GONE, item.job_id)
            # umount2 takes a path: refuse one that runs through a symlink (UMOUNT_NOFOLLOW
            # guards only the last component).
            os.close(open_dir_path(item.path))
            detached, errs = detach_mounts(item.path, dry_run=dry_run)
            if errs:
                s = RemoveStats(errors=[(m, e) for m, e in errs])
                return _outcome(
                    "job_dir",
                    item.uid,
                    item.path,
                    item.job_id,
                    s,
                    dry_run,
                    cap,
                    "could not unmount",
                )
            if detached:
                verb = "would detach" if dry_run else "detached"
                detail = f"{verb} {len(detached)} mounts: {' '.join(detached[:cap])}"
        s = remove_tree(
            parent or "/",
            name,
            dry_run=dry_run,
            guards=guards,
            max_listed=cap,
            owners=owners,
            allow_own_mount=item.container and dry_run,
        )
    except WalkError as e:
        s = RemoveStats(errors=[(item.path, str(e))])
    except OSError as e:
        s = RemoveStats(errors=[(item.path, e.strerror or str(e))])
    return _outcome("job_dir", item.uid, item.path, item.job_id, s, dry_run, cap, detail)


def execute_cleanup(
    plan: CleanupPlan, dry_run: bool, guards: Guards | None = None
) -> list[CleanupOutcome]:
    """Carry out (or, dry-run, walk without removing) every item of `plan`, one outcome each
    (per root for loose files). One failing item never stops the others."""
    g = guards if guards is not None else read_guards()
    cap = plan.max_listed
    out: list[CleanupOutcome] = []
    for item in plan.job_dirs:
        out.append(_job_dir(item, dry_run, g, cap))
    for loose in plan.loose:
        out.extend(_loose(loose, plan, dry_run, g, cap))
    return out


def _loose(
    item: LooseFilesItem, plan: CleanupPlan, dry_run: bool, g: Guards, cap: int
) -> list[CleanupOutcome]:
    out = []
    for root in item.roots:
        try:
            s = remove_owned_files(
                root,
                item.uid,
                min_age=plan.min_age,
                now=plan.now,
                dry_run=dry_run,
                max_listed=cap,
                guards=g,
            )
        except WalkError as e:
            s = RemoveStats(errors=[(root, str(e))])
        except OSError as e:
            s = RemoveStats(errors=[(root, e.strerror or str(e))])
        out.append(_outcome("loose", item.uid, root, None, s, dry_run, cap))
    return out

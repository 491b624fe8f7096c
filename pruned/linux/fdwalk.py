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

import errno
import os
import stat
from dataclasses import dataclass, field

from pruned.linux.dirfd import O_DIR, O_DIR_PATH, Statx
from pruned.linux.guards import Guards

MAX_OPEN_FDS = 256  # ancestors beyond this are closed and re-opened via ".." (then verified)
REL_DEPTH = 24  # names kept in a reported relative path (deep trees stay readable)
MAX_REPORTED = 1000  # skipped/errors kept per call; the rest are only counted
# File types as plain ints: the scan loop compares them per entry.
_S_IFMT_BITS = 0o170000
_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG
_S_IFLNK = stat.S_IFLNK
_S_IFSOCK = stat.S_IFSOCK
_S_IFIFO = stat.S_IFIFO


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


# ---------------------------------------------------------------- the walker


class Frame:
    """One open directory on the walk's explicit stack."""

    __slots__ = ("clean", "dev", "fd", "ino", "mode", "name", "parent", "pending", "removable")

    def __init__(
        self,
        parent: Frame | None,
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
        f: Frame | None = self
        while f is not None and f.parent is not None:
            if len(names) == REL_DEPTH:
                names.append("…")
                break
            names.append(f.name)
            f = f.parent
        return "/".join(reversed(names)) or "."


class Walker:
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
        self.statx = Statx()
        self.open_fds = 0
        # remove_tree (no uid, no cutoff) takes non-directories by their dirent type;
        # anything else must lstat every entry for its owner and age.
        self.need_stat = uid is not None or cutoff is not None
        # Per-file sizes: real remove_tree runs measure free space instead (see remove_tree).
        self.sizes = self.need_stat or dry_run
        # Every walked directory is on root_dev, so one check serves the whole walk.
        self.check_locks = any(dev == root_dev for dev, _ in guards.locked)

    # -- helpers

    def _rel(self, frame: Frame, name: str) -> str:
        r = frame.rel()
        return name if r == "." else f"{r}/{name}"

    def _list(self, frame: Frame, name: str) -> None:
        if len(self.stats.listed) < self.max_listed:
            self.stats.listed.append(self._rel(frame, name))

    def _open_child(self, frame: Frame, name: str, dev: int, ino: int) -> int | None:
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

    def _open_after_chmod(self, frame: Frame, name: str, dev: int, ino: int) -> int | None:
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

    def _retry_writable(self, frame: Frame, op, name: str) -> None:
        """Make frame's dir u+rwx through its fd (a user's chmod 0500) and run op again."""
        assert frame.fd is not None
        os.fchmod(frame.fd, stat.S_IMODE(frame.mode) | 0o700)
        frame.mode |= 0o700
        op(name, dir_fd=frame.fd)

    def _remove(self, frame: Frame, op, name: str) -> bool:
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

    def scan(self, frame: Frame, top: bool) -> None:
        """Remove frame's wanted non-directories now; queue its wanted subdirectories.

        With `need_stat` (remove_owned_files) every entry is lstat'ed for owner and age.
        Without it (remove_tree: everything goes) an entry goes by its dirent type and is
        lstat'ed only when it is a directory (the identity check before opening), a
        regular file whose inode a lock on this device or a dry-run byte count needs, or
        a socket, fifo or device (rare). Skip reasons, counts and listing are shared.
        `top`: the walk's own root (e.g. /tmp), whose other-uid entries are not reported.
        """
        assert frame.fd is not None
        stats = self.stats
        fd = frame.fd
        pending = frame.pending
        need_stat = self.need_stat
        sizes = self.sizes
        check_locks = self.check_locks
        locked = self.guards.locked
        socks = self.guards.socket_names
        root_dev = self.root_dev
        uid = self.uid
        cutoff = self.cutoff
        max_listed = self.max_listed
        dry = self.dry_run
        lstat = os.stat
        unlink = os.unlink
        st: os.stat_result | None
        with os.scandir(fd) as it:
            for entry in it:
                name = entry.name
                try:
                    if need_stat or entry.is_dir(follow_symlinks=False):
                        st = lstat(name, dir_fd=fd, follow_symlinks=False)
                        fmt = st.st_mode & _S_IFMT_BITS
                    elif entry.is_file(follow_symlinks=False):
                        st = None
                        fmt = _S_IFREG
                    elif entry.is_symlink():
                        st = None
                        fmt = _S_IFLNK
                    else:  # sockets, fifos, devices: rare, ask the inode itself
                        st = lstat(name, dir_fd=fd, follow_symlinks=False)
                        fmt = st.st_mode & _S_IFMT_BITS
                except FileNotFoundError:
                    stats.raced += 1
                    continue
                except OSError as e:
                    stats.error(self._rel(frame, name), e.strerror or str(e))
                    frame.clean = False
                    continue
                # uid or cutoff set means need_stat: st is there whenever they are read.
                if uid is not None and st.st_uid != uid:
                    frame.clean = False
                    if not top:
                        stats.skip(self._rel(frame, name), f"owned by uid {st.st_uid}")
                    continue
                if fmt == _S_IFDIR:
                    if st.st_dev != root_dev:  # never even open it (it may be an automount)
                        frame.clean = False
                        stats.skip(self._rel(frame, name), "other filesystem")
                        continue
                    old = cutoff is None or (st.st_mtime < cutoff and st.st_ctime < cutoff)
                    pending.append((name, st.st_dev, st.st_ino, st.st_mode, old))
                    continue
                if cutoff is not None and (st.st_mtime >= cutoff or st.st_ctime >= cutoff):
                    frame.clean = False
                    stats.skip(self._rel(frame, name), "younger than min_age")
                    continue
                why = ""
                if need_stat and st.st_dev != root_dev:
                    # A file mount (remove_tree learns it from unlink's EBUSY instead).
                    why = "mount point"
                elif fmt == _S_IFREG:
                    # try/except, not contextlib.suppress: this runs per file.
                    if check_locks:
                        if st is None:
                            try:
                                st = lstat(name, dir_fd=fd, follow_symlinks=False)
                            except OSError:
                                st = None
                        if st is None or (st.st_dev, st.st_ino) in locked:
                            why = "locked"  # an inode we cannot see may be locked: keep it
                    elif sizes and st is None:
                        try:
                            st = lstat(name, dir_fd=fd, follow_symlinks=False)
                        except OSError:
                            st = None  # then only its size goes uncounted
                elif fmt == _S_IFSOCK:
                    if name in socks:
                        why = "socket in use"
                elif fmt == _S_IFIFO:
                    why = "fifo"
                elif fmt != _S_IFLNK:
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
                # Without need_stat only regular files count (a socket's or raced-in
                # symlink's stat was for its type, not its size).
                if st is not None and sizes and st.st_nlink <= 1 and (need_stat or fmt == _S_IFREG):
                    stats.bytes += st.st_blocks * 512
                if len(stats.listed) < max_listed:
                    self._list(frame, name)
        pending.reverse()  # pop() then visits subdirs in listing order

    def run(self, root: Frame, top_is_root: bool) -> None:
        """Walk from an already opened and verified root frame, depth first, no recursion.

        The top of the stack is always open: a pushed child is, _close_oldest never closes
        the top, and a popped frame's parent is re-opened before the frame is closed.
        """
        stack = [root]
        self.open_fds = 1
        self.scan(root, top_is_root)
        while stack:
            frame = stack[-1]
            if frame.pending:
                name, dev, ino, mode, old = frame.pending.pop()
                fd = self._open_child(frame, name, dev, ino)
                if fd is None:
                    frame.clean = False
                    continue
                child = Frame(frame, name, fd, dev, ino, mode, old)
                stack.append(child)
                self.open_fds += 1
                if self.open_fds > MAX_OPEN_FDS:
                    self._close_oldest(stack)
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

    def _close(self, frame: Frame) -> None:
        if frame.fd is not None:
            os.close(frame.fd)
            frame.fd = None
            self.open_fds -= 1

    def _close_oldest(self, stack: list[Frame]) -> None:
        # Keep the root (index 0, owned by the caller's setup) and the top (the frame being
        # scanned, whose pending subdirs are opened through its fd) open.
        for f in stack[1:-1]:
            if f.fd is not None:
                self._close(f)
                return

    def _reopen_parent(self, frame: Frame) -> bool:
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

    def _abandon(self, stack: list[Frame]) -> None:
        for f in stack:
            f.clean = False
            self._close(f)
        stack.clear()

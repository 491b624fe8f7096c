"""Remove files in directories users can write to, by directory file descriptor only.

Every directory is opened with O_NOFOLLOW relative to the fd of its already-verified parent,
then identified with statx on the open fd and compared with the lstat seen while listing the
parent: a directory swapped for a symlink fails the open (ELOOP), one swapped for another
directory fails the (st_dev, st_ino) check. No path string through a user-writable
directory is ever resolved, so a symlink race (CVE-2013-4392, CVE-2018-6954, bpo-4489)
cannot point a removal outside the tree. The walk stays on one mount: other filesystems,
bind mounts of the same filesystem (different mount id) and file mounts are skipped.

Cost is linear in everything a user controls. Depth: at most MAX_OPEN_FDS directory fds are
open (the oldest ancestors are closed and, when the walk climbs back, re-opened through '..'
of their child and verified by (st_dev, st_ino): a directory moved away meanwhile stops the
walk instead of redirecting it); no path is built per directory, only for the few entries a
report keeps (head and tail names, see REL_HEAD/REL_TAIL). Width: entries stream from
os.scandir on the fd; the subdirectories waiting in one directory are packed (about
len(name) + 20 bytes each). Names are str with surrogateescape: lossless for any bytes.
Kept on purpose: FIFOs, device nodes, unix sockets someone bound (listed in /proc/net/unix),
and files with a lock in /proc/locks.
"""

from __future__ import annotations

import errno
import os
import stat
from array import array
from dataclasses import dataclass, field

from pruned.linux.dirfd import O_DIR, O_DIR_PATH, Statx
from pruned.linux.guards import Guards

MAX_OPEN_FDS = 256  # ancestors beyond this are closed and re-opened via ".." (then verified)
REL_HEAD = 4  # names kept from the top of a deep reported path ...
REL_TAIL = 20  # ... and from its end, "…" between (a report line stays short at any depth)
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

_OLD = 1 << 31  # flag bit beside the mode in Pending.modes


class Pending:
    """Subdirectories listed in one directory and not visited yet, in listing order.

    Packed (names as bytes in one buffer, inodes and modes in arrays): a directory with a
    million subdirectories costs ~30 MB here instead of ~180 MB as tuples. Their st_dev is
    the walk's root_dev (other devices are never queued).
    """

    __slots__ = ("ends", "inos", "modes", "names", "next")

    def __init__(self) -> None:
        self.names = bytearray()
        self.ends = array("Q")
        self.inos = array("Q")
        self.modes = array("L")
        self.next = 0

    def add(self, name: str, ino: int, mode: int, old: bool) -> None:
        self.names += os.fsencode(name)  # surrogateescape: the exact bytes come back
        self.ends.append(len(self.names))
        self.inos.append(ino)
        self.modes.append(mode | _OLD if old else mode)

    def __len__(self) -> int:
        return len(self.ends) - self.next

    def pop(self) -> tuple[str, int, int, bool]:
        """(name, ino, mode, old) of the next subdirectory."""
        i = self.next
        self.next = i + 1
        start = self.ends[i - 1] if i else 0
        m = self.modes[i]
        return (
            os.fsdecode(bytes(self.names[start : self.ends[i]])),
            self.inos[i],
            m & ~_OLD,
            bool(m & _OLD),
        )


class Frame:
    """One directory on the walk's explicit stack (its fd is None while closed)."""

    __slots__ = (
        "clean",
        "depth",
        "dev",
        "fd",
        "ino",
        "mnode",
        "mode",
        "name",
        "parent",
        "pending",
        "removable",
    )

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
        self.depth: int = 0 if parent is None else parent.depth + 1
        self.name = name
        self.fd = fd
        self.dev = dev
        self.ino = ino
        self.mode = mode
        self.removable = removable  # remove this dir itself once it is empty
        self.clean = True  # every entry in it has been removed (or would be)
        self.pending: Pending | None = None  # subdirs to visit (None: none left)
        # Mount points below this directory when statx has no mount id: a trie node
        # {name: (is_mount, node)} of read_mount_points() below the walk's start, or None.
        self.mnode: dict | None = None

    def rel(self) -> str:
        """Path below the walk's start from the parent chain: its last REL_TAIL names."""
        return _render(self, None, ())


def _render(frame: Frame, name: str | None, head: tuple[str, ...] | list[str]) -> str:
    """`head` names, "…" if names are left out, the last REL_TAIL names of frame's path, name.

    Costs O(REL_HEAD + REL_TAIL) whatever the depth: only called for entries a report keeps.
    """
    tail: list[str] = [] if name is None else [name]
    f: Frame | None = frame
    while f is not None and f.depth > 0 and len(tail) < REL_TAIL:
        tail.append(f.name)
        f = f.parent
    tail.reverse()
    if f is None or f.depth == 0:
        return "/".join(tail) or "."
    left = f.depth  # names at depths 1..left are not in tail
    shown = list(head[:left])
    if len(shown) < left:
        shown.append("…")
    return "/".join(shown + tail)


def mount_trie(mounts: frozenset[str], base: str) -> dict:
    """Mount points strictly below `base` as a trie {name: (is_mount, subtrie)}."""
    root: dict = {}
    prefix = base.rstrip("/") + "/"
    for m in mounts:
        if not m.startswith(prefix):
            continue
        node = root
        parts = [p for p in m[len(prefix) :].split("/") if p]
        for k, part in enumerate(parts):
            is_mount, sub = node.get(part, (False, {}))
            node[part] = (is_mount or k == len(parts) - 1, sub)
            node = sub
    return root


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
        # Mount points (only when statx gives no mount id), as a trie below base_path, the
        # path of the frame run() starts from: one dict lookup per directory at any depth.
        self.mounts = mounts
        self.mount_trie = mount_trie(mounts, base_path) if mounts is not None else None
        self.base_path = base_path
        self.stats = RemoveStats()
        self.statx = Statx()
        self.open_fds = 0
        self.peak_fds = 0  # most directory fds the walk held at once (bench, tests)
        self.stack: list[Frame] = []
        self.low = 1  # stack[1:low] are closed; stack[0] (the start) is never closed
        # remove_tree (no uid, no cutoff) takes non-directories by their dirent type;
        # anything else must lstat every entry for its owner and age.
        self.need_stat = uid is not None or cutoff is not None
        # Per-file sizes: real remove_tree runs measure free space instead (see remove_tree).
        self.sizes = self.need_stat or dry_run
        # Every walked directory is on root_dev, so one check serves the whole walk.
        self.check_locks = any(dev == root_dev for dev, _ in guards.locked)

    # -- helpers

    def _rel(self, frame: Frame, name: str | None = None) -> str:
        """Reported path of `name` in frame (or of frame): built only for kept records.

        Every frame passed here is on the stack or was just popped from it, so the stack
        holds its ancestors: the head names come from there, the tail from the parent chain.
        """
        stack = self.stack
        base = stack[0].depth if stack else 0
        head = [
            stack[d - base].name for d in range(max(1, base), 1 + REL_HEAD) if d - base < len(stack)
        ]
        return _render(frame, name, head)

    def _skip(self, frame: Frame, name: str | None, why: str) -> None:
        if len(self.stats.skipped) < MAX_REPORTED:
            self.stats.skipped.append((self._rel(frame, name), why))
        else:
            self.stats.more_skipped += 1

    def _error(self, frame: Frame, name: str | None, why: str) -> None:
        if len(self.stats.errors) < MAX_REPORTED:
            self.stats.errors.append((self._rel(frame, name), why))
        else:
            self.stats.more_errors += 1

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
                self._skip(frame, name, "changed during the walk")
                return None
            else:
                self._error(frame, name, e.strerror or str(e))
                return None
        why = self._check_dir(fd, dev, ino, frame, name)
        if why:
            os.close(fd)
            self._skip(frame, name, why)
            return None
        return fd

    def _check_dir(self, fd: int, dev: int, ino: int, parent: Frame, name: str) -> str:
        """Why the open dir fd (subdir `name` of parent) must not be walked ('' when it may)."""
        fdev, fino, mnt = self.statx(fd)
        if (fdev, fino) != (dev, ino):
            self.stats.raced += 1
            return "replaced during the walk"
        if fdev != self.root_dev:
            return "other filesystem"
        if mnt is not None and self.root_mnt is not None:
            if mnt != self.root_mnt:
                return "mount point"
        elif parent.mnode is not None and name in parent.mnode and parent.mnode[name][0]:
            return "mount point"
        return ""

    def _open_after_chmod(self, frame: Frame, name: str, dev: int, ino: int) -> int | None:
        """Open a dir the owner made unreadable (only matters without CAP_DAC_OVERRIDE)."""
        assert frame.fd is not None
        try:
            pfd = os.open(name, O_DIR_PATH, dir_fd=frame.fd)
        except OSError as e:
            self._error(frame, name, e.strerror or str(e))
            return None
        try:
            st = os.fstat(pfd)
            if (st.st_dev, st.st_ino) != (dev, ino):
                self.stats.raced += 1
                self._skip(frame, name, "replaced during the walk")
                return None
            # fchmod refuses O_PATH fds; the /proc magic link reaches exactly this inode.
            os.chmod(f"/proc/self/fd/{pfd}", stat.S_IMODE(st.st_mode) | 0o700)
            return os.open(name, O_DIR, dir_fd=frame.fd)
        except OSError as e:
            self._error(frame, name, e.strerror or str(e))
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
                self._skip(frame, name, "mount point")
            elif e.errno == errno.ENOTEMPTY:
                self.stats.raced += 1
                self._skip(frame, name, "not empty (changed during the walk)")
            else:
                self._error(frame, name, e.strerror or str(e))
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
        Entries stream from the directory: only the subdirectories are kept (packed).
        """
        assert frame.fd is not None
        stats = self.stats
        fd = frame.fd
        pending: Pending | None = None
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
                    self._error(frame, name, e.strerror or str(e))
                    frame.clean = False
                    continue
                # uid or cutoff set means need_stat: st is there whenever they are read.
                if uid is not None and st.st_uid != uid:
                    frame.clean = False
                    if not top:
                        self._skip(frame, name, f"owned by uid {st.st_uid}")
                    continue
                if fmt == _S_IFDIR:
                    if st.st_dev != root_dev:  # never even open it (it may be an automount)
                        frame.clean = False
                        self._skip(frame, name, "other filesystem")
                        continue
                    old = cutoff is None or (st.st_mtime < cutoff and st.st_ctime < cutoff)
                    if pending is None:
                        pending = frame.pending = Pending()
                    pending.add(name, st.st_ino, st.st_mode, old)
                    continue
                if cutoff is not None and (st.st_mtime >= cutoff or st.st_ctime >= cutoff):
                    frame.clean = False
                    self._skip(frame, name, "younger than min_age")
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
                    self._skip(frame, name, why)
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

    def run(self, root: Frame, top_is_root: bool) -> None:
        """Walk from an already opened and verified root frame, depth first, no recursion.

        The top of the stack is always open: a pushed child is, _close_oldest never closes
        the top, and a popped frame's parent is re-opened before the frame is closed. The
        open frames are stack[0] and stack[low:], so closing the oldest is O(1).
        """
        stack = self.stack = [root]
        self.low = 1
        self.open_fds = self.peak_fds = 1
        if self.mount_trie is not None:
            root.mnode = self.mount_trie
        self.scan(root, top_is_root)
        while stack:
            frame = stack[-1]
            pending = frame.pending
            if pending is not None:
                name, ino, mode, old = pending.pop()
                if not pending:
                    frame.pending = None  # a deep chain keeps no empty buffers per level
                dev = self.root_dev
                fd = self._open_child(frame, name, dev, ino)
                if fd is None:
                    frame.clean = False
                    continue
                child = Frame(frame, name, fd, dev, ino, mode, old)
                if frame.mnode is not None and name in frame.mnode:
                    child.mnode = frame.mnode[name][1]
                stack.append(child)
                self.open_fds += 1
                if self.open_fds > MAX_OPEN_FDS:
                    self._close_oldest(stack)
                elif self.open_fds > self.peak_fds:
                    self.peak_fds = self.open_fds
                self.scan(child, False)
                continue
            stack.pop()
            top = len(stack) - 1
            if self.low > top:
                self.low = max(1, top)
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
                    self.stats.listed.append(self._rel(frame) + "/")
            else:
                parent.clean = False

    def _close(self, frame: Frame) -> None:
        if frame.fd is not None:
            os.close(frame.fd)
            frame.fd = None
            self.open_fds -= 1

    def _close_oldest(self, stack: list[Frame]) -> None:
        # Keep the root (index 0, owned by the caller's setup) and the top (the frame being
        # scanned, whose pending subdirs are opened through its fd) open. stack[1:low] are
        # all closed already and stack[low:] all open, so this finds its frame at once.
        low, top = self.low, len(stack) - 1
        while low < top:
            f = stack[low]
            low += 1
            if f.fd is not None:
                self._close(f)
                break
        self.low = low
        if self.open_fds > self.peak_fds:
            self.peak_fds = self.open_fds

    def _reopen_parent(self, frame: Frame) -> bool:
        """Re-open frame's parent through '..' of frame's fd, verified by (dev, ino).

        A directory moved elsewhere meanwhile (by its owner, say to outside the walked
        tree) has another '..': that fails the check and the walk stops, so nothing above
        the moved directory's new place is ever opened.
        """
        parent = frame.parent
        assert parent is not None and frame.fd is not None
        try:
            fd = os.open("..", O_DIR, dir_fd=frame.fd)
        except OSError as e:
            self._error(parent, None, e.strerror or str(e))
            return False
        fdev, fino, _ = self.statx(fd)
        if (fdev, fino) != (parent.dev, parent.ino):
            os.close(fd)
            self.stats.raced += 1
            self._error(frame, None, "moved out of its directory during the walk: stopped")
            return False
        parent.fd = fd
        self.open_fds += 1
        if self.open_fds > self.peak_fds:
            self.peak_fds = self.open_fds
        return True

    def _abandon(self, stack: list[Frame]) -> None:
        for f in stack:
            f.clean = False
            self._close(f)
        stack.clear()

"""mountinfo, /proc/locks and /proc/net/unix: any text parses without an exception, and what
the kernel writes for paths a user chose (FUSE mount points, socket names) comes back whole."""

from __future__ import annotations

import os

from hypothesis import example, given
from hypothesis import strategies as st

from pruned.linux.guards import parse_locks, parse_unix_sockets
from pruned.linux.mounts import _unescape, mount_points, mounts_below
from tests.fuzz._settings import fuzz

# ---------------------------------------------------------------- mountinfo

# Characters worth a fuzzer's attention in a path: what the kernel escapes (space, tab,
# newline, backslash), what str.splitlines() would split at, and what str.split() eats.
TRICKY = " \t\n\\\r\v\f\x1c\x1d\x1e\x85\u2028\u2029\xa0\x00"
path_char = st.characters(
    blacklist_characters="\0/", blacklist_categories=["Cs"]
) | st.sampled_from(TRICKY.replace("\x00", ""))
component = st.text(path_char, min_size=1, max_size=10)
abs_path = st.lists(component, min_size=1, max_size=4).map(lambda c: "/" + "/".join(c))


def kernel_mangle(path: str) -> str:
    """seq_path(..., " \\t\\n\\\\"): the four characters the kernel writes as octal."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


@st.composite
def mountinfo(draw: st.DrawFn) -> tuple[str, list[str]]:
    points = draw(st.lists(abs_path | st.just("/"), max_size=8))
    lines = []
    for i, mp in enumerate(points):
        opt = draw(st.sampled_from(["", " shared:1", " master:7 propagate_from:2"]))
        src = kernel_mangle(draw(abs_path | st.just("tmpfs")))
        root = kernel_mangle(draw(abs_path | st.just("/")))
        lines.append(f"{20 + i} 1 0:{i} {root} {kernel_mangle(mp)} rw,nosuid{opt} - fuse {src} rw")
    return "".join(line + "\n" for line in lines), points


@fuzz(3)
@given(mountinfo())
@example(("36 1 0:5 / /tmp/a\rb rw - fuse x rw\n", ["/tmp/a\rb"]))
@example(("36 1 0:5 / /tmp/a\x85\u2028b rw - fuse x rw\n", ["/tmp/a\x85\u2028b"]))
def test_mountinfo_round_trip(case: tuple[str, list[str]]) -> None:
    text, points = case
    assert mount_points(text) == points
    for p in points:
        below = mounts_below(p, text)
        assert p.rstrip("/") in below or p == "/"


@fuzz(2)
@given(st.text(path_char, max_size=40))
@example("\\")  # a trailing backslash: unicode_escape used to raise here
@example("\\u2028\\x41\\N{DIGIT ONE}\\777\\08")
def test_unescape_inverts_the_kernel_and_never_raises(path: str) -> None:
    assert _unescape(kernel_mangle(path)) == path
    assert isinstance(_unescape(path), str)


@fuzz(2)
@given(
    st.text(max_size=300)
    | st.lists(
        st.sampled_from(["36 1 0:5 / /a\\040b rw - x y rw", "1 2 3 4", "1 2 3 4 \\", "\\134", "\r"])
        | st.text(max_size=30),
        max_size=8,
    ).map("\n".join)
)
def test_mountinfo_garbage(text: str) -> None:
    got = mount_points(text)
    assert len(got) <= len(text.split("\n"))  # at most one mount point per line
    mounts_below("/tmp", text)


# ---------------------------------------------------------------- /proc/locks

devs = st.tuples(st.integers(0, 0xFFF), st.integers(0, 0xFFFFF), st.integers(0, 2**64 - 1))


@st.composite
def locks_text(draw: st.DrawFn) -> tuple[str, set]:
    entries = draw(st.lists(devs, max_size=10))
    lines = []
    for n, (major, minor, ino) in enumerate(entries, 1):
        kind = draw(
            st.sampled_from(
                [
                    "POSIX  ADVISORY  WRITE",
                    "FLOCK  ADVISORY  READ ",
                    "OFDLCK ADVISORY  READ ",
                    "LEASE  ACTIVE    READ ",
                ]
            )
        )
        waiter = draw(st.sampled_from(["", "-> "]))
        pid = draw(st.integers(-1, 4194304))
        lines.append(f"{n}: {waiter}{kind} {pid} {major:02x}:{minor:02x}:{ino} 0 EOF")
    return "".join(line + "\n" for line in lines), {
        (os.makedev(ma, mi), ino) for ma, mi, ino in entries
    }


@fuzz(2)
@given(locks_text())
def test_locks_round_trip(case: tuple[str, set]) -> None:
    text, want = case
    assert parse_locks(text) == want


@fuzz(2)
@given(
    st.text(max_size=300)
    | st.lists(
        st.from_regex(r"\A[0-9a-fA-F+-]{0,20}:[0-9a-fA-F+-]{0,20}:[0-9\u0660-\u0669\xb2]{1,25}\Z")
        | st.text(max_size=30),
        max_size=8,
    ).map(" ".join)
)
@example("1: POSIX  ADVISORY  WRITE 1 ffffffffffffffffff:00:1 0 EOF")  # OverflowError
@example("1: POSIX  ADVISORY  WRITE 1 -1:-1:1 0 EOF\n2: x 1 0:0:\xb2 y")
def test_locks_garbage(text: str) -> None:
    for dev, ino in parse_locks(text):
        assert isinstance(dev, int) and isinstance(ino, int)


# ---------------------------------------------------------------- /proc/net/unix

HEADER = "Num       RefCount Protocol Flags    Type St Inode Path\n"
# a socket a user binds: any name but NUL ('\n' is printed raw too, but then no parser can
# tell that line from a forged one; pruned's guard only ever adds names, so it is harmless)
sock_path = st.lists(
    st.text(st.characters(blacklist_characters="\0\n/", blacklist_categories=["Cs"]), max_size=10),
    min_size=1,
    max_size=4,
).map(lambda c: "/" + "/".join(c))


@st.composite
def unix_text(draw: st.DrawFn) -> tuple[str, set]:
    socks = draw(
        st.lists(
            sock_path | st.text(max_size=8).map(lambda s: "@" + s.replace("\n", "")), max_size=8
        )
    )
    lines = [HEADER]
    for i, path in enumerate(socks):
        lines.append(f"0000000000000000: 00000002 00000000 00010000 0001 01 {100 + i} {path}\n")
    lines.append("0000000000000000: 00000003 00000000 00000000 0001 03 99\n")  # unbound
    want = {p.rstrip("/").rsplit("/", 1)[-1] for p in socks if not p.startswith("@")}
    return "".join(lines), want


@fuzz(2)
@given(unix_text())
@example(
    (
        HEADER + "0000: 00000002 00000000 00010000 0001 01 1 /run/a\rb\x85c\u2028d\n",
        {"a\rb\x85c\u2028d"},
    )
)
def test_unix_sockets_round_trip(case: tuple[str, set]) -> None:
    text, want = case
    assert parse_unix_sockets(text) == want


@fuzz()
@given(st.text(max_size=300))
def test_unix_sockets_garbage(text: str) -> None:
    got = parse_unix_sockets(text)
    assert len(got) <= max(0, len(text.split("\n")) - 1)

"""Text pruned got from the system, made safe to print, journal and serialise.

Names and paths are the user's to choose and need not be UTF-8: pruned carries them as str
with surrogate escapes (what os.readlink, os.scandir, pwd and `decode` give), so two
different names stay different and a path still names the real file, and renders them
escaped only at the edge, where a surrogate would make encoding fail and a control
character would forge lines or drive a terminal: the audit record and the operational log
(`printable`), and the terminal (streams set to ERRORS, see cli.main).
"""

from __future__ import annotations

import codecs
import re

ERRORS = "pruned.printable"  # an encode error handler: a byte that was not UTF-8 -> \xNN


def decode(raw: bytes) -> str:
    """bytes read from the system as str, losslessly (`os.fsencode` gives the bytes back)."""
    return raw.decode("utf-8", "surrogateescape")


def _escape_char(ch: str) -> str:
    code = ord(ch)
    # U+DC80..U+DCFF is how surrogateescape carries the byte 0x80..0xFF
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def _escape(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeEncodeError):
        raise err
    return "".join(_escape_char(ch) for ch in err.object[err.start : err.end]), err.end


codecs.register_error(ERRORS, _escape)

# What must not reach a journal field or a terminal as itself: C0 controls (a newline forges a
# second log line, ESC drives the admin's terminal, and journalctl shows a field holding one as
# a byte array), DEL, C1 controls, and lone surrogates (not encodable).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(text: str) -> str:
    """text with every byte that was not valid UTF-8 and every ASCII control character shown
    as \\xNN (C1 controls and other lone surrogates as \\uNNNN): always encodable, one line,
    and the bytes stay recognisable. A literal backslash is left alone, so a name that spells
    out "\\xff" itself reads the same: the record is for people, the carried str is exact."""
    if not _UNSAFE.search(text):
        return text
    return _UNSAFE.sub(lambda m: _escape_char(m[0]), text)


def clip(text: str, limit: int) -> str:
    """text cut to at most `limit` characters, saying how much was cut (for a reduced record)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more)"


class EscapingWriter:
    """A text stream whose every line goes out through `printable` (newlines stay): what the
    CLI prints, whichever code path prints it, cannot drive the terminal that shows it."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, s: str) -> int:
        self._stream.write("\n".join(printable(part) for part in s.split("\n")))
        return len(s)

    def __getattr__(self, name: str):  # flush, fileno, isatty, buffer, ...
        return getattr(self._stream, name)

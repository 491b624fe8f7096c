"""Text pruned got from the system, made safe to print, journal and serialise.

Names and paths are the user's to choose and need not be UTF-8: pruned carries them as str
with surrogate escapes (what os.readlink, os.scandir and the surrogateescape decodes give)
and renders them escaped only at the edge, where a surrogate would make encoding fail: the
audit record (`printable`), and the terminal (streams set to ERRORS, see cli.main).
"""

from __future__ import annotations

import codecs

ERRORS = "pruned.printable"  # an encode error handler: a byte that was not UTF-8 -> \xNN


def _escape(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeEncodeError):
        raise err
    out = []
    for ch in err.object[err.start : err.end]:
        code = ord(ch)
        # U+DC80..U+DCFF is how surrogateescape carries the byte 0x80..0xFF
        out.append(f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}")
    return "".join(out), err.end


codecs.register_error(ERRORS, _escape)


def printable(text: str) -> str:
    """text with every byte that was not valid UTF-8 shown as \\xNN (other lone surrogates as
    \\uNNNN): always encodable, and the bytes stay recognisable."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", ERRORS).decode("utf-8")

"""uid <-> user name, cached: NSS lookups (LDAP on many clusters) are slow and sweeps repeat.

A name need not be UTF-8: pwd decodes it with surrogateescape, losslessly, and pruned.text
escapes it where it is printed or journalled.
"""

from __future__ import annotations

import pwd
from functools import lru_cache


@lru_cache(maxsize=4096)
def user_name(uid: int) -> str | None:
    """The login name of uid, or None when the uid has no passwd entry."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def user_label(uid: int) -> str:
    """The login name, or the uid as text when it has none (for tables and messages)."""
    return user_name(uid) or str(uid)

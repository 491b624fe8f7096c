"""The fuzz tier: hypothesis property tests of every parser of untrusted input.

Profiles and budgets: tests/fuzz/_settings.py. Hypothesis keeps caches (unicode tables,
constants) in a storage directory that defaults to ./.hypothesis: it goes to a private tmp
dir instead, unless HYPOTHESIS_STORAGE_DIRECTORY names one.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from hypothesis.configuration import set_hypothesis_home_dir

import tests.fuzz._settings  # noqa: F401 - registers and loads the profile

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    _home = tempfile.mkdtemp(prefix="pruned-hypothesis-")
    set_hypothesis_home_dir(_home)
    atexit.register(shutil.rmtree, _home, True)

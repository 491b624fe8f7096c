"""Hypothesis profiles for the fuzz tier, and `fuzz(weight)`: one test's bounded budget.

- `ci` (chosen when CI=true): derandomized, so every CI run tries the same inputs, and
  bounded so the whole tier stays well under a minute on a loaded 2-core machine;
- `dev` (the default): the same budget, new random inputs on every run;
- `long` (HYPOTHESIS_PROFILE=long, optionally FUZZ_EXAMPLES=N): a long local hunt.
HYPOTHESIS_PROFILE names one explicitly. No profile keeps an example database: nothing is
written into the checkout (conftest.py also moves hypothesis' own cache dir to a tmp dir).
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings

BASE = 100  # max_examples of a weight-1.0 test in ci/dev
_COMMON = {
    "database": None,
    "print_blob": False,
    "suppress_health_check": [HealthCheck.too_slow],
}
settings.register_profile(
    "ci", derandomize=True, max_examples=BASE, deadline=timedelta(seconds=5), **_COMMON
)
settings.register_profile("dev", max_examples=BASE, deadline=timedelta(seconds=5), **_COMMON)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "20000")),
    deadline=timedelta(seconds=30),
    **_COMMON,
)

PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or (
    "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev"
)
settings.load_profile(PROFILE)


def fuzz(weight: float = 1.0) -> settings:
    """Settings for one property: `weight` times the profile's max_examples (at least 5).

    Tests whose examples touch the filesystem or start processes take a smaller weight.
    """
    return settings(max_examples=max(5, int(settings.default.max_examples * weight)))

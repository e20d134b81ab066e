"""Record what the property tests generate, for tools/test_distribution.py to measure.

A no-op unless ``ATTNMASK_TEST_DISTRIBUTION`` names a file: then each call
appends one JSON line (the test's name and the problem it ran), so the
distribution measured is the one the tests really ran under the chosen
hypothesis profile, not a re-draw.

Example::

    >>> record("test_x", mask="causal", Lq=4, Lk=4)     # writes only when the variable is set
"""

from __future__ import annotations

import json
import os


def record(test: str, **problem) -> None:
    """Append {"test": test, **problem} to $ATTNMASK_TEST_DISTRIBUTION (if set)."""
    path = os.environ.get("ATTNMASK_TEST_DISTRIBUTION")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"test": test, **problem}, default=str) + "\n")

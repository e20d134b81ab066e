"""Hypothesis profiles and per-test seeding for the whole suite.

Profiles (choose one with ATTNMASK_HYPOTHESIS=name, or pytest's --hypothesis-profile):

* ``ci``: selected when the environment variable ``CI`` is set (``.ci/run`` sets
  CI=true). Derandomized: the same examples on every run of the same code and
  hypothesis version, no example database, so a red CI run is reproducible.
* ``dev``: the local default. Same number of examples, but a fresh seed each run,
  printed at the end of the run (``--hypothesis-seed=N`` repeats that run), so
  local runs keep exploring.
* ``thorough``: 1000 examples per property, fresh seeds; for a long hunt.

No test hard-codes max_examples: the profile decides. The profile in force and
its seed are printed in the header and in the summary at the end of the run.
"""

import os
import random

import pytest
from hypothesis import HealthCheck, settings

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_QUIET)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=_QUIET)
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=_QUIET)

if os.environ.get("ATTNMASK_HYPOTHESIS"):
    _PROFILE, _WHY = os.environ["ATTNMASK_HYPOTHESIS"], "ATTNMASK_HYPOTHESIS"
elif os.environ.get("CI"):
    _PROFILE, _WHY = "ci", "CI is set"
else:
    _PROFILE, _WHY = "dev", "local default"
settings.load_profile(_PROFILE)

_seed_line = ""


@pytest.hookimpl(trylast=True)          # after hypothesis' own plugin has read its options
def pytest_configure(config):
    """Fix one seed per run for non-derandomized profiles, so a failure names how to repeat it.

    (With a forced seed hypothesis keeps no example database; the seed repeats the run instead.)
    """
    global _seed_line, _WHY
    from hypothesis import core
    if config.getoption("hypothesis_profile", None):
        _WHY = "--hypothesis-profile"
    chosen = config.getoption("hypothesis_seed", None)
    current = settings.get_profile(settings.get_current_profile_name())
    if current.derandomize:
        _seed_line = "derandomized (no seed)"
    elif chosen is not None:
        _seed_line = f"seed {chosen} (from --hypothesis-seed)"
    else:
        seed = random.SystemRandom().randrange(2**32)
        core.global_force_seed = seed
        _seed_line = f"seed {seed} (repeat with --hypothesis-seed={seed})"


def _profile_line() -> str:
    name = settings.get_current_profile_name()
    s = settings.get_profile(name)
    return (f"hypothesis profile {name!r} ({_WHY}): max_examples={s.max_examples}, "
            f"derandomize={s.derandomize}, {_seed_line}")


def pytest_report_header(config):
    return _profile_line()


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(_profile_line())


@pytest.fixture(autouse=True)
def _seed_torch():
    import torch
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """torch at one intra-op thread for the test, restored after: tiny models gain nothing from a second
    thread, and on a machine shared with other jobs two threads ran them 4-7x slower than one."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

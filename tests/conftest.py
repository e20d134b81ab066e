import os

import pytest
from hypothesis import HealthCheck, settings

# Deterministic, bounded property tests: CI must be reproducible and fast.
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("ATTNMASK_HYPOTHESIS", "ci"))


@pytest.fixture(autouse=True)
def _seed_torch():
    import torch
    torch.manual_seed(0)

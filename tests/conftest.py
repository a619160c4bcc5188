import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# "ci" is what `make test` runs; BELM_HYPOTHESIS_PROFILE=thorough for many more examples.
# "ci" is derandomized: the same examples every run, so CI cannot flake on a new draw.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("BELM_HYPOTHESIS_PROFILE", "ci"))

# Tiny models run fastest single-threaded; on a shared 2-core machine 2 threads thrash.
torch.set_num_threads(1)


class CountingEps:
    """Wraps an eps_fn and counts its calls (and the batch rows it saw)."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0
        self.timesteps = []

    def __call__(self, x, t):
        self.calls += 1
        self.timesteps.append(int(t))
        return self.fn(x, t)


@pytest.fixture
def counting():
    return CountingEps

"""Hypothesis strategies shared by the exactness tests: random schedules, grids, shapes."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from belm.schedule import make_betas


@st.composite
def beta_schedules(draw) -> np.ndarray:
    kind = draw(st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2", "random"]))
    T = draw(st.integers(min_value=20, max_value=1000))
    if kind == "random":
        # An arbitrary positive increasing-ish beta sequence: sorted uniform values.
        seed = draw(st.integers(0, 2**31 - 1))
        lo = draw(st.floats(1e-5, 1e-3))
        hi = draw(st.floats(5e-3, 5e-2))
        return np.sort(np.random.default_rng(seed).uniform(lo, hi, size=T))
    lo = draw(st.floats(1e-5, 1e-3))
    hi = draw(st.floats(5e-3, 3e-2))
    return make_betas(kind, T, lo, hi)


spacings = st.sampled_from(["linspace", "leading", "trailing"])
batch_shapes = st.sampled_from([(1, 3), (2, 5), (3, 1, 4, 4), (2, 2, 3, 5), (1, 1, 1)])

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


def roundtrip_tolerance(x0, schedule, guidance: float = 1.0) -> float:
    """What "exact" means for a float round trip (MATH.md, "Exactness in floating point").

    float64 input: 1e-9 on every standard VP schedule (σ̄_0 ≤ 160, DDPM-linear); random
    schedules reach σ̄_0 ~ 1e5, where the x-space arithmetic loses digits in proportion.
    float32/bfloat16 input: the network sees the float64 state rounded to the input dtype;
    the two directions almost always round to the same bits, and when one element lands on
    the other side of a rounding boundary ε moves by one ulp times the network's Lipschitz
    constant (× guidance). A sign error in any coefficient is O(1), far above either bound.
    """
    import torch
    scale = max(1.0, float(x0.abs().max()))
    if x0.dtype == torch.float64:
        return 1e-9 * max(1.0, float(schedule.sigma_bar[0]) / 160) * scale
    return 16 * torch.finfo(x0.dtype).eps * max(1.0, guidance) * scale

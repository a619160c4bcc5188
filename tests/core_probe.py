"""TEMPORARY (drop when the sampler core reads Schedule.scale / tau / model_time): ``needs_core``.

Before that core lands, samplers step flow schedules in the old (alpha, sigma_bar) coordinates
and give the network integer timesteps, so the flow tests cannot pass; they are marked xfail
and not run (hypothesis would spend a minute shrinking a known failure). Once one Euler step on
a flow schedule is right, the condition is false and the tests run as ordinary tests.
"""
import pytest
import torch


def _core_steps_flows() -> bool:
    from belm import DDIM, Schedule

    seen = []

    def velocity(x, t):
        seen.append(t)
        return torch.ones_like(x)

    try:
        out = DDIM(velocity, Schedule.from_sigmas([1.0, 0.5], kind="flow"), progress=False).sample(
            torch.zeros(1, 1, dtype=torch.float64))
    except Exception:
        return False
    t = seen[0] if seen else None
    return (isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.item() == 1.0
            and out.item() == -1.0)   # x(σ=0) = x(1) + (0 − 1)·v


needs_core = pytest.mark.xfail(not _core_steps_flows(), reason="needs core scale/tau", run=False, strict=False)

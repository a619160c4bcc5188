"""Samplers by name, for the CLI and the applications."""

from __future__ import annotations

from typing import Any, Callable

from belm.schedule import Schedule
from belm.solvers.base import EpsFn, Sampler
from belm.solvers.belm import BELM
from belm.solvers.edict import EDICT
from belm.solvers.methods import BDIA, DDIM, OBELM

__all__ = ["SAMPLERS", "make_sampler", "sampler_names"]

SAMPLERS: dict[str, Callable[..., Sampler]] = {
    "ddim": DDIM,
    "obelm": OBELM,
    "bdia": BDIA,
    "edict": EDICT,
}


def _derived(rule_name: str) -> Callable[..., Sampler]:
    def make(eps_fn: EpsFn, schedule: Schedule, **kwargs: Any) -> Sampler:
        return BELM(eps_fn, schedule, rule=rule_name, **kwargs)
    make.__doc__ = f"BELM from the named derived rule {rule_name!r} (belm.lte.NAMED_RULES)."
    return make


# Derived rules beyond O-BELM (which is "obelm") are offered under their names.
SAMPLERS["leapfrog3"] = _derived("leapfrog3")
SAMPLERS["leapfrog3-scaled"] = _derived("leapfrog3-scaled")


def sampler_names() -> list[str]:
    """Names accepted by :func:`make_sampler` (built-ins and named derived rules)."""
    return sorted(SAMPLERS)


def make_sampler(name: str, eps_fn: EpsFn, schedule: Schedule, **kwargs: Any) -> Sampler:
    """``make_sampler("obelm", eps_fn, schedule, progress=False)``; unknown names are a clear error."""
    key = name.lower()
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(sampler_names())}")
    return SAMPLERS[key](eps_fn, schedule, **kwargs)

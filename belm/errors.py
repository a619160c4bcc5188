"""Exceptions raised by belm. Each subclasses the builtin a caller would expect."""

from __future__ import annotations

__all__ = ["BELMError", "NonFiniteError", "LatentMismatchError", "LatentFileError", "UnstableRuleError", "LatticeOverflowError", "GrowthWarning"]


class BELMError(Exception):
    """Base class of belm's own exceptions."""


class NonFiniteError(BELMError, ValueError):
    """The network (or the input) produced NaN/Inf; the message names the level and timestep."""

    def __init__(self, message: str, *, level: int | None = None, timestep: int | None = None) -> None:
        super().__init__(message)
        self.level = level
        self.timestep = timestep


class LatentMismatchError(BELMError, ValueError):
    """A latent was given to a sampler whose method or schedule did not produce it."""


class LatentFileError(BELMError, ValueError):
    """A latent file that is not what :meth:`belm.Latent.save` wrote (a field missing,
    malformed, out of range, inconsistent, or changed after writing); the message names
    the file and the field."""


class UnstableRuleError(BELMError, ValueError):
    """A multistep rule is not zero-stable in both directions."""


class LatticeOverflowError(BELMError, ValueError):
    """A bitwise chain outgrew its int64 lattice (never wrapped around silently)."""


class GrowthWarning(UserWarning):
    """A grid on which inversion amplifies the parasitic mode (see belm.solvers.growth):
    the latents are exact but not noise-like; the message names the growth and the fix."""

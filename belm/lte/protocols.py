"""What the rest of belm needs from a rule: two small structural protocols.

:class:`RuleLike` is the contract between the symbolic engine and the samplers: a
sampler (``belm.BELM``) takes *any* object with these members, so that
:mod:`belm.lte` never imports :mod:`belm.solvers` (the layers point downward only)
and research code can pass its own rules (e.g. a numerically evaluated family
member) without subclassing :class:`~belm.lte.derive.BELMRule`.

:class:`ConstantStepRule` is what :mod:`belm.lte.stability` reads from a rule; it
exists so that ``stability`` needs no import of ``derive`` (which imports
``stability``): no import cycle, not even one for type checkers.

This module imports nothing from belm.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["RuleLike", "ConstantStepRule", "CoefficientFn"]

#: ``h -> (a, b)``: step sizes float64 ``(M, k)`` (column ``j`` is ``h_{j+1}``, ``h_1``
#: the step next to the new point, units of σ̄) to the relation's coefficients
#: ``a (M, k)`` and ``b (M, k-1)`` (dimensionless); a 1-D ``h`` of length ``k`` gives
#: 1-D ``a (k,)``, ``b (k-1,)``.
CoefficientFn = Callable[[Any], tuple[np.ndarray, np.ndarray]]


@runtime_checkable
class RuleLike(Protocol):
    r"""A variable-step k-step BELM rule as a sampler uses it.

    The relation, in the paper's indexing (:mod:`belm.lte.derive`)::

        x̄_{i−1} = Σ_{j=1..k} a_j x̄_{i−1+j} + Σ_{j=1..k−1} b_j h_{i−1+j} ε(x̄_{i−1+j}).

    Members (attributes or read-only properties):

    * ``k`` (int ≥ 2): number of states the relation couples.
    * ``key`` (str): identifies the coefficients *exactly* (two rules with different
      coefficients never share a key); samplers use it in their name and to tag latents.
    * ``free`` (tuple): free parameters left; a sampler refuses a rule unless it is empty.
    * ``zero_stable`` (bool): constant-step root condition holds for sampling *and*
      inversion (all roots of ρ simple and on the unit circle).
    * ``roots(direction)``: the constant-step characteristic roots, ``direction`` is
      ``"forward"`` (sampling) or ``"inverse"`` (inversion, the reciprocals); used in
      error messages.
    * ``numeric()``: a :data:`CoefficientFn`, ``h (M, k) -> (a (M, k), b (M, k−1))``,
      float64, evaluated once per schedule.

    Satisfied by :class:`~belm.lte.derive.BELMRule` (without free parameters) and
    :class:`~belm.lte.scaled.ScaledBELMRule`.  ``isinstance(obj, RuleLike)`` checks
    that the members exist; on Python < 3.12 it evaluates the properties to do so (for
    a ``BELMRule`` that is its cached stability analysis).
    """

    @property
    def k(self) -> int: ...

    @property
    def key(self) -> str: ...

    @property
    def free(self) -> tuple: ...

    @property
    def zero_stable(self) -> bool: ...

    def roots(self, direction: str = "forward") -> tuple[complex, ...]: ...

    def numeric(self) -> CoefficientFn: ...


class ConstantStepRule(Protocol):
    """What :mod:`belm.lte.stability` reads from a (possibly parametric) rule.

    ``constant_step_a()``: the ``a_j`` at constant steps (all ``h_j = 1``), exact sympy
    expressions in the ``free`` symbols.
    """

    @property
    def k(self) -> int: ...

    @property
    def key(self) -> str: ...

    @property
    def free(self) -> Sequence[Any]: ...

    def constant_step_a(self) -> tuple[Any, ...]: ...

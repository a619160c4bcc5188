"""An analytic test problem: a Gaussian-mixture data distribution with closed-form ε.

With data x_0 ~ Σ_i w_i N(μ_i, s_i² I) in R^d, the noised marginal at a level with
alpha, sigma is Σ_i w_i N(alpha μ_i, v_i I), v_i = alpha² s_i² + sigma², so the ideal
network is exact::

    ε(x) = −sigma ∇ log p(x) = sigma Σ_i r_i(x) (x − alpha μ_i) / v_i

with responsibilities r_i. The probability-flow ODE dx̄/dσ̄ = ε is then solved to
rtol 1e-12 by scipy's DOP853, which gives the exact endpoint every sampler should reach:
the measuring stick for convergence orders.

The same data distribution under the continuous noising paths of
:class:`~belm.schedule.ContinuousSchedule`:

- :class:`FlowGaussianMixture` (rectified flow, x_σ = (1 − σ)·x0 + σ·z): the exact velocity
  v = E[z − x0 | x_σ], finite on all of σ ∈ [0, 1], and the exact flow ODE dx/dσ = v;
- :class:`VEGaussianMixture` (EDM / k-diffusion, x = x0 + σ·z): ε at σ and the exact ODE
  dx/dσ = ε, for Karras grids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp

__all__ = ["GaussianMixture", "FlowGaussianMixture", "VEGaussianMixture"]


@dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian mixture in R^dim.

    Attributes:
        means: (K, dim) component means.
        stds: (K,) component standard deviations.
        weights: (K,) mixture weights summing to 1.
    """

    means: np.ndarray
    stds: np.ndarray
    weights: np.ndarray

    @classmethod
    def default(cls, dim: int = 2, components: int = 4, seed: int = 0, std: float = 0.5) -> "GaussianMixture":
        """A fixed mixture: ``components`` modes of std ``std`` with means at radius 1.5.

        Sharper modes (smaller std) make N = 20 pre-asymptotic for every sampler (see README).
        """
        rng = np.random.default_rng(seed)
        means = rng.normal(size=(components, dim))
        means *= 1.5 / np.linalg.norm(means, axis=1, keepdims=True)
        return cls(means, np.full(components, float(std)), np.full(components, 1.0 / components))

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def _posterior(self, x: torch.Tensor, alpha, sigma):
        """Per-component pieces of x = alpha·x0 + sigma·z: (r, diff, v, mu, s2, alpha, sigma), float64.

        r: (..., K) responsibilities; diff = x − alpha·μ_i: (..., K, dim); v_i = alpha² s_i² + sigma².
        """
        x64 = x.to(torch.float64)
        mu = torch.as_tensor(self.means, dtype=torch.float64, device=x.device)
        s2 = torch.as_tensor(self.stds**2, dtype=torch.float64, device=x.device)
        logw = torch.as_tensor(np.log(self.weights), dtype=torch.float64, device=x.device)
        alpha = torch.as_tensor(alpha, dtype=torch.float64, device=x.device)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        v = alpha**2 * s2 + sigma**2                                   # (K,)
        diff = x64[..., None, :] - alpha * mu                          # (..., K, dim)
        logits = logw - 0.5 * self.dim * torch.log(v) - 0.5 * (diff**2).sum(-1) / v
        r = torch.softmax(logits, dim=-1)                              # (..., K)
        return r, diff, v, mu, s2, alpha, sigma

    def eps(self, x: torch.Tensor, alpha: float | torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Exact ε at noise level (alpha, sigma); x: (..., dim). Computed in float64."""
        r, diff, v, _, _, _, sigma = self._posterior(x, alpha, sigma)
        out = sigma * (r[..., None] * diff / v[:, None]).sum(-2)
        return out.to(x.dtype)

    def eps_fn(self, alphas_cumprod: torch.Tensor | np.ndarray):
        """``eps_fn(x, t)`` for samplers: the level's noise is read from ``alphas_cumprod[t]``."""
        ac = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))

        def eps_fn(x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
            abar = ac[int(t)]
            return self.eps(x, abar.sqrt(), (1 - abar).sqrt())

        return eps_fn

    def sample_data(self, n: int, seed: int = 0) -> torch.Tensor:
        """n samples of the data distribution, (n, dim) float64."""
        rng = np.random.default_rng(seed)
        comp = rng.choice(len(self.weights), size=n, p=self.weights)
        x = self.means[comp] + self.stds[comp, None] * rng.normal(size=(n, self.dim))
        return torch.from_numpy(x)

    def ode_solution(self, x_start: torch.Tensor, sigma_bar_start: float, sigma_bar_end: float = 0.0,
                     rtol: float = 1e-12, atol: float = 1e-12) -> torch.Tensor:
        """Exact probability-flow ODE map from σ̄ = sigma_bar_start to sigma_bar_end (in x, not x̄).

        x_start: (B, dim) at noise level σ̄_start. Returns (B, dim) float64 at σ̄_end.
        """
        def alpha_of(sb: float) -> float:
            return 1.0 / np.sqrt(1.0 + sb * sb)

        shape = x_start.shape
        xbar0 = (x_start.to(torch.float64) / alpha_of(sigma_bar_start)).reshape(-1).numpy()

        def rhs(sb: float, xbar: np.ndarray) -> np.ndarray:
            a = alpha_of(sb)
            x = torch.from_numpy(a * xbar).reshape(shape)
            return self.eps(x, a, sb * a).reshape(-1).numpy()

        sol = solve_ivp(rhs, (sigma_bar_start, sigma_bar_end), xbar0, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"ODE solver failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1] * alpha_of(sigma_bar_end)).reshape(shape)


def _solve(rhs_torch, x_start: torch.Tensor, t_start: float, t_end: float, rtol: float, atol: float) -> torch.Tensor:
    """DOP853 on dx/dt = rhs_torch(x, t) from t_start to t_end; x_start: (B, dim). Returns float64."""
    shape = x_start.shape

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        return rhs_torch(torch.from_numpy(y).reshape(shape), t).reshape(-1).numpy()

    y0 = x_start.to(torch.float64).reshape(-1).numpy()
    sol = solve_ivp(rhs, (t_start, t_end), y0, method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"ODE solver failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)


class FlowGaussianMixture(GaussianMixture):
    """The mixture under rectified flow: x_σ = (1 − σ)·x0 + σ·z, σ ∈ [0, 1].

    With alpha = 1 − σ and component i's marginal N(alpha μ_i, v_i I), v_i = alpha² s_i² + σ²,
    the posterior means E[z | x, i] = σ (x − alpha μ_i)/v_i and
    E[x0 | x, i] = μ_i + alpha s_i² (x − alpha μ_i)/v_i give the exact velocity::

        v(x, σ) = E[z − x0 | x_σ = x] = Σ_i r_i(x) [ (σ − alpha s_i²)(x − alpha μ_i)/v_i − μ_i ]

    finite on all of [0, 1] (v = x − Σ w_i μ_i at σ = 1, v = −x at σ = 0).
    """

    def velocity(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Exact v = dx/dσ at flow level σ; x: (..., dim). Computed in float64, returned in x.dtype."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        r, diff, v, mu, s2, alpha, sigma = self._posterior(x, 1.0 - sigma, sigma)
        coef = (sigma - alpha * s2) / v                                 # (K,)
        out = (r[..., None] * (coef[:, None] * diff - mu)).sum(-2)
        return out.to(x.dtype)

    def fn(self):
        """``fn(x, t)`` for samplers on a kind="flow" schedule: t is σ (0-dim float tensor)."""
        def velocity_fn(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
            return self.velocity(x, float(t))

        return velocity_fn

    def ode_solution(self, x_start: torch.Tensor, sigma_start: float, sigma_end: float = 0.0,
                     rtol: float = 1e-12, atol: float = 1e-12) -> torch.Tensor:
        """Exact flow ODE map dx/dσ = v from σ = sigma_start to sigma_end; (B, dim) → (B, dim) float64."""
        return _solve(lambda x, s: self.velocity(x, s), x_start, float(sigma_start), float(sigma_end), rtol, atol)


class VEGaussianMixture(GaussianMixture):
    """The mixture under variance-exploding noise (EDM, k-diffusion): x = x0 + σ·z.

    ε(x, σ) = σ Σ_i r_i (x − μ_i)/(s_i² + σ²) and the probability-flow ODE dx/dσ = ε.
    """

    def eps_ve(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Exact ε at VE level σ; x: (..., dim)."""
        return self.eps(x, 1.0, sigma)

    def fn(self):
        """``fn(x, t)`` for samplers on a kind="ve" schedule: t is σ (0-dim float tensor)."""
        def eps_fn(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
            return self.eps(x, 1.0, float(t))

        return eps_fn

    def ode_solution(self, x_start: torch.Tensor, sigma_start: float, sigma_end: float = 0.0,
                     rtol: float = 1e-12, atol: float = 1e-12) -> torch.Tensor:
        """Exact VE ODE map dx/dσ = ε from σ = sigma_start to sigma_end; (B, dim) → (B, dim) float64."""
        return _solve(lambda x, s: self.eps(x, 1.0, s), x_start, float(sigma_start), float(sigma_end), rtol, atol)

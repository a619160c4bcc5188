"""Deliberately plain float64 implementations of MATH.md, written without belm's internals.

Each function follows the formulas of MATH.md line by line, in x coordinates, with
Python loops. They are the independent yardstick for the library's engine.
"""

from __future__ import annotations

import numpy as np
import torch


def levels(betas: np.ndarray, timesteps: list[int]) -> tuple[list[float], list[float]]:
    """alpha, sigma per level (levels 0..N-1 from the grid, level N clean: alpha=1, sigma=0)."""
    abar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    alpha = [float(np.sqrt(abar[t])) for t in timesteps] + [1.0]
    sigma = [float(np.sqrt(1.0 - abar[t])) for t in timesteps] + [0.0]
    return alpha, sigma


def grid(T: int, N: int, spacing: str, offset: int = 0) -> list[int]:
    if spacing == "linspace":
        return [int(v) for v in np.linspace(0, T - 1, N).round()[::-1]]
    if spacing == "leading":
        return [i * (T // N) + offset for i in range(N)][::-1]
    return [int(v) - 1 for v in np.round(np.arange(T, 0, -T / N))]


def D(eps_fn, x, t_eval, a_u, s_u, a_v, s_v, eps=None):
    """DDIM map of x at level u to level v, with eps = eps_fn(x, t_eval) unless given."""
    if eps is None:
        eps = eps_fn(x, t_eval)
    return (a_v / a_u) * x + (s_v - s_u * a_v / a_u) * eps


def ddim_sample(eps_fn, betas, ts, xT):
    a, s = levels(betas, ts)
    x = xT.double()
    for k in range(len(ts)):
        x = D(eps_fn, x, ts[k], a[k], s[k], a[k + 1], s[k + 1])
    return x


def ddim_invert(eps_fn, betas, ts, x0):
    a, s = levels(betas, ts)
    N = len(ts)
    x = x0.double()
    for k in range(N - 1, -1, -1):
        t_eval = ts[k + 1] if k + 1 < N else 1
        x = D(eps_fn, x, t_eval, a[k + 1], s[k + 1], a[k], s[k])
    return x


def _sigma_bar(a, s):
    return [si / ai for ai, si in zip(a, s)]


def obelm_step(eps_fn, ts, a, s, xp, xt, k):
    """x_s from x_p (level k-1) and x_t (level k): MATH.md's level-indexed formula."""
    sb = _sigma_bar(a, s)
    Ht, Hp = sb[k] - sb[k + 1], sb[k - 1] - sb[k]
    e = eps_fn(xt, ts[k])
    return ((Ht**2 / Hp**2) * (a[k + 1] / a[k - 1]) * xp + ((Hp**2 - Ht**2) / Hp**2) * (a[k + 1] / a[k]) * xt
            - (Ht * (Ht + Hp) / Hp) * a[k + 1] * e)


def obelm_sample(eps_fn, betas, ts, xT=None, pair=None):
    a, s = levels(betas, ts)
    N = len(ts)
    if pair is None:
        x_prev = xT.double()
        x_cur = D(eps_fn, x_prev, ts[0], a[0], s[0], a[1], s[1])
    else:
        x_prev, x_cur = pair
    for k in range(1, N):
        x_prev, x_cur = x_cur, obelm_step(eps_fn, ts, a, s, x_prev, x_cur, k)
    return x_cur


def obelm_invert(eps_fn, betas, ts, x0):
    """Returns (x_0, x_1): DDIM inversion N -> N-1, then MATH.md's inversion formula."""
    a, s = levels(betas, ts)
    sb = _sigma_bar(a, s)
    N = len(ts)
    x_s = x0.double()
    x_t = D(eps_fn, x_s, 1, a[N], s[N], a[N - 1], s[N - 1])
    for k in range(N - 1, 0, -1):   # t = k, p = k-1, s = k+1
        Ht, Hp = sb[k] - sb[k + 1], sb[k - 1] - sb[k]
        e = eps_fn(x_t, ts[k])
        x_p = ((Hp**2 / Ht**2) * (a[k - 1] / a[k + 1]) * x_s + ((Ht**2 - Hp**2) / Ht**2) * (a[k - 1] / a[k]) * x_t
               + (Hp * (Ht + Hp) / Ht) * a[k - 1] * e)
        x_s, x_t = x_t, x_p
    return x_t, x_s


def bdia_sample(eps_fn, betas, ts, gamma, xT=None, pair=None):
    a, s = levels(betas, ts)
    N = len(ts)
    if pair is None:
        x_prev = xT.double()
        x_cur = D(eps_fn, x_prev, ts[0], a[0], s[0], a[1], s[1])
    else:
        x_prev, x_cur = pair
    for k in range(1, N):
        e = eps_fn(x_cur, ts[k])
        back = D(eps_fn, x_cur, None, a[k], s[k], a[k - 1], s[k - 1], eps=e)
        fwd = D(eps_fn, x_cur, None, a[k], s[k], a[k + 1], s[k + 1], eps=e)
        x_prev, x_cur = x_cur, gamma * (x_prev - back) + fwd
    return x_cur


def bdia_invert(eps_fn, betas, ts, gamma, x0):
    a, s = levels(betas, ts)
    N = len(ts)
    x_next = x0.double()
    x_cur = D(eps_fn, x_next, 1, a[N], s[N], a[N - 1], s[N - 1])
    for k in range(N - 1, 0, -1):
        e = eps_fn(x_cur, ts[k])
        back = D(eps_fn, x_cur, None, a[k], s[k], a[k - 1], s[k - 1], eps=e)
        fwd = D(eps_fn, x_cur, None, a[k], s[k], a[k + 1], s[k + 1], eps=e)
        x_next, x_cur = x_cur, (x_next - fwd) / gamma + back
    return x_cur, x_next


def edict_sample(eps_fn, betas, ts, p, xT=None, pair=None):
    a_, s_ = levels(betas, ts)
    x, y = (xT.double(), xT.double()) if pair is None else pair
    for k in range(len(ts)):
        a = a_[k + 1] / a_[k]
        b = s_[k + 1] - s_[k] * a
        x1 = a * x + b * eps_fn(y, ts[k])
        y1 = a * y + b * eps_fn(x1, ts[k])
        x = p * x1 + (1 - p) * y1
        y = p * y1 + (1 - p) * x
    return x, y


def edict_invert(eps_fn, betas, ts, p, x0):
    a_, s_ = levels(betas, ts)
    x, y = x0.double(), x0.double()
    for k in range(len(ts) - 1, -1, -1):
        a = a_[k + 1] / a_[k]
        b = s_[k + 1] - s_[k] * a
        y1 = (y - (1 - p) * x) / p
        x1 = (x - (1 - p) * y1) / p
        y = (y1 - b * eps_fn(x1, ts[k])) / a
        x = (x1 - b * eps_fn(y, ts[k])) / a
    return x, y


def nonlinear_eps(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic, smooth, nonlinear stand-in for a network (depends on t too)."""
    tt = float(t) / 1000.0
    return torch.tanh(0.8 * x + 0.3 * tt) + 0.2 * torch.sin(2.0 * x) * (1.0 - tt) + 0.05 * x.mean()

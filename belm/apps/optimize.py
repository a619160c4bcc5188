"""Latent optimization through the whole sampling chain (reversible backpropagation).

:func:`optimize_latent` is generic: given an exactly invertible sampler, a float latent
and any differentiable loss of the sampled output, it runs gradient descent on the latent's
states, each gradient taken through all N steps with ``grad="reversible"`` (memory of
one step, not N). It works with any eps function that lets gradients through (the digits
and pixel models via ``DiffusersEps(..., differentiable=True)``; Stable Diffusion and flow
adapters likewise when their eps function runs under the caller's grad mode).

:func:`optimize_latents` is the digits application: invert held-out digits of one class
exactly, then optimize their latents until the bundled classifier reads the target class,
with a penalty keeping each image close to its original; reported beside
:func:`belm.apps.tasks.edit` on the same digits.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from belm.apps.metrics import reconstruction_errors
from belm.apps.models import ModelHandle
from belm.apps.tasks import classify, edit
from belm.solvers.base import Latent, Sampler
from belm.solvers.registry import make_sampler

__all__ = ["optimize_latent", "optimize_latents", "save_optimize"]

LossFn = Callable[[torch.Tensor], torch.Tensor]


def optimize_latent(sampler: Sampler, latent: Latent, loss_fn: LossFn, *, iters: int = 40, lr: float = 0.05,
                    states: str = "all", optimizer: str = "adam",
                    done: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                    callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None
                    ) -> tuple[Latent, torch.Tensor, int]:
    """Adam on a latent's states so that ``loss_fn(sampler.sample(latent))`` decreases.

    Args:
        sampler: an exactly invertible sampler (O-BELM, BDIA, EDICT, BELM(k); float mode).
        latent: a float :class:`Latent` of ``sampler`` (e.g. from ``sampler.invert``), batch B.
        loss_fn: output (B, ...) → per-sample losses (B,) (or a scalar); must be differentiable.
        iters: at most this many gradient steps (each one forward + one reversible backward
            through all N steps).
        lr: Adam step size, in units of the latent (unit-variance noise at level 0).
        optimizer: ``"adam"`` (torch.optim.Adam, step ≈ lr per element) or ``"normalized"``
            (steepest descent: each sample's latent moves by lr in L2 along its gradient, so
            the change concentrates where the loss is sensitive).
        states: ``"all"`` optimizes every tensor of the latent (both of an O-BELM pair, the
            two EDICT registers), ``"noisiest"`` only ``states[0]``.
        done: optional output (B, ...) → bool (B,): a sample that is done is frozen at the
            latent that produced it (the smallest change that reaches the goal).
        callback: called as ``callback(iteration, output, losses)`` after each forward.

    Returns:
        (optimized latent, its sampled output (B, ...), iterations run).
    """
    if type(latent) is not Latent:
        raise TypeError("optimize_latent needs a float Latent (exact='float'); got "
                        f"{type(latent).__name__}: lattice latents hold integer registers")
    if states not in ("all", "noisiest"):
        raise ValueError(f"states must be 'all' or 'noisiest'; got {states!r}")
    if optimizer not in ("adam", "normalized"):
        raise ValueError(f"optimizer must be 'adam' or 'normalized'; got {optimizer!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an integer >= 0; got {iters!r}")
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a positive number; got {lr!r}")
    tensors = [s.detach().clone() for s in latent.states]
    trained = tensors if states == "all" else tensors[:1]
    for t in trained:
        t.requires_grad_(True)
    opt = torch.optim.Adam(trained, lr=lr) if optimizer == "adam" else None
    batch = tensors[0].shape[0]
    frozen = torch.zeros(batch, dtype=torch.bool, device=tensors[0].device)
    kept_states = [t.detach().clone() for t in tensors]
    kept_out: Optional[torch.Tensor] = None
    it = 0
    for it in range(iters + 1):
        out = sampler.sample(latent.replace(states=tensors), grad="reversible" if it < iters else None)
        newly = torch.zeros_like(frozen)
        if done is not None:
            with torch.no_grad():
                newly = done(out.detach()).to(frozen.device) & ~frozen
        if kept_out is None:
            kept_out = out.detach().clone()
        # Samples still moving (and those done just now) take this iterate.
        take = ~frozen
        kept_out[take] = out.detach()[take]
        for k, t in zip(kept_states, tensors):
            k[take] = t.detach()[take]
        frozen |= newly
        if it == iters or bool(frozen.all()):
            break
        losses = loss_fn(out)
        if callback is not None:
            callback(it, out.detach(), losses.detach())
        loss = losses.sum() if losses.ndim else losses
        grads = torch.autograd.grad(loss, trained)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            for t, g in zip(trained, grads):
                t.grad = g
            opt.step()
        with torch.no_grad():
            if opt is None:
                norm = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads)).clamp_min(1e-30)
                shape = (-1,) + (1,) * (grads[0].ndim - 1)
                for t, g in zip(trained, grads):
                    t.sub_(g * (lr / norm).view(shape).to(g.dtype))
            for t, k in zip(tensors, kept_states):
                t[frozen] = k[frozen]       # Adam's momentum would still move a frozen sample
    return latent.replace(states=tuple(k.detach() for k in kept_states)), kept_out, it


def optimize_latents(model: ModelHandle, images: torch.Tensor, source: Any, target: int, *, steps: int = 20,
                     iters: int = 30, lr: float = 0.5, penalty: float = 5.0, sampler: str = "obelm",
                     states: str = "all", optimizer: str = "normalized", confidence: Optional[float] = None,
                     edit_steps: Optional[int] = None, edit_guidance: float = 3.0,
                     progress: bool = False) -> dict[str, Any]:
    """Change held-out digits of class ``source`` until the classifier reads ``target``.

    The images are inverted exactly with the unconditional model (so the latent alone
    carries the digit), then each latent is optimized by :func:`optimize_latent` through
    all ``steps`` steps against cross-entropy(classifier(image), target) + penalty · MSE(image,
    original); a digit is frozen as soon as the classifier reads ``target``. The same digits
    are edited with :func:`belm.apps.tasks.edit` (source → target condition, guidance
    ``edit_guidance``, ``edit_steps`` steps, default ``steps``) for comparison.

    Args:
        model: a :class:`ModelHandle` with a classifier (the bundled digits model).
        images: (B, C, H, W) in [−1, 1], all of class ``source``.
        source, target: class ids.
        steps: sampling steps N of the chain optimized through.
        iters, lr, states, optimizer: as for :func:`optimize_latent`; the default normalized
            descent moves each latent (both O-BELM states, 2×256 numbers for a digit) by 0.5 in
            L2 per iteration and stops a digit at its first success, which keeps the change
            smaller than Adam's (≈ lr on every element at once).
        penalty: weight of the per-image MSE to the original (images in [−1, 1]).
        confidence: a digit is done when the classifier's softmax probability of ``target``
            reaches this (None: as soon as ``target`` is its argmax). The classifier is easily
            fooled by small changes: a higher confidence pushes the digits further towards
            looking like ``target``.

    Returns:
        dict with ``original``, ``optimized``, ``edited`` images and ``summary``: success_rate,
        mean_l2, mean_psnr, seconds, iterations (optimize), and edit_success_rate,
        edit_mean_l2, edit_mean_psnr, edit_seconds (edit), plus the settings.
    """
    if model.classifier is None:
        raise ValueError(f"model {model.name} has no classifier; optimize_latents reads the target class with "
                         "the bundled digits classifier (use optimize_latent with your own loss otherwise)")
    target = model.parse_condition(target, "target")
    if confidence is not None and not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1) or be None; got {confidence!r}")
    if not penalty >= 0:
        raise ValueError(f"penalty must be >= 0; got {penalty!r}")
    eps = model.eps(None, 1.0)
    eps.differentiable = True              # gradients through the UNet (DiffusersEps)
    s = make_sampler(sampler, eps, model.schedule(steps), progress=progress)
    x0 = model.encode(images)
    classifier = model.classifier
    labels = torch.full((len(images),), int(target), dtype=torch.int64, device=images.device)

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        picture = model.decode(x)
        ce = F.cross_entropy(classifier(picture.to(torch.float32)), labels, reduction="none")
        return ce + penalty * (picture - images).flatten(1).square().mean(1)

    def done(x: torch.Tensor) -> torch.Tensor:
        if confidence is None:
            return classify(model, model.decode(x)) == labels
        probs = classifier(model.decode(x).to(torch.float32)).softmax(1)
        return probs.gather(1, labels[:, None])[:, 0] >= confidence

    t0 = time.perf_counter()
    latent = s.invert(x0)
    _, x_opt, iterations = optimize_latent(s, latent, loss_fn, iters=iters, lr=lr, states=states,
                                              optimizer=optimizer, done=done)
    optimized = model.decode(x_opt)
    seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    edited = edit(model, images, source, target, sampler=sampler, steps=edit_steps or steps,
                  guidance=edit_guidance, progress=progress)["images"]
    edit_seconds = time.perf_counter() - t0

    def figures(result: torch.Tensor) -> tuple[float, float, float]:
        success = float((classify(model, result) == labels).float().mean())
        l2 = float((result.double() - images.double()).flatten(1).norm(dim=1).mean())
        psnr = [p for p in reconstruction_errors(images, result)["psnr"] if math.isfinite(p)]
        return success, l2, (sum(psnr) / len(psnr)) if psnr else math.inf

    ok, l2, psnr = figures(optimized)
    e_ok, e_l2, e_psnr = figures(edited)
    summary = dict(source=source, target=int(target), num=len(images), sampler=sampler, steps=steps, iters=iters,
                   lr=lr, penalty=penalty, states=states, optimizer=optimizer, confidence=confidence,
                   model=model.name,
                   success_rate=ok, mean_l2=l2, mean_psnr=psnr, seconds=seconds, iterations=iterations,
                   edit_success_rate=e_ok, edit_mean_l2=e_l2, edit_mean_psnr=e_psnr, edit_seconds=edit_seconds,
                   edit_steps=edit_steps or steps, edit_guidance=edit_guidance)
    return {"original": images, "optimized": optimized, "edited": edited, "summary": summary}


def save_optimize(out: Any, result: dict[str, Any], scale: int = 4) -> None:
    """Write ``optimize.png`` (rows: original, optimized, edited), the optimized digits and
    ``summary.json`` into an :class:`belm.apps.io.OutputDir` (inside its ``with`` block)."""
    from belm.apps.io import save_grid, save_images
    save_grid(out, [result["original"], result["optimized"], result["edited"]], "optimize.png")
    save_images(out, result["optimized"], [f"optimized_{i:03d}.png" for i in range(len(result["optimized"]))],
                scale=scale)
    out.write_json("summary.json", result["summary"])

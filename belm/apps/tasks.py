"""The applications, as plain functions: each composes a model handle, a sampler and tensors.

They return tensors and figures; writing files is the CLI's job (:mod:`belm.cli`).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Sequence

import torch

from belm.apps.metrics import frechet_distance, reconstruction_errors
from belm.apps.models import ModelHandle
from belm.solvers.base import Latent
from belm.solvers.registry import make_sampler

__all__ = ["reconstruct", "edit", "interpolate", "latent_statistics", "slerp", "generate", "generate_batches",
           "sample_latent", "concat_latents", "seeded_noise", "classify", "fd_to_reference"]


def _sampler(model: ModelHandle, name: str, steps: int, condition: Any, guidance: float, progress: bool,
             spacing: Optional[str] = None, sampler_options: Optional[dict] = None,
             size: Optional[Sequence[int]] = None):
    """A sampler on the model's default grid for ``name`` (or ``spacing``); its ``invert`` warns
    (:class:`~belm.errors.GrowthWarning`) if inverting on that grid blows up the parasitic mode.
    ``size``: the images' (H, W) in pixels (FLUX's grid depends on it)."""
    schedule = model.schedule(steps, spacing=spacing, sampler=name, size=None if size is None else tuple(size))
    return make_sampler(name, model.eps(condition, guidance), schedule, progress=progress, **(sampler_options or {}))


def concat_latents(latents: Sequence[Latent]) -> Latent:
    """One latent holding the batches of several (same method, schedule and level): states
    concatenated along the batch dimension, e.g. to save a batched inversion as one file.

    Raises:
        ValueError: the latents differ in identity, level or kind (only float latents concatenate).
    """
    first = latents[0]
    for lat in latents[1:]:
        if (type(lat), lat.method, lat.schedule, lat.level, lat.dtype) != \
                (type(first), first.method, first.schedule, first.level, first.dtype):
            raise ValueError("latents of different methods, schedules or levels cannot be concatenated")
    if len(latents) == 1:
        return first
    if type(first) is not Latent:
        raise ValueError(f"only float latents concatenate; got kind {first.kind!r}")
    return first.replace(states=[torch.cat(parts) for parts in zip(*(lat.states for lat in latents))])


def latent_statistics(latent: Latent) -> dict:
    """``latent_std`` and ``latent_max_abs`` of the noisiest state (a noise-like latent: ≈ 1 and ≈ 4)."""
    x = latent.states[0].to(torch.float64)
    return {"latent_std": float(x.std()), "latent_max_abs": float(x.abs().max())}


def reconstruct(model: ModelHandle, images: torch.Tensor, *, sampler: str = "obelm", steps: int = 50,
                condition: Any = None, guidance: float = 1.0, progress: bool = True, spacing: Optional[str] = None,
                sampler_options: Optional[dict] = None, batch_size: Optional[int] = None) -> dict:
    """Invert images and sample them back with the same condition.

    Args:
        images: (B, C, H, W) in [−1, 1].
        condition: one condition for all images, or one per image (list).
        spacing: the grid (None: belm's default for ``sampler``); ``sampler_options``: e.g.
            ``{"gamma": 0.5}`` for BDIA, ``{"p": 0.9}`` for EDICT.
        batch_size: images per invert/sample pass (None: all at once). Each batch is inverted
            and sampled back with the same composition, so exactness does not depend on it.

    Returns a dict with ``reconstruction`` (images in [−1, 1]), ``inverted`` (the inverted
    :class:`Latent` of all images, batches concatenated) and per-image error lists
    (``max_abs_error``, ``mse``, ``psnr`` each):

    - ``latent``: ``sample(invert(x0))`` against ``x0`` in model space: the sampler's
      exactness (for pixel models this is also the error against the input image);
    - latent models only: ``pixel``, the decoded reconstruction against the *input image*
      (end to end; dominated by the VAE, which is not invertible), and ``vae``, the VAE's
      own round trip ``decode(encode(image))`` against the input, for scale.
    """
    per_image = isinstance(condition, (list, tuple, torch.Tensor))
    if per_image and len(condition) != len(images):
        raise ValueError(f"one condition per image expected: {len(condition)} conditions for {len(images)} images")
    step = batch_size or len(images)
    if step < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    x0s, recs, lats = [], [], []
    for i in range(0, len(images), step):
        cond = list(condition[i:i + step]) if per_image else condition
        s = _sampler(model, sampler, steps, cond, guidance, progress, spacing, sampler_options, images.shape[-2:])
        x0 = model.encode(images[i:i + step])
        x0s.append(x0)
        lats.append(s.invert(x0))
        recs.append(s.sample(lats[-1]))
    x0, x_rec = torch.cat(x0s), torch.cat(recs)
    out = {"latent": reconstruction_errors(x0, x_rec), "reconstruction": model.decode(x_rec),
           "inverted": concat_latents(lats)}
    if model.kind == "latent":
        out["pixel"] = reconstruction_errors(images.to(out["reconstruction"]), out["reconstruction"])
        out["vae"] = reconstruction_errors(images.to(out["reconstruction"]), model.decode(x0))
    return out


def edit(model: ModelHandle, images: torch.Tensor, source: Any, target: Any, *, sampler: str = "obelm",
         steps: int = 50, freeze: int = 0, guidance: float = 3.0, inversion_guidance: float = 1.0,
         spacing: Optional[str] = None, progress: bool = True, sampler_options: Optional[dict] = None,
         batch_size: Optional[int] = None) -> dict:
    """Invert with the ``source`` condition up to level ``freeze``, resample with ``target``.

    ``freeze`` = 0 inverts all the way to the noisiest level; larger values keep more of the
    original (the chain is re-sampled only from level ``freeze`` on). ``spacing``: the grid
    (None: belm's default for ``sampler``, see :meth:`ModelHandle.schedule`). ``batch_size``:
    images per invert/sample pass (None: all at once); the figures are over all images.

    Returns a dict: ``images`` (B, C, H, W) in [−1, 1]; ``inverted`` (the :class:`Latent` at
    level ``freeze``); ``latent_std``, ``latent_max_abs`` (noisiest state of the inverted
    latent); ``change_l2`` (mean per-image L2 norm of edited − source, image units) and
    ``change_psnr`` (mean dB); for models with a classifier and a class target: ``predicted`` (B,) and ``success_rate`` (fraction classified as target).
    """
    if not 0 <= freeze < steps:
        raise ValueError(f"freeze must lie in [0, {steps - 1}] (freeze < steps); got {freeze}")
    step = batch_size or len(images)
    if step < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    lats, outs = [], []
    for i in range(0, len(images), step):
        inverter = _sampler(model, sampler, steps, source, inversion_guidance, progress, spacing, sampler_options,
                            images.shape[-2:])
        lats.append(inverter.invert(model.encode(images[i:i + step]), to_level=freeze))
        resampler = make_sampler(sampler, model.eps(target, guidance), inverter.schedule, progress=progress,
                                 **(sampler_options or {}))
        outs.append(model.decode(resampler.sample(lats[-1])))
    lat, edited = concat_latents(lats), torch.cat(outs)
    change = reconstruction_errors(images, edited)
    finite = [p for p in change["psnr"] if math.isfinite(p)]
    out = {"images": edited, "inverted": lat, **latent_statistics(lat),
           "change_l2": float((edited.to(torch.float64) - images.to(torch.float64)).flatten(1).norm(dim=1).mean()),
           "change_psnr": (sum(finite) / len(finite)) if finite else math.inf}
    predicted = classify(model, edited) if isinstance(target, int) else None
    if predicted is not None:
        out["predicted"] = predicted
        out["success_rate"] = float((predicted == target).float().mean())
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation per sample (exact endpoints: weight 0 → a, 1 → b, bit for bit)."""
    if weight == 0:
        return a.clone()
    if weight == 1:
        return b.clone()
    fa, fb = a.flatten(1), b.flatten(1)
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1, 1))
    sin = torch.sin(theta)
    wa = torch.where(sin > 1e-8, torch.sin((1 - weight) * theta) / sin, torch.full_like(sin, 1 - weight))
    wb = torch.where(sin > 1e-8, torch.sin(weight * theta) / sin, torch.full_like(sin, weight))
    shape = (-1,) + (1,) * (a.ndim - 1)
    return wa.view(shape) * a + wb.view(shape) * b


def interpolate(model: ModelHandle, image_a: torch.Tensor, image_b: torch.Tensor, *, num: int = 8,
                sampler: str = "obelm", steps: int = 50, condition: Any = None, guidance: float = 1.0,
                weights: Optional[Sequence[float]] = None, spacing: Optional[str] = None,
                reference: Optional[torch.Tensor] = None, progress: bool = True,
                sampler_options: Optional[dict] = None, batch_size: Optional[int] = None) -> dict:
    """Frames between pairs of *inverted real images*: image_a[i] ↔ image_b[i], each (B, C, H, W).

    Every tensor of the two latents (for 2-step methods the pair x_0, x_1) is slerped with
    the same weight, so weight 0 and 1 give back the originals exactly. ``weights``
    default to ``num`` evenly spaced values in [0, 1].

    ``batch_size``: frames per sampling pass (None: all at once). image_a and image_b are
    inverted as two batches of B, so with B = 1 and ``batch_size=1`` the end frames are
    sampled in the batch composition of their inversion and come back to float64 rounding;
    in larger batches float32 kernels round differently (endpoint error ~1e-5 on digits).

    Returns a dict: ``frames`` (len(weights), B, C, H, W) in [−1, 1]; ``weights``; ``inverted``
    (one :class:`Latent` of 2B: image_a's latents, then image_b's);
    ``endpoint_max_abs_error`` (frames at weight 0 / 1 against the inputs; None if neither
    weight is used); ``latent_std``, ``latent_max_abs`` (noisiest states of both latents);
    for the frames at 0 < weight < 1 with a classifier: ``middle_confidence`` (mean top
    softmax probability) and, given ``reference`` images (default for the digits model: the
    held-out digits) and at least 2 such frames, ``middle_fd`` (FD-digits to the reference).
    """
    if weights is None:
        if num < 2:
            raise ValueError(f"num must be >= 2 for an interpolation; got {num}")
        weights = [i / (num - 1) for i in range(num)]
    weights = [float(w) for w in weights]
    if not weights or any(not 0.0 <= w <= 1.0 for w in weights):
        raise ValueError(f"weights must be a non-empty list of numbers in [0, 1]; got {weights}")
    if image_a.shape != image_b.shape:
        raise ValueError(f"image_a and image_b must have the same shape; got {tuple(image_a.shape)} and "
                         f"{tuple(image_b.shape)}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    s = _sampler(model, sampler, steps, condition, guidance, progress, spacing, sampler_options, image_a.shape[-2:])
    B = image_a.shape[0]
    la, lb = s.invert(model.encode(image_a)), s.invert(model.encode(image_b))
    if type(la) is not Latent:
        raise ValueError("interpolation needs float latents (exact='float')")
    both = la.replace(states=[torch.cat([xa, xb]) for xa, xb in zip(la.states, lb.states)])
    step = batch_size or len(weights)
    frames = torch.cat([model.decode(s.sample(la.replace(states=[
        torch.cat([slerp(xa, xb, w) for w in weights[j:j + step]]) for xa, xb in zip(la.states, lb.states)])))
        for j in range(0, len(weights), step)])
    frames = frames.reshape(len(weights), B, *frames.shape[1:])
    ends = [(frames[i] - (image_a if w == 0 else image_b)).abs().max().item()
            for i, w in enumerate(weights) if w in (0.0, 1.0)]
    out = {"frames": frames, "weights": weights, "endpoint_max_abs_error": max(ends) if ends else None,
           "inverted": both, **latent_statistics(both)}
    middle = frames[[i for i, w in enumerate(weights) if 0 < w < 1]].flatten(0, 1)
    if len(middle) and model.classifier is not None:
        with torch.no_grad():
            probs = model.classifier(middle.to(torch.float32)).softmax(1)
        out["middle_confidence"] = float(probs.max(1).values.mean())
        if reference is None and model.dataset is not None:
            reference = model.reference_images("heldout")[0]
        if reference is not None and len(middle) >= 2:
            out["middle_fd"] = fd_to_reference(model, middle.cpu(), reference)
    return out


def seeded_noise(shape: Sequence[int], seeds: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One standard-normal tensor per seed, each from its own generator: sample i depends only
    on seeds[i], so any split of the seed range (batches, processes) gives the same bits."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=dtype)
                        for s in seeds])


def generate(model: ModelHandle, seeds: Sequence[int], *, sampler: str = "obelm", steps: int = 50,
             condition: Any = None, guidance: float = 1.0, batch_size: int = 64,
             progress: bool = True, spacing: Optional[str] = None,
             sampler_options: Optional[dict] = None) -> torch.Tensor:
    """Images for the given seeds, in batches of ``batch_size`` (all of them in memory: to write
    many, iterate :func:`generate_batches` instead).

    Each sample's noise depends only on its seed; the network's float bits can still depend
    on the batch composition (kernel blocking), so equal batches give equal bits.
    """
    outs = list(generate_batches(model, seeds, sampler=sampler, steps=steps, condition=condition,
                                 guidance=guidance, batch_size=batch_size, progress=progress, spacing=spacing,
                                 sampler_options=sampler_options))
    return torch.cat(outs) if outs else torch.empty(0, *model.shape)


def generate_batches(model: ModelHandle, seeds: Sequence[int], *, sampler: str = "obelm", steps: int = 50,
                     condition: Any = None, guidance: float = 1.0, batch_size: int = 64,
                     progress: bool = True, spacing: Optional[str] = None,
                     sampler_options: Optional[dict] = None) -> Iterator[torch.Tensor]:
    """:func:`generate` one batch at a time: yields the (b, C, H, W) images of
    ``seeds[i:i + batch_size]`` for i = 0, batch_size, …, so a caller can write each batch out
    before the next is sampled (memory: one batch, whatever ``len(seeds)``).

    Raises (before any sampling):
        ValueError: a condition list whose length differs from ``seeds``'.
    """
    per_sample = isinstance(condition, (list, tuple, torch.Tensor))
    if per_sample and len(condition) != len(seeds):
        raise ValueError(f"one condition per seed expected: {len(condition)} conditions for {len(seeds)} seeds")
    shape = model.shape if model.kind == "pixel" else _latent_shape(model)
    schedule = model.schedule(steps, spacing=spacing, sampler=sampler)   # at the handle's image size

    def batches() -> Iterator[torch.Tensor]:
        for i in range(0, len(seeds), batch_size):
            cond = list(condition[i:i + batch_size]) if per_sample else condition
            s = make_sampler(sampler, model.eps(cond, guidance), schedule, progress=progress,
                             **(sampler_options or {}))
            noise = seeded_noise(shape, seeds[i:i + batch_size])
            yield model.decode(s.sample(noise.to(model.unet.device)))

    return batches()


def sample_latent(model: ModelHandle, latent: Latent, *, sampler: str = "obelm", steps: int = 50,
                  condition: Any = None, guidance: float = 1.0, batch_size: Optional[int] = None,
                  progress: bool = True, spacing: Optional[str] = None,
                  sampler_options: Optional[dict] = None) -> torch.Tensor:
    """Images (B, C, H, W) in [−1, 1] sampled from a saved / inverted ``latent`` of B images.

    The sampler must be the one that inverted it (method, parameters, grid): otherwise
    :class:`~belm.errors.LatentMismatchError` names both. ``batch_size``: images per pass
    (None: all at once, the batch composition of an inversion of all images at once, so a
    round trip comes back bit for bit). ``condition``: one, or one per image.

    Raises:
        ValueError: the latent's images do not fit the model (shape / channels).
    """
    x = latent.states[0]
    if model.kind == "pixel":
        if tuple(x.shape[1:]) != tuple(model.shape):
            raise ValueError(f"the latent holds images of shape {tuple(x.shape[1:])}; model {model.name} takes "
                             f"{tuple(model.shape)}")
        size = None
    else:
        if x.ndim != 4 or x.shape[1] != model.sd.latent_channels:
            raise ValueError(f"the latent has shape {tuple(x.shape)}; model {model.name} takes (B, "
                             f"{model.sd.latent_channels}, h, w) latents")
        size = (x.shape[-2] * model.sd.vae_factor, x.shape[-1] * model.sd.vae_factor)
    B = x.shape[0]
    per_image = isinstance(condition, (list, tuple, torch.Tensor))
    if per_image and len(condition) != B:
        raise ValueError(f"one condition per image expected: {len(condition)} conditions for {B} images")
    step = batch_size or B
    if step < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    outs = []
    for i in range(0, B, step):
        cond = list(condition[i:i + step]) if per_image else condition
        s = _sampler(model, sampler, steps, cond, guidance, progress, spacing, sampler_options, size)
        part = latent.replace(states=[t[i:i + step].to(model.unet.device) for t in latent.states])
        outs.append(model.decode(s.sample(part)))
    return torch.cat(outs)


def _latent_shape(model: ModelHandle) -> tuple[int, int, int]:
    C, H, W = model.shape
    f = model.sd.vae_factor
    return (model.sd.latent_channels, H // f, W // f)


@torch.no_grad()
def classify(model: ModelHandle, images: torch.Tensor) -> Optional[torch.Tensor]:
    """Predicted class ids by the model's classifier (None if it has none)."""
    if model.classifier is None:
        return None
    return model.classifier(images.to(torch.float32)).argmax(1)


def fd_to_reference(model: ModelHandle, images: torch.Tensor, reference: torch.Tensor,
                    extractor=None) -> float:
    """Fréchet distance between two image sets in the feature space of ``extractor``
    (default: the bundled digit classifier's penultimate layer: FD-digits)."""
    if extractor is None:
        if model.classifier is None:
            raise ValueError("this model has no bundled classifier; pass an extractor (e.g. Inception features)")
        extractor = model.classifier.features
    return frechet_distance(images.to(torch.float32), reference.to(torch.float32), extractor=extractor)


def psnr_summary(errors: dict) -> dict:
    """Aggregate per-image figures into the summary.json fields."""
    finite = [p for p in errors["psnr"] if math.isfinite(p)]
    return {"max_abs_error": max(errors["max_abs_error"]), "mse": sum(errors["mse"]) / len(errors["mse"]),
            "psnr": (sum(finite) / len(finite)) if finite else math.inf}

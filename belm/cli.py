"""The ``belm`` command: demo, sample, reconstruct, edit, interpolate, fd.

Every command validates its arguments before any work, writes its pictures and a strict-JSON
``summary.json`` (the run's settings included) into ``--out`` only when it succeeds
(nothing half-written, nothing stale from an earlier run), prints a short table, and exits
with status 2 and a one-line message on bad input (``--debug`` for a traceback).

Threads: torch's CPU thread count is pinned by ``--threads`` (default: ``$BELM_THREADS``,
else ``$OMP_NUM_THREADS``, else 1). One thread cannot collapse when other processes share
the cores (torch's default, one thread per core, slowed ``make demo`` 13× on a busy 2-core
machine); ``--threads 0`` restores torch's default for a machine of your own.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Optional, Sequence

__all__ = ["main", "build_parser", "resolve_threads"]

DTYPES = ("float32", "float64", "bfloat16", "float16")
SPACING_CHOICES = ("linspace", "leading", "trailing", "config")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (the usage is one `-h` away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default; a default of None reads as the help text says."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "%(default)" in text \
                or action.default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def resolve_threads(value: Optional[int]) -> int:
    """The torch CPU thread count for ``--threads value``: the value if given, else
    ``$BELM_THREADS``, else ``$OMP_NUM_THREADS``, else 1. 0 means torch's own default.

    Raises:
        CLIError: a negative or non-integer value (naming where it came from).
    """
    source, raw = "--threads", value
    if raw is None:
        for name in ("BELM_THREADS", "OMP_NUM_THREADS"):
            if os.environ.get(name, "").strip():
                source, raw = f"${name}", os.environ[name].strip()
                break
        else:
            return 1
    try:
        threads = int(raw)
    except (TypeError, ValueError):
        raise CLIError(f"{source} must be an integer >= 0 (0 = torch's default); got {raw!r}") from None
    if threads < 0:
        raise CLIError(f"{source} must be >= 0 (0 = torch's default); got {threads}")
    return threads


def _pin_threads(threads: int) -> None:
    """torch's intra-op threads, and the BLAS/OpenMP pools numpy and scipy use (the FD's
    matrix square root), so that no pool spins on cores other processes hold."""
    import torch
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - comes with scikit-learn
        return
    threadpool_limits(threads)


def build_parser() -> argparse.ArgumentParser:
    from belm._version import __version__
    from belm.apps.models import BUNDLED_MODELS
    from belm.solvers.registry import sampler_names

    parser = _Parser(prog="belm", description="Exact inversion of diffusion models.", formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"belm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--threads", type=int, default=None,
                       help="CPU threads of torch and of numpy/scipy's BLAS; default $BELM_THREADS, else $OMP_NUM_THREADS, else 1 (safe on a "
                            "shared machine); 0 = torch's default (one per core)")
        p.add_argument("--no-progress", action="store_true",
                       help="hide progress bars, diffusers'/transformers' loading bars and their warnings")
        p.add_argument("--debug", action="store_true", help="show full tracebacks")

    def common(p: argparse.ArgumentParser, steps: int = 50, num: int = 16, guidance: float = 1.0) -> None:
        p.add_argument("--model", default="digits",
                       help="'digits' or 'digits-flow' (bundled; the second a rectified flow) or a local diffusers "
                            "folder: Stable Diffusion 1.x/2.x, SDXL, SD3 or FLUX pipeline, or a pixel UNet2DModel "
                            "pipeline")
        p.add_argument("--sampler", default="obelm", choices=sampler_names(), metavar="NAME",
                       help=f"one of {', '.join(sampler_names())}")
        p.add_argument("--steps", type=int, default=steps, help="sampling steps N")
        p.add_argument("--spacing", default=None, choices=SPACING_CHOICES,
                       help="sampling grid: linspace, leading, trailing, or config (the model's scheduler "
                            "config); default: belm's default for the sampler (printed). Flow models (digits-flow, "
                            "SD3, FLUX) have their own sigma grid: omit it")
        p.add_argument("--guidance", type=float, default=guidance, help="classifier-free guidance scale (1 = none)")
        p.add_argument("--gamma", type=float, default=None, help="BDIA's gamma in (0, 1] (--sampler bdia; "
                       "default 1.0)")
        p.add_argument("--p", type=float, default=None, help="EDICT's mixing p in (0, 1) (--sampler edict; "
                       "default 0.93)")
        p.add_argument("--seed", type=int, default=0, help="seed (sample i uses seed + i; picks held-out digits)")
        latent_note = "; default 16 (with --latent: its first --num images, default all)"
        p.add_argument("--num", type=int, default=num, help="number of images" + (latent_note if num is None else ""))
        p.add_argument("--out", default=None, help="output folder (default outputs/COMMAND)")
        p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps")
        p.add_argument("--dtype", default="float32", choices=DTYPES,
                       help="dtype of the network (the sampler state stays float64)")
        p.add_argument("--null-class", type=int, default=None,
                       help="class-conditional folders: the unconditional class id, needed for --guidance != 1 "
                            "(digits: built in)")
        p.add_argument("--negative-prompt", default=None,
                       help="Stable Diffusion: the unconditional prompt of guidance (default: empty prompt)")
        run_options(p)

    def batch(p: argparse.ArgumentParser, default: Optional[int], what: str) -> None:
        p.add_argument("--batch-size", type=int, default=default, help=what)

    def save_latent(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--save-latent", default=None, metavar="PATH",
                       help=f"also write {what} to PATH (safetensors; sample it back with belm sample --latent PATH "
                            "and the same --model, --sampler, --steps, --spacing)")

    p = sub.add_parser("demo", help="the tour: reconstruction, editing, interpolation, sampling, FD",
                       formatter_class=_Formatter)
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.add_argument("--model", default="digits", choices=BUNDLED_MODELS,
                   help="the bundled model to tour: digits (DDPM) or digits-flow (rectified flow)")
    p.add_argument("--quick", action="store_true", help="fewer images and steps (a smoke test)")
    run_options(p)

    p = sub.add_parser("sample", help="generate images from seeds", formatter_class=_Formatter)
    common(p, num=None, guidance=3.0)
    p.add_argument("--target", default=None,
                   help="class id (digits) or prompt (SD); default: all classes in turn. With --latent: the "
                        "condition it was inverted with (reconstruct: --source, or the digits' labels as a "
                        "comma list 3,1,4; edit: --target for the edit, --source for the original)")
    p.add_argument("--latent", default=None, metavar="PATH",
                   help="sample from a latent saved by --save-latent (same --model, --sampler, --steps, --spacing "
                        "as its inversion; a mismatch is refused) instead of noise from seeds")
    batch(p, None, "images per sampling pass (bits depend on the batch composition); default 64, with "
                   "--latent all at once (as inverted)")

    p = sub.add_parser("reconstruct", help="invert and resample images; report the error", formatter_class=_Formatter)
    common(p)
    p.add_argument("--image", action="append", default=None,
                   help="image file (repeatable); digits: --num held-out digits. Pixel models resize to their "
                        "square size (a warning says so); SD center-crops to a multiple of the VAE factor")
    p.add_argument("--source", default=None, help="condition used for both directions (class id or prompt)")
    batch(p, None, "images per invert/sample pass (default: all at once)")
    save_latent(p, "the inverted latents (one file for all images)")

    p = sub.add_parser("edit", help="invert with --source up to --freeze, resample with --target",
                       formatter_class=_Formatter)
    common(p, guidance=3.0)
    p.add_argument("--image", action="append", default=None,
                   help="image file (repeatable); digits: held-out digits of class --source")
    p.add_argument("--source", default=None, help="source class id (digits) or prompt (SD); required")
    p.add_argument("--target", default=None, help="target class id (digits) or prompt (SD); required")
    p.add_argument("--freeze", type=int, default=None,
                   help="inversion stops at this level (0 = full noise); default 0")
    p.add_argument("--inversion-guidance", type=float, default=1.0, help="guidance scale of the inversion")
    batch(p, None, "images per invert/sample pass (default: all at once)")
    save_latent(p, "the latents inverted with --source up to --freeze (one file for all images)")

    p = sub.add_parser("interpolate", help="interpolate between two inverted real images", formatter_class=_Formatter)
    common(p, num=8)
    p.add_argument("--image", action="append", default=None, help="two image files; digits: two held-out digits")
    p.add_argument("--source", default=None, help="condition for inversion and sampling")
    batch(p, 1, "frames per sampling pass; 1 samples the end frames in the same batch composition as their "
                "inversion, so they come back exactly (larger: faster, end frames within ~2e-5)")
    save_latent(p, "the two inverted latents (one file of batch 2)")

    p = sub.add_parser("optimize", help="change held-out digits to a target class by gradient descent on their "
                       "exact latents through the whole chain; edit beside it", formatter_class=_Formatter)
    p.add_argument("--model", default="digits", choices=BUNDLED_MODELS, help="a bundled model")
    p.add_argument("--source", type=int, required=True, help="class id of the held-out digits to change")
    p.add_argument("--target", type=int, required=True, help="class id the classifier should read")
    p.add_argument("--num", type=int, default=16, help="number of digits")
    p.add_argument("--steps", type=int, default=20, help="sampling steps N of the chain optimized through")
    p.add_argument("--sampler", default="obelm", choices=("obelm", "bdia", "edict"), help="an exact sampler")
    p.add_argument("--iters", type=int, default=30, help="at most this many gradient steps per digit")
    p.add_argument("--lr", type=float, default=0.5, help="L2 length of each latent step (normalized descent)")
    p.add_argument("--penalty", type=float, default=5.0, help="weight of the MSE to the original image")
    p.add_argument("--confidence", type=float, default=None,
                   help="a digit is done when p(target) reaches this (default: when it is the top class)")
    p.add_argument("--edit-guidance", type=float, default=3.0, help="guidance of the edit run beside it")
    p.add_argument("--seed", type=int, default=0, help="picks the held-out digits (as belm edit does)")
    p.add_argument("--out", default=None, help="output folder (default outputs/optimize)")
    run_options(p)

    p = sub.add_parser("fd", help="Fréchet distance (FD-digits) of samples to the held-out digits",
                       formatter_class=_Formatter)
    common(p, num=297, guidance=1.0)
    batch(p, 128, "images per sampling pass")
    return parser


# -- argument checks ----------------------------------------------------------------------
def _check_device(device: str) -> None:
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {device}: not a torch device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                           f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'}); "
                           "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s); "
                           f"use cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise CLIError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise CLIError(f"--device {device}: belm runs on cpu, cuda or mps; use one of those")


def _check_paths(args: argparse.Namespace) -> None:
    """--latent must exist; --save-latent must be a file path in an existing folder."""
    latent = getattr(args, "latent", None)
    if latent is not None:
        if not os.path.isfile(latent):
            raise CLIError(f"--latent {latent}: no such file; pass a file written by --save-latent")
    target = getattr(args, "save_latent", None)
    if target is not None:
        parent = os.path.dirname(os.path.abspath(target))
        if os.path.isdir(target):
            raise CLIError(f"--save-latent {target} is a folder; pass a file name such as latent.safetensors")
        if not os.path.isdir(parent):
            raise CLIError(f"--save-latent {target}: folder {parent} does not exist; create it first")
        if not os.access(parent, os.W_OK):
            raise CLIError(f"--save-latent {target}: folder {parent} is not writable; choose another path")


def _check_optimize(args: argparse.Namespace) -> None:
    from belm.models.data import NUM_CLASSES
    for arg in ("source", "target"):
        if not 0 <= getattr(args, arg) < NUM_CLASSES:
            raise CLIError(f"--{arg} must be a class id in [0, {NUM_CLASSES - 1}]; got {getattr(args, arg)}")
    if args.source == args.target:
        raise CLIError(f"--target must differ from --source (both {args.source})")
    for arg in ("num", "steps"):
        if getattr(args, arg) < 1:
            raise CLIError(f"--{arg} must be >= 1; got {getattr(args, arg)}")
    if args.iters < 0:
        raise CLIError(f"--iters must be >= 0; got {args.iters}")
    if not args.lr > 0:
        raise CLIError(f"--lr must be > 0; got {args.lr}")
    if not args.penalty >= 0:
        raise CLIError(f"--penalty must be >= 0; got {args.penalty}")
    if args.confidence is not None and not 0 < args.confidence < 1:
        raise CLIError(f"--confidence must lie in (0, 1); got {args.confidence}")
    if args.edit_guidance < 0:
        raise CLIError(f"--edit-guidance must be >= 0; got {args.edit_guidance}")
    _check_out(args)


def _check(args: argparse.Namespace) -> None:
    from belm.apps.models import BUNDLED_MODELS
    if args.command == "optimize":
        return _check_optimize(args)
    bundled = args.model in BUNDLED_MODELS
    _check_paths(args)
    if args.num is None and getattr(args, "latent", None) is None:
        args.num = 16
    if args.steps < 1:
        raise CLIError(f"--steps must be >= 1; got {args.steps}")
    if args.num is not None and args.num < 1:
        raise CLIError(f"--num must be >= 1; got {args.num}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.guidance < 0:
        raise CLIError(f"--guidance must be >= 0; got {args.guidance}")
    if args.gamma is not None and args.sampler != "bdia":
        raise CLIError(f"--gamma applies to --sampler bdia only; got --sampler {args.sampler}")
    if args.p is not None and args.sampler != "edict":
        raise CLIError(f"--p applies to --sampler edict only; got --sampler {args.sampler}")
    if args.gamma is not None and not 0 < args.gamma <= 1:
        raise CLIError(f"--gamma must lie in (0, 1]; got {args.gamma}")
    if args.p is not None and not 0 < args.p < 1:
        raise CLIError(f"--p must lie in (0, 1); got {args.p}")
    if args.command == "edit":
        for arg in ("source", "target"):
            if getattr(args, arg) is None and bundled:
                raise CLIError(f"edit needs --{arg} (a class id for --model {args.model}), e.g. --source 3 --target 8")
        if args.freeze is not None and not 0 <= args.freeze < args.steps:
            raise CLIError(f"--freeze must lie in [0, {args.steps - 1}] (freeze < steps); got {args.freeze}")
    for path in getattr(args, "image", None) or []:
        if not os.path.isfile(path):
            raise CLIError(f"--image {path}: no such file")
    if args.command == "interpolate" and args.image and len(args.image) != 2:
        raise CLIError(f"--image must be given exactly twice for interpolate; got {len(args.image)}")
    _check_device(args.device)
    if not bundled:
        if not os.path.isdir(args.model):
            raise CLIError(f"--model {args.model}: no such folder; pass 'digits', 'digits-flow' or a local diffusers "
                           "folder")
        from belm.adapters.stable_diffusion import check_model_folder
        try:
            args.model_kind = check_model_folder(args.model)
        except (ValueError, FileNotFoundError) as err:
            raise CLIError(f"--model {err}") from None
        if args.null_class is not None and args.null_class < 0:
            raise CLIError(f"--null-class must be a class id >= 0; got {args.null_class}")
        if args.negative_prompt is not None and args.model_kind == "pixel":
            raise CLIError(f"--negative-prompt applies to Stable Diffusion folders; {args.model} is a pixel model")
        if args.negative_prompt is not None and args.model_kind == "flux":
            raise CLIError(f"--negative-prompt: {args.model} is a FLUX folder, guided by its distilled guidance "
                           "(--guidance), not by a negative prompt; omit --negative-prompt")
    else:
        if args.negative_prompt is not None:
            raise CLIError(f"--negative-prompt applies to Stable Diffusion folders, not --model {args.model}")
        if args.null_class is not None:
            raise CLIError(f"--null-class: --model {args.model} has its null class built in; omit --null-class")
        # Known without loading the model, so a typo fails before any work.
        from belm.models.data import NUM_CLASSES
        for arg in ("source", "target"):
            value = getattr(args, arg, None)
            # sample --latent --target takes one id per image (the labels a reconstruction was inverted with)
            values = str(value).split(",") if arg == "target" and getattr(args, "latent", None) else [value]
            for v in values if value is not None else []:
                if not str(v).strip().lstrip("-").isdigit() or not 0 <= int(v) < NUM_CLASSES:
                    raise CLIError(f"--{arg} must be a class id in [0, {NUM_CLASSES - 1}] for --model {args.model}; "
                                   f"got {value!r}")
    _check_out(args)


def _check_out(args: argparse.Namespace) -> None:
    from belm.apps.io import check_writable
    args.out = args.out or os.path.join("outputs", args.command)
    try:
        check_writable(args.out)
    except (ValueError, PermissionError) as err:
        raise CLIError(str(err)) from None


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "inf" if math.isinf(v) else f"{v:.3g}"
        return "n/a" if v is None else str(v)
    cells = [list(map(str, header))] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- quiet libraries ----------------------------------------------------------------------
def _silence_libraries() -> None:
    """--no-progress: no loading bars nor warnings from diffusers / transformers / the hub.
    belm's own warnings stay on."""
    import warnings
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", module=r"(diffusers|transformers|huggingface_hub|accelerate)(\.|$)")
    try:
        from diffusers.utils import logging as dlog
        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:  # pragma: no cover - diffusers is a dependency of the CLI's folder models
        pass
    try:
        from transformers.utils import logging as tlog
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


# -- the run's settings -------------------------------------------------------------------
def _spacing_line(model, args) -> str:
    from belm.schedule import default_spacing
    if model.flow:
        config = getattr(model.scheduler, "config", {})
        get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
        shift = "dynamic shift by image size" if get("use_dynamic_shifting", False) else f"shift {get('shift', 1.0):g}"
        return f"grid: flow sigmas of {type(model.scheduler).__name__} ({shift}; a flow grid has no spacing)"
    chosen = args.spacing or default_spacing(args.sampler)
    why = "--spacing" if args.spacing else f"default for {args.sampler}"
    if chosen == "config":
        config = getattr(model.scheduler, "config", {})
        get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
        return f"grid: config ({get('timestep_spacing', 'leading') or 'leading'}) ({why})"
    return f"grid: {chosen} ({why})"


def _settings(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    """What a summary.json records about the run (enough to repeat it)."""
    import torch

    from belm._version import __version__
    keys = ("model", "sampler", "steps", "spacing", "guidance", "gamma", "p", "seed", "num", "image", "dtype",
            "device", "batch_size", "source", "target", "freeze", "inversion_guidance", "null_class",
            "negative_prompt", "latent", "save_latent", "iters", "lr", "penalty", "confidence", "edit_guidance")
    settings = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    settings["threads"] = torch.get_num_threads()
    if settings.get("image") and args.command in ("reconstruct", "edit"):
        settings["num"] = len(settings["image"])   # --num picks held-out digits; files are all used
    return {"command": "belm " + " ".join(argv), "belm_version": __version__, "torch_version": torch.__version__,
            "settings": settings}


def _sampler_options(args: argparse.Namespace) -> dict:
    return {k: v for k, v in (("gamma", args.gamma), ("p", args.p)) if v is not None}


# -- models and images ----------------------------------------------------------------------
def _load(args: argparse.Namespace):
    import torch

    from belm.apps.models import load_model
    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    if args.null_class is not None:
        if model.num_classes is None:
            raise CLIError(f"--null-class: {args.model} is not class-conditional; omit --null-class")
        if not 0 <= args.null_class < model.num_classes:
            raise CLIError(f"--null-class must lie in [0, {model.num_classes - 1}]; got {args.null_class}")
        model.null_class = args.null_class
    if model.flow and args.spacing not in (None, "config"):
        raise CLIError(f"--spacing {args.spacing} does not apply to the flow model {args.model} (its sigma grid "
                       "follows the scheduler's shift); omit --spacing")
    if args.negative_prompt is not None and model.prompted:
        _use_negative_prompt(model, args.negative_prompt)
    if model.num_classes is not None and model.null_class is None and args.guidance != 1.0 \
            and args.command in ("sample", "edit", "fd", "reconstruct", "interpolate"):
        raise CLIError(f"--guidance {args.guidance:g} on the class-conditional {args.model} needs "
                       "--null-class ID (its unconditional class id), or use --guidance 1")
    args.grid = _spacing_line(model, args)
    args.settings["settings"]["grid"] = args.grid.removeprefix("grid: ")
    print(args.grid)
    return model


def _use_negative_prompt(model, text: str) -> None:
    """Route ``--negative-prompt`` into the handle's ε functions (the handle's own ``eps``
    passes the empty prompt)."""
    def eps(condition: Any = None, guidance: float = 1.0, batch: int = 1):
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0; got {guidance}")
        return model.sd.eps(prompt=condition or "", guidance_scale=guidance, negative_prompt=text)
    model.eps = eps


def _load_images(model, paths: list[str]):
    """The --image files as (B, C, H, W) in [−1, 1]; one line per problem (sizes, resizing)."""
    from belm.adapters.images import load_image
    if model.prompted:
        parts = [model.sd.preprocess(load_image(p)) for p in paths]
        sizes = {p: tuple(t.shape[-2:]) for p, t in zip(paths, parts)}
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{p} is {w}x{h}" for p, (h, w) in sizes.items())
            multiple = getattr(model.sd, "pixel_multiple", model.sd.vae_factor)
            raise CLIError(f"--image: the images must have the same size (after cropping to multiples of "
                           f"{multiple}): {listed}; resize them to one size first")
        import torch
        return torch.cat(parts)
    C, H, W = model.shape
    for p in paths:
        from PIL import Image
        with Image.open(p) as im:
            size = im.size
        if size != (W, H):
            print(f"belm: warning: --image {p} is {size[0]}x{size[1]}; resized to the model's {W}x{H}"
                  + (" (not square: the aspect ratio changes)" if size[0] != size[1] else ""), file=sys.stderr)
    return model.load_images(paths)


def _digits_images(model, args, label: Optional[int] = None, num: Optional[int] = None):
    """Held-out digits (optionally of one class), chosen by --seed; or the --image files."""
    import torch
    num = args.num if num is None else num
    if getattr(args, "image", None):
        return _load_images(model, args.image), None
    if model.dataset is None:
        raise CLIError(f"--image is required for --model {args.model} (only the bundled models have an image set)")
    images, labels = model.reference_images("heldout")
    if label is not None:
        keep = labels == label
        images, labels = images[keep], labels[keep]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    take = order[:num]
    if len(take) < num:
        raise CLIError(f"--num {num}: only {len(take)} held-out digits are available")
    return images[take], labels[take]


def _picture_scale(model) -> Optional[int]:
    """Upscale pictures of small pixel images only (None: by size); latent models: as they are."""
    return 1 if model.kind == "latent" else None


def _save_scale(model, images) -> int:
    from belm.apps.io import grid_scale
    return 1 if model.kind == "latent" else grid_scale(*images.shape[-2:])


# -- commands -----------------------------------------------------------------------------
def _save_latent(args: argparse.Namespace, model, latent, target: Any, guidance: float) -> Optional[dict]:
    """Write ``--save-latent`` (call inside the OutputDir block, last: nothing on failure) and
    print how to sample it back. Returns the summary's record of it (None without the option)."""
    if args.save_latent is None:
        return None
    latent.save(args.save_latent)
    if isinstance(target, (list, tuple)):
        target = ",".join(str(t) for t in target)
    line = [f"belm sample --model {args.model} --latent {args.save_latent} --sampler {args.sampler} "
            f"--steps {args.steps}"]
    for flag, value in (("--spacing", args.spacing), ("--gamma", args.gamma), ("--p", args.p)):
        if value is not None:
            line.append(f"{flag} {value}")
    if target is not None:
        line.append(f"--target {target!r}" if model.prompted else f"--target {target}")
    print(f"latent: {args.save_latent} ({latent.states[0].shape[0]} images, level {latent.level}); sample it back "
          f"with: {' '.join(line)} --guidance {guidance:g}")
    return {"path": args.save_latent, "images": int(latent.states[0].shape[0]), "level": latent.level,
            "method": latent.method, "inverted_with": target, "inversion_guidance": guidance}


def cmd_reconstruct(args: argparse.Namespace) -> dict:
    from belm.apps import tasks
    from belm.apps.io import OutputDir, save_grid
    model = _load(args)
    images, labels = _digits_images(model, args)
    condition = model.parse_condition(args.source, "--source")
    if condition is None and labels is not None:
        condition = labels.tolist()
    samplers = [args.sampler] + (["ddim"] if args.sampler != "ddim" else [])
    spacing = args.spacing
    if spacing is None and not model.flow:  # DDIM beside it on the same grid, so the comparison is like for like
        from belm.schedule import default_spacing
        spacing = default_spacing(args.sampler)
    results = {name: tasks.reconstruct(model, images, sampler=name, steps=args.steps, condition=condition,
                                       guidance=args.guidance, progress=not args.no_progress, spacing=spacing,
                                       sampler_options=_sampler_options(args) if name == args.sampler else None,
                                       batch_size=args.batch_size)
               for name in samplers}
    main = results[args.sampler]
    summary: dict[str, Any] = dict(tasks.psnr_summary(main["latent"]), num=len(images), **args.settings)
    summary["exactness"] = dict(tasks.psnr_summary(main["latent"]),
                                what="sample(invert(x0)) vs x0 in the model's space (latent for SD): the sampler")
    rows = [[name, "sampler (latent)" if model.kind == "latent" else "sampler",
             *tasks.psnr_summary(r["latent"]).values()] for name, r in results.items()]
    if model.kind == "latent":
        summary["end_to_end"] = dict(tasks.psnr_summary(main["pixel"]),
                                     what="decoded reconstruction vs the input image: dominated by the VAE")
        summary["vae_round_trip"] = dict(tasks.psnr_summary(main["vae"]),
                                         what="decode(encode(image)) vs the input image, no sampler")
        rows.append([args.sampler, "end to end (pixels)", *tasks.psnr_summary(main["pixel"]).values()])
        rows.append(["-", "VAE round trip (pixels)", *tasks.psnr_summary(main["vae"]).values()])
    if "ddim" in results and args.sampler != "ddim":
        summary["ddim"] = tasks.psnr_summary(results["ddim"]["latent"])
    with OutputDir(args.out) as out:
        save_grid(out, [images] + [r["reconstruction"] for r in results.values()], "reconstruction.png",
                  scale=_picture_scale(model))
        record = _save_latent(args, model, main["inverted"], condition, args.guidance)
        if record is not None:
            summary["saved_latent"] = record
        out.write_json("summary.json", summary)
    print(_table(rows, ["sampler", "figure", "max_abs_error", "mse", "psnr"]))
    return summary


EDIT_FIGURES = ("success_rate", "change_l2", "change_psnr", "latent_std", "latent_max_abs")


def cmd_edit(args: argparse.Namespace) -> dict:
    from belm.apps import tasks
    from belm.apps.io import OutputDir, save_grid, save_images
    model = _load(args)
    if not model.prompted and model.num_classes is None:
        raise CLIError(f"edit needs a conditional model (class labels or prompts); {args.model} is unconditional. "
                       "Use reconstruct or interpolate, or a class-conditional / text-to-image model")
    for arg in ("source", "target"):
        if getattr(args, arg) is None:
            what = "a prompt" if model.prompted else "a class id"
            raise CLIError(f"edit needs --{arg} ({what} for --model {args.model})")
    source = model.parse_condition(args.source, "--source")
    target = model.parse_condition(args.target, "--target")
    freeze = args.freeze if args.freeze is not None else 0
    images, _ = _digits_images(model, args, label=source if not model.prompted else None)
    result = tasks.edit(model, images, source, target, sampler=args.sampler, steps=args.steps, freeze=freeze,
                        guidance=args.guidance, inversion_guidance=args.inversion_guidance,
                        progress=not args.no_progress, spacing=args.spacing, sampler_options=_sampler_options(args),
                        batch_size=args.batch_size)
    edited = result["images"]
    summary: dict[str, Any] = dict(num=len(images), **args.settings)
    summary["settings"]["freeze"] = freeze
    summary.update({k: result[k] for k in EDIT_FIGURES if k in result})
    summary["change_what"] = "edited vs source image: mean per-image L2 norm (pixels in [-1, 1]) and mean PSNR (dB)"
    with OutputDir(args.out) as out:
        save_grid(out, [images, edited], "edit.png", scale=_picture_scale(model))
        save_images(out, edited, [f"edited_{i:03d}.png" for i in range(len(edited))],
                    scale=_save_scale(model, edited))
        record = _save_latent(args, model, result["inverted"], source, args.inversion_guidance)
        if record is not None:
            summary["saved_latent"] = record
        out.write_json("summary.json", summary)
    print(_table([[args.source, args.target, freeze, args.guidance, *(summary.get(k) for k in EDIT_FIGURES)]],
                 ["source", "target", "freeze", "guidance", *EDIT_FIGURES]))
    return summary


INTERPOLATION_FIGURES = ("endpoint_max_abs_error", "latent_std", "latent_max_abs", "middle_confidence", "middle_fd")


def cmd_interpolate(args: argparse.Namespace) -> dict:
    from belm.apps import tasks
    from belm.apps.io import OutputDir, save_grid
    model = _load(args)
    images, _ = _digits_images(model, args, num=2)
    condition = model.parse_condition(args.source, "--source")
    result = tasks.interpolate(model, images[:1], images[1:2], num=args.num, sampler=args.sampler,
                               steps=args.steps, condition=condition, guidance=args.guidance,
                               progress=not args.no_progress, spacing=args.spacing,
                               sampler_options=_sampler_options(args), batch_size=args.batch_size)
    strip = result["frames"][:, 0]
    summary = dict({k: result[k] for k in INTERPOLATION_FIGURES if k in result}, **args.settings)
    summary["middle_what"] = ("frames at 0 < weight < 1: classifier's mean top probability and FD-digits to the "
                              "held-out digits (FD needs >= 2 middle frames)")
    with OutputDir(args.out) as out:
        save_grid(out, [strip], "interpolation.png", scale=_picture_scale(model))
        record = _save_latent(args, model, result["inverted"], condition, args.guidance)
        if record is not None:
            summary["saved_latent"] = record
        out.write_json("summary.json", summary)
    print(_table([[args.sampler, args.num, *(summary.get(k) for k in INTERPOLATION_FIGURES)]],
                 ["sampler", "frames", *INTERPOLATION_FIGURES]))
    return summary


def _sample_conditions(model, args, seeds):
    if args.target is not None:
        return model.parse_condition(args.target, "--target")
    if model.num_classes is not None:
        return [s % model.num_classes for s in seeds]
    return None


def _latent_conditions(model, args):
    """``sample --latent``: the condition it was inverted with (one, or one class id per image)."""
    if args.target is None:
        if model.num_classes is not None:
            raise CLIError(f"--latent on the class-conditional {args.model} needs --target: the class id it was "
                           "inverted with (one, or one per image as 3,1,4)")
        return None
    if not model.prompted and "," in str(args.target):
        return [model.parse_condition(v.strip(), "--target") for v in str(args.target).split(",")]
    return model.parse_condition(args.target, "--target")


#: the most images a grid picture of `sample` and `fd` shows (50,000 digits made a 590 MB grid.png)
GRID_IMAGES = 100


def _save_sample_grid(out, model, images, total: Optional[int] = None) -> str:
    """grid.png of the first :data:`GRID_IMAGES` of ``images`` (the first of ``total`` samples),
    rows of 10 (digits) or 8; returns what it shows, for the summary."""
    from belm.apps.io import save_grid
    ncol = 10 if model.num_classes == 10 else 8
    shown = min(len(images), GRID_IMAGES)
    save_grid(out, [images[i:min(i + ncol, shown)] for i in range(0, shown, ncol)], "grid.png",
              scale=_picture_scale(model))
    total = len(images) if total is None else total
    return f"grid.png shows the first {shown} of {total} samples (every sample is in sample_*.png)"


def _sample_latent(args: argparse.Namespace, model) -> dict:
    from belm.apps import tasks
    from belm.apps.io import OutputDir, save_images
    from belm.solvers.base import Latent
    latent = Latent.load(args.latent, device=args.device)
    if args.num is not None:     # the first --num images of the latent
        if args.num > latent.states[0].shape[0]:
            raise CLIError(f"--num {args.num}: the latent holds {latent.states[0].shape[0]} images; pass at most that "
                           "or omit --num")
        latent = latent.replace(states=[t[:args.num] for t in latent.states])
    condition = _latent_conditions(model, args)
    count = latent.states[0].shape[0]
    if isinstance(condition, list) and len(condition) != count:
        raise CLIError(f"--target lists {len(condition)} class ids; the latent holds {count} images: give one, or "
                       "one per image")
    t0 = time.perf_counter()
    images = tasks.sample_latent(model, latent, sampler=args.sampler, steps=args.steps, condition=condition,
                                 guidance=args.guidance, batch_size=args.batch_size, progress=not args.no_progress,
                                 spacing=args.spacing, sampler_options=_sampler_options(args))
    summary = dict(seconds=time.perf_counter() - t0, **args.settings)
    summary["settings"]["num"] = count
    summary["latent_method"], summary["latent_level"] = latent.method, latent.level
    with OutputDir(args.out) as out:
        summary["grid"] = _save_sample_grid(out, model, images)
        save_images(out, images, [f"sample_{i:06d}.png" for i in range(count)], scale=_save_scale(model, images))
        import torch
        from safetensors.torch import save_file
        save_file({"images": images.contiguous().to(torch.float32)}, str(out.file("samples.safetensors")))
        out.write_json("summary.json", summary)
    print(_table([[args.sampler, args.steps, count, latent.level, summary["seconds"]]],
                 ["sampler", "steps", "num", "from_level", "seconds"]))
    return summary


def cmd_sample(args: argparse.Namespace) -> dict:
    from belm.apps import tasks
    from belm.apps.io import OutputDir, save_images
    from belm.apps.sharding import gather_in_order, shard, world
    model = _load(args)
    if args.latent is not None:
        return _sample_latent(args, model)
    import torch
    if args.batch_size is None:
        args.batch_size = 64
    seeds = list(range(args.seed, args.seed + args.num))
    conditions = _sample_conditions(model, args, seeds)
    mine = shard(seeds, block=args.batch_size)  # whole batches per rank: same bits as one process
    # mine is a contiguous slice of the consecutive seeds: its conditions are the same slice (O(N)).
    first = mine[0] - args.seed if mine else 0
    cond_mine = conditions[first:first + len(mine)] if isinstance(conditions, list) else conditions
    t0 = time.perf_counter()
    batches = tasks.generate_batches(model, mine, sampler=args.sampler, steps=args.steps, condition=cond_mine,
                                     guidance=args.guidance, batch_size=args.batch_size,
                                     progress=not args.no_progress, spacing=args.spacing,
                                     sampler_options=_sampler_options(args))
    if world()[1] > 1:   # sharded: rank 0 gathers every rank's images and writes them as one batch
        images = gather_in_order(torch.cat(list(batches)) if mine else torch.empty(0), mine, seeds)
        if images is None:  # a non-zero rank: rank 0 writes
            return {}
        batches = iter([images])
    summary = dict(**args.settings)
    with OutputDir(args.out) as out:
        # One batch in memory at a time (plus the grid's first images): each is written as it comes.
        samples, shown, done = None, [], 0
        for images in batches:
            if samples is None:
                samples = _RowsFile(out.file("samples.safetensors"), "images", (args.num, *images.shape[1:]))
            samples.write(images)
            save_images(out, images, [f"sample_{s:06d}.png" for s in seeds[done:done + len(images)]],
                        scale=_save_scale(model, images))
            if done < GRID_IMAGES:   # a copy: a view would keep the whole batch alive
                shown.append(images[:GRID_IMAGES - done].clone())
            done += len(images)
        samples.close()
        summary["seconds"] = time.perf_counter() - t0
        summary["grid"] = _save_sample_grid(out, model, torch.cat(shown), total=done)
        out.write_json("summary.json", summary)
    print(_table([[args.sampler, args.steps, args.num, summary["seconds"]]], ["sampler", "steps", "num", "seconds"]))
    return summary


class _RowsFile:
    """A safetensors file of one float32 tensor of ``shape`` (N, ...), written row block by row
    block as they come: the header first (it only needs the shape), then each block's bytes,
    so the whole tensor is never in memory. Readers see the format ``save_file`` writes."""

    def __init__(self, path: Any, name: str, shape: tuple[int, ...]) -> None:
        import json
        import math
        import struct
        self.shape, self.written = tuple(int(v) for v in shape), 0
        self.nbytes = 4 * math.prod(self.shape)
        header = json.dumps({name: {"dtype": "F32", "shape": list(self.shape), "data_offsets": [0, self.nbytes]}},
                            separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)          # the data starts 8-byte aligned, as save_file does
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(header)) + header)

    def write(self, rows: "torch.Tensor") -> None:
        """Append rows of shape (b, *shape[1:])."""
        import torch
        if tuple(rows.shape[1:]) != self.shape[1:]:
            raise ValueError(f"rows of shape {tuple(rows.shape)} do not fit a tensor of shape {self.shape}")
        data = rows.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().astype("<f4", copy=False)
        self.file.write(data.tobytes())
        self.written += data.nbytes

    def close(self) -> None:
        self.file.close()
        if self.written != self.nbytes:
            raise RuntimeError(f"wrote {self.written} of the {self.nbytes} bytes of a {self.shape} tensor")


def cmd_fd(args: argparse.Namespace) -> dict:
    from belm.apps import tasks
    from belm.apps.io import OutputDir, save_grid
    model = _load(args)
    if model.classifier is None or model.dataset is None:
        raise CLIError(f"fd needs a feature extractor and a reference set; the bundled ones are for --model digits "
                       f"and digits-flow, not {model.name}")
    reference, _ = model.reference_images("heldout")
    seeds = list(range(args.seed, args.seed + args.num))
    images = tasks.generate(model, seeds, sampler=args.sampler, steps=args.steps,
                            condition=[s % model.num_classes for s in seeds], guidance=args.guidance,
                            batch_size=args.batch_size, progress=not args.no_progress,
                            spacing=args.spacing, sampler_options=_sampler_options(args))
    fd = tasks.fd_to_reference(model, images, reference)
    summary = dict(fd=fd, reference="digits held-out", **args.settings)
    with OutputDir(args.out) as out:
        save_grid(out, [images[i:i + 10] for i in range(0, min(len(images), GRID_IMAGES), 10)], "samples.png")
        out.write_json("summary.json", summary)
    print(_table([[args.sampler, args.steps, args.num, args.guidance, fd]],
                 ["sampler", "steps", "num", "guidance", "fd_digits"]))
    return summary


def cmd_optimize(args: argparse.Namespace) -> dict:
    import torch

    from belm.apps.io import OutputDir
    from belm.apps.models import load_model
    from belm.apps.optimize import optimize_latents, save_optimize
    model = load_model(args.model)
    images, _ = _digits_images(model, args, label=args.source)
    result = optimize_latents(model, images, args.source, args.target, steps=args.steps, iters=args.iters,
                              lr=args.lr, penalty=args.penalty, sampler=args.sampler, confidence=args.confidence,
                              edit_guidance=args.edit_guidance, progress=not args.no_progress)
    summary = {**result["summary"], **args.settings}
    summary["change_what"] = "mean per-image L2 norm (pixels in [-1, 1]) and mean PSNR (dB) against the originals"
    result["summary"] = summary
    with OutputDir(args.out) as out:
        save_optimize(out, result)
    rows = [["optimize", summary["success_rate"], summary["mean_l2"], summary["mean_psnr"], summary["seconds"]],
            ["edit", summary["edit_success_rate"], summary["edit_mean_l2"], summary["edit_mean_psnr"],
             summary["edit_seconds"]]]
    print(f"{args.source} -> {args.target}, {len(images)} held-out digits, {args.sampler} N = {args.steps} "
          f"(edit: guidance {args.edit_guidance:g}); threads {torch.get_num_threads()}")
    print(_table(rows, ["method", "success_rate", "mean_l2", "mean_psnr", "seconds"]))
    return summary


def cmd_demo(args: argparse.Namespace) -> dict:
    from belm.apps.demo import run_demo
    _check_out(args)
    return run_demo(args.out, quick=args.quick, progress=not args.no_progress, settings=args.settings,
                    model=args.model)


COMMANDS = {"demo": cmd_demo, "sample": cmd_sample, "reconstruct": cmd_reconstruct, "edit": cmd_edit,
            "interpolate": cmd_interpolate, "fd": cmd_fd, "optimize": cmd_optimize}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:       # argparse printed its one-line usage error (or --help / --version)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    debug = args.debug or "--debug" in argv
    from belm.errors import BELMError
    try:
        import torch
        threads = resolve_threads(args.threads)
        if threads > 0:
            _pin_threads(threads)
        if args.no_progress:
            _silence_libraries()
        if args.command != "demo":
            _check(args)
        args.settings = _settings(args, argv)
        COMMANDS[args.command](args)
        return 0
    except CLIError as err:
        if debug:
            raise
        print(f"belm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (BELMError, ValueError, TypeError, FileNotFoundError, PermissionError, OSError) as err:
        if debug:
            raise
        print(f"belm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``belm`` command: demo, sample, reconstruct, edit, interpolate, fd, optimize, invert.

Every command validates its arguments before any work, writes its pictures and a strict-JSON
``summary.json`` (the run's settings included) into ``--out`` only when it succeeds
(nothing half-written, nothing stale from an earlier run), prints a short table, and exits
with status 2 and a one-line message on bad input, checked before the model load wherever the
arguments or the model folder's files decide (``--debug`` for a traceback); Ctrl-C is one line
and status 130, an unexpected failure one line and status 1.

Threads: torch's CPU thread count is pinned by ``--threads`` (default: ``$BELM_THREADS``,
else ``$OMP_NUM_THREADS``, else 1). One thread cannot collapse when other processes share
the cores (torch's default, one thread per core, slowed ``make demo`` 13× on a busy 2-core
machine); ``--threads 0`` restores torch's default for a machine of your own.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

__all__ = ["main", "build_parser", "resolve_threads"]

DTYPES = ("float32", "float64", "bfloat16", "float16")
SPACING_CHOICES = ("linspace", "leading", "trailing", "config")


#: exit status of bad input (and of what the input asked for that cannot be done: memory, files)
EXIT_USAGE = 2
#: exit status of a run stopped by Ctrl-C: 128 + SIGINT, what shells, make and job schedulers report
#: for an interrupted command (and Python's own for an uncaught KeyboardInterrupt); not 2, which
#: says "fix the arguments"
EXIT_INTERRUPTED = 130
#: exit status of an unexpected failure (a bug: rerun with --debug and report it)
EXIT_INTERNAL = 1


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (the usage is one `-h` away), given by the
    subcommand's parser when the subcommand's options are wrong (`belm reconstruct -h`)."""

    #: the subcommands' parsers by name (set by build_parser on the top-level parser)
    commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} -h)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:   # argparse would report them as the top-level parser's, pointing at `belm -h`
            owner = self.commands.get(getattr(parsed, "command", None) or "", self)
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


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
        p.add_argument("--guidance", type=float, default=guidance,
                       help="classifier-free guidance scale (1 = none)" + ("" if guidance is not None else
                            "; default 3.0 (with --latent: the guidance it was inverted with, recorded in the file)"))
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
    common(p, num=None, guidance=None)     # None: 3.0, or with --latent what the file records (see _latent_settings)
    p.add_argument("--target", default=None,
                   help="class id (digits) or prompt (SD); default: all classes in turn. With --latent: default "
                        "the condition it was inverted with, recorded in the file (reconstruct: --source, or the "
                        "digits' labels as a comma list 3,1,4; edit: --source); pass --target to change it "
                        "(edit: the target)")
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

    p = sub.add_parser("invert", help="invert image folders into latent shards (resumable; runs sharded under "
                       "torchrun)", formatter_class=_Formatter)
    common(p, num=None, guidance=1.0)
    batch(p, None, "images per inversion pass, counted from each shard's first image (default: the whole shard); "
                   "the latents' bits depend on it, never on the number of ranks")
    _invert_options(p)
    for name in ("sample", "reconstruct", "edit"):
        _latents_option(sub.choices[name])
    parser.commands = dict(sub.choices)
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
        from belm.apps.io import check_latent_path
        try:   # not an input, not a file belm did not write, in a writable folder
            check_latent_path(target, getattr(args, "image", None) or [])
        except (ValueError, OSError) as err:
            raise CLIError(str(err)) from None


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
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise CLIError(f"--lr must be > 0 and finite; got {args.lr}")
    if not (args.penalty >= 0 and math.isfinite(args.penalty)):
        raise CLIError(f"--penalty must be >= 0 and finite; got {args.penalty}")
    if args.confidence is not None and not 0 < args.confidence < 1:
        raise CLIError(f"--confidence must lie in (0, 1); got {args.confidence}")
    _check_guidance("edit_guidance", args.edit_guidance)
    _check_seed(args, 1)
    _check_steps(args)
    _check_heldout(args, label=args.source)
    _check_out(args)


#: ``sample``'s guidance when neither --guidance nor a latent file says otherwise
SAMPLE_GUIDANCE = 3.0
#: what ``--save-latent`` records in the file's Latent.info, by sample's option
LATENT_SETTINGS = (("guidance", "--guidance"), ("target", "--target"), ("negative_prompt", "--negative-prompt"))


def _latent_settings(args: argparse.Namespace) -> None:
    """``sample``: fill --guidance/--target/--negative-prompt left out (None) with what the
    --latent file recorded at inversion (else --guidance 3.0); a flag given explicitly wins,
    with a one-line note when it differs from the record. Reads (and checks) the file: a bad
    one is refused here, before any model load. ``args.from_latent``: the settings taken from it;
    ``args.latent_notes``: the notes, printed once sampling starts (an error stays one line)."""
    if args.command != "sample":
        return
    recorded: dict[str, str] = {}
    if args.latent is not None:
        from belm.solvers.base import Latent
        try:
            recorded = Latent.load(args.latent).info
        except (ValueError, OSError) as err:
            raise CLIError(f"--latent {err}") from None
    # A file written before the record has no "guidance": the old defaults, --target required.
    inverted = {attr: recorded.get(attr) for attr, _ in LATENT_SETTINGS} if "guidance" in recorded else None
    args.from_latent, args.latent_notes, used = set(), [], []
    for attr, flag in LATENT_SETTINGS:
        given = getattr(args, attr)
        saved = None if inverted is None else inverted[attr]
        if attr == "guidance" and saved is not None:
            saved = float(saved)
        if given is None:
            setattr(args, attr, saved if saved is not None or attr != "guidance" else SAMPLE_GUIDANCE)
            if saved is not None:
                args.from_latent.add(attr)
                used.append(f"{flag} {saved:g}" if attr == "guidance" else f"{flag} {saved!r}")
        elif inverted is not None and given != saved:
            args.latent_notes.append(f"belm sample: note: {flag} {given!r} overrides the latent's recorded "
                                     f"{'none' if saved is None else repr(saved)}: the images will not reproduce "
                                     "the inverted ones")
    if used:
        print(f"latent: inverted with {' '.join(used)} (recorded in the file; pass the flags to change them)")


def _check_guidance(name: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise CLIError(f"--{name.replace('_', '-')} must be >= 0 and finite (1 = no guidance); got {value}")


#: torch.Generator.manual_seed takes [0, 2^64); a negative seed s is the generator of 2^64 + s
SEED_BOUND = 2 ** 64


def _check_seed(args: argparse.Namespace, count: int) -> None:
    """``count`` seeds from --seed on (sample i of sample/fd uses seed + i) must be torch seeds."""
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0 (torch's seeds are unsigned 64-bit: a negative seed s is the same "
                       f"generator as 2^64 + s); got {args.seed}")
    if args.seed + count > SEED_BOUND:
        if count == 1:
            raise CLIError(f"--seed {args.seed} exceeds torch's largest seed 2^64 - 1 = {SEED_BOUND - 1}")
        raise CLIError(f"--seed {args.seed} --num {count}: sample i uses seed {args.seed} + i, which must stay within "
                       f"torch's seeds [0, 2^64 - 1]; use --seed <= {SEED_BOUND - count}")


def _check_steps(args: argparse.Namespace) -> None:
    """--steps against what the sampler couples (a k-step rule needs N >= k) and, on discrete
    (non-flow) models, against the train timesteps the model's scheduler config names."""
    import numpy as np

    from belm.schedule import Schedule
    from belm.solvers.multistep import MultistepSampler
    from belm.solvers.registry import make_sampler
    # The sampler on a stand-in grid of 8 steps (enough for every rule): its k, without the model.
    stand_in = Schedule.from_betas(np.linspace(1e-4, 0.02, 1000), 8, spacing="trailing")
    sampler = make_sampler(args.sampler, lambda x, t: x, stand_in, progress=False, **_sampler_options(args))
    if isinstance(sampler, MultistepSampler) and args.steps < sampler.num_states:
        ddim = " (or --sampler ddim)" if args.command != "optimize" else ""
        raise CLIError(f"--steps {args.steps}: --sampler {args.sampler} couples {sampler.num_states} states and needs "
                       f"--steps >= {sampler.num_states}{ddim}")
    config = _scheduler_config(args)
    if config is not None and not _is_flow(args, config):
        train = int(config.get("num_train_timesteps") or 1000)
        if args.steps > train:
            raise CLIError(f"--steps {args.steps}: the model was trained on {train} timesteps, so at most "
                           f"--steps {train}")


def _scheduler_config(args: argparse.Namespace) -> Optional[dict]:
    """The model's scheduler_config.json (None if it has none where belm reads it)."""
    import json

    from belm.models import DIGITS_FLOW_PATH, DIGITS_PATH
    folder = {"digits": DIGITS_PATH, "digits-flow": DIGITS_FLOW_PATH}.get(args.model, args.model)
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return None
    config = json.loads(open(path, encoding="utf-8").read())
    return config if isinstance(config, dict) else None


def _is_flow(args: argparse.Namespace, scheduler_config: dict) -> bool:
    """Flow models (digits-flow, SD3, FLUX) have a sigma grid, not N of T train timesteps."""
    return args.model == "digits-flow" or getattr(args, "model_kind", None) in ("sd3", "flux") \
        or str(scheduler_config.get("_class_name", "")).startswith("Flow")


def _check_heldout(args: argparse.Namespace, label: Optional[int] = None) -> None:
    """--num held-out digits (of class ``label``) must exist: the bundled models' images when no
    --image is given (reconstruct, edit, optimize)."""
    from belm.apps.models import BUNDLED_MODELS
    if args.model not in BUNDLED_MODELS or getattr(args, "image", None) or getattr(args, "latents", None) \
            or args.num is None:
        return     # the images come from files (--image, a --latents folder), not the held-out set
    from belm.models import digits_dataset
    _, labels = digits_dataset("heldout")
    available = int((labels == label).sum()) if label is not None else len(labels)
    if args.num > available:
        of = f" of class {label}" if label is not None else ""
        raise CLIError(f"--num {args.num}: only {available} held-out digits{of} are available; pass --num <= "
                       f"{available} (or your own --image files)")


def _check_fd(args: argparse.Namespace) -> None:
    """fd: a bundled model (FD-digits' features and reference), and more samples than features."""
    from belm.apps.models import BUNDLED_MODELS
    if args.model not in BUNDLED_MODELS:
        raise CLIError(f"fd needs a feature extractor and a reference set; the bundled ones are for --model digits "
                       f"and digits-flow, not {args.model}")
    from belm.models import digits_classifier_config
    dims = int(digits_classifier_config()["feature_dim"])
    if args.num <= dims:
        raise CLIError(f"--num {args.num}: an FD of fewer samples than feature dimensions + 1 is not meaningful "
                       f"(their covariance is singular); FD-digits has {dims} feature dimensions, so pass --num >= "
                       f"{dims + 1} (default 297, the held-out digits' count)")


def _physical_memory() -> Optional[int]:
    """This machine's memory in bytes (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _gib(size: float) -> str:
    return f"{size / 2 ** 30:.3g} GiB"


def _check_sizes(args: argparse.Namespace) -> None:
    """--num images must fit where the command must keep them: fd holds every sample (their
    statistics), interpolate every frame (one strip), in memory; sample writes every sample to
    samples.safetensors (4-byte pixels), on the disk of --out. Bounds below the real need:
    what exceeds them cannot succeed."""
    from belm.apps.models import image_shape
    if args.command not in ("fd", "interpolate", "sample") or getattr(args, "latent", None) \
            or getattr(args, "latents", None):
        return       # sampling saved latents: their count is the file's (folder's), checked when read
    C, H, W = image_shape(args.model, getattr(args, "model_kind", None))
    need = args.num * C * H * W * 4
    what = f"{args.num} float32 {C}x{H}x{W} images: {_gib(need)}"
    if args.command == "sample":
        import shutil
        where = os.path.abspath(args.out)
        while not os.path.isdir(where):
            where = os.path.dirname(where)
        free = shutil.disk_usage(where).free
        if need > free:
            raise CLIError(f"--num {args.num}: samples.safetensors alone holds {what}, and {where} has "
                           f"{_gib(free)} free; pass a smaller --num or free some space")
        return
    memory = _physical_memory()
    if memory is not None and need > memory:
        raise CLIError(f"--num {args.num}: {args.command} holds all its {what}, and this machine has "
                       f"{_gib(memory)} of memory; pass a smaller --num")


def _check(args: argparse.Namespace) -> None:
    from belm.apps.models import BUNDLED_MODELS
    if args.command == "optimize":
        return _check_optimize(args)
    if getattr(args, "latents", None) is not None:
        _apply_index(args)      # the folder's settings, before anything is checked against them
    bundled = args.model in BUNDLED_MODELS
    _check_paths(args)
    _latent_settings(args)
    if args.num is None and getattr(args, "latent", None) is None and args.command != "invert":
        args.num = 16
    if args.steps < 1:
        raise CLIError(f"--steps must be >= 1; got {args.steps}")
    if args.num is not None and args.num < 1:
        raise CLIError(f"--num must be >= 1; got {args.num}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1; got {args.batch_size}")
    _check_guidance("guidance", args.guidance)
    if args.command == "edit":
        _check_guidance("inversion_guidance", args.inversion_guidance)
    seeded = args.command == "fd" or (args.command == "sample" and getattr(args, "latent", None) is None)
    _check_seed(args, args.num if seeded else 1)
    if args.gamma is not None and args.sampler != "bdia":
        raise CLIError(f"--gamma applies to --sampler bdia only; got --sampler {args.sampler}")
    if args.p is not None and args.sampler != "edict":
        raise CLIError(f"--p applies to --sampler edict only; got --sampler {args.sampler}")
    if args.gamma is not None and not 0 < args.gamma <= 1:
        raise CLIError(f"--gamma must lie in (0, 1]; got {args.gamma}")
    if args.p is not None and not 0 < args.p < 1:
        raise CLIError(f"--p must lie in (0, 1); got {args.p}")
    if args.command == "edit":
        # --latents: the source is the folder's (none: an unconditional inversion)
        for arg in ("target",) if getattr(args, "latents", None) else ("source", "target"):
            if getattr(args, arg) is None and bundled:
                raise CLIError(f"edit needs --{arg} (a class id for --model {args.model}), e.g. --source 3 --target 8")
        if args.freeze is not None and not 0 <= args.freeze < args.steps:
            raise CLIError(f"--freeze must lie in [0, {args.steps - 1}] (freeze < steps); got {args.freeze}")
    for path in getattr(args, "image", None) or []:
        if not os.path.isfile(path):
            raise CLIError(f"--image {path}: no such file")
    if args.command == "interpolate" and args.num < 2:
        raise CLIError(f"--num must be >= 2 for interpolate (its frames include both ends); got {args.num}")
    if args.command == "interpolate" and args.image and len(args.image) != 2:
        raise CLIError(f"--image must be given exactly twice for interpolate; got {len(args.image)}")
    if args.command == "fd":
        _check_fd(args)
    _check_device(args.device)
    if not bundled:
        if not os.path.isdir(args.model):
            raise CLIError(f"--model {args.model}: no such folder; pass 'digits', 'digits-flow' or a local diffusers "
                           "folder")
        from belm.adapters.stable_diffusion import check_model_folder
        from belm.adapters.folders import check_folder_files
        try:
            check_folder_files(Path(args.model))    # custom code, broken files: refused before anything reads them
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
        if args.command in ("reconstruct", "edit"):
            _check_heldout(args, label=int(args.source) if args.command == "edit" and args.source is not None
                           else None)
    _check_steps(args)
    _check_out(args)            # before the sizes: sample's disk bound reads the free space of --out
    _check_sizes(args)
    if args.command == "invert":
        _check_invert(args)


#: The files each command always writes into --out (numbered pictures aside): a file of the
#: user's under one of these names is refused before any work, never overwritten.
OUTPUT_FILES = {"sample": ("grid.png", "samples.safetensors", "summary.json"),
                "reconstruct": ("reconstruction.png", "summary.json"), "edit": ("edit.png", "summary.json"),
                "interpolate": ("interpolation.png", "summary.json"), "fd": ("samples.png", "summary.json"),
                "optimize": ("optimize.png", "summary.json")}


def _check_out(args: argparse.Namespace) -> None:
    """--out: writable (or creatable), not in use by another run, no file of the user's under
    this command's output names; locked for this run until it ends (``args.out_lock``).
    Under torchrun only rank 0 checks and locks: the ranks share --out, and a check on every
    rank would race (each creates a missing --out to probe it and removes it again)."""
    from belm.apps.io import reserve_output_folder
    args.out = args.out or os.path.join("outputs", args.command)
    if args.command == "demo":
        from belm.apps.demo import OUTPUT_FILES as names
    else:
        names = OUTPUT_FILES.get(args.command, ())
    try:
        if os.environ.get("RANK", "0").strip() in ("", "0"):
            args.out_lock = reserve_output_folder(args.out, names)
    except (ValueError, PermissionError) as err:
        raise CLIError(str(err)) from None
    latent = getattr(args, "save_latent", None)
    if latent is not None and os.path.isdir(args.out) \
            and os.path.samefile(os.path.dirname(os.path.abspath(latent)), args.out) \
            and (os.path.basename(latent) in names or os.path.basename(latent).startswith(".belm")):
        raise CLIError(f"--save-latent {latent} is a file this command writes into --out {args.out}; choose "
                       "another file name for the latent")


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
    return {k: getattr(args, k) for k in ("gamma", "p") if getattr(args, k, None) is not None}


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
    from belm.apps.io import check_latent_path
    if check_latent_path(args.save_latent, getattr(args, "image", None) or []):   # again: the run took time
        print(f"belm: note: --save-latent {args.save_latent}: replacing the belm latent file there", file=sys.stderr)
    if isinstance(target, (list, tuple)):
        target = ",".join(str(t) for t in target)
    # What `sample --latent` needs besides the sampler's flags, in the terms of its options
    # (see _latent_settings): the conditioning of the inversion.
    info = {"guidance": repr(float(guidance))}
    if target is not None:
        info["target"] = str(target)
    if getattr(args, "negative_prompt", None) is not None:
        info["negative_prompt"] = args.negative_prompt
    latent.replace(info=info).save(args.save_latent)
    line = [f"belm sample --model {args.model} --latent {args.save_latent} --sampler {args.sampler} "
            f"--steps {args.steps}"]
    for flag, value in (("--spacing", args.spacing), ("--gamma", args.gamma), ("--p", args.p)):
        if value is not None:
            line.append(f"{flag} {value}")
    print(f"latent: {args.save_latent} ({latent.states[0].shape[0]} images, level {latent.level}; guidance "
          f"{guidance:g}{'' if target is None else f', condition {target!r}'} recorded); sample it back "
          f"with: {' '.join(line)}")
    return {"path": args.save_latent, "images": int(latent.states[0].shape[0]), "level": latent.level,
            "method": latent.method, "inverted_with": target, "inversion_guidance": guidance}


def cmd_reconstruct(args: argparse.Namespace) -> dict:
    if getattr(args, "latents", None) is not None:
        return _reconstruct_latents(args)
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
    note = _precision_note(args, summary["exactness"]["max_abs_error"])
    if note is not None:
        summary["exactness"]["note"] = note
        print(f"belm reconstruct: note: {note}", file=sys.stderr)
    with OutputDir(args.out) as out:
        save_grid(out, [images] + [r["reconstruction"] for r in results.values()], "reconstruction.png",
                  scale=_picture_scale(model))
        record = _save_latent(args, model, main["inverted"], condition, args.guidance)
        if record is not None:
            summary["saved_latent"] = record
        out.write_json("summary.json", summary)
    print(_table(rows, ["sampler", "figure", "max_abs_error", "mse", "psnr"]))
    return summary


#: Above this, an exact sampler's round trip is not float64 rounding of the state any more.
STATE_ROUNDING = 1e-9


def _precision_note(args: argparse.Namespace, max_abs_error: float) -> Optional[str]:
    """Why an exact sampler's round trip exceeds float64 rounding, when the network is not float64.

    The network sees the float64 state rounded to its dtype; the two directions' states differ
    by ~1e-14, so an element that lies that close to a rounding midpoint reaches the network as
    two inputs one unit apart, and the round trip is off by ~1e-7..1e-5 for that step count
    (which N is hit is chance). The sampler is not at fault, so say what removes it."""
    # Only where the round trip is otherwise float64 rounding: EDICT and BDIA(γ < 1) amplify it by
    # their own growth, which the GrowthWarning reports.
    neutral = args.sampler == "obelm" or (args.sampler == "bdia" and getattr(args, "gamma", None) in (None, 1.0))
    if not neutral or args.dtype == "float64" or not max_abs_error > STATE_ROUNDING:
        return None
    return (f"the round trip is off by {max_abs_error:.2g}, more than float64 rounding: at some level the "
            f"{args.dtype} network saw the two directions' states rounded to inputs one {args.dtype} unit apart "
            "(chance, for this --steps and these images). --dtype float64 removes it; `belm invert --exact "
            "bitwise` is bit-exact at any dtype (README: 'Round trips with a lower-precision network')")


EDIT_FIGURES = ("success_rate", "change_l2", "change_psnr", "latent_std", "latent_max_abs")


def cmd_edit(args: argparse.Namespace) -> dict:
    if getattr(args, "latents", None) is not None:
        return _edit_latents(args)
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
                           "inverted with (one, or one per image as 3,1,4); the file records none")
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
        latent = latent.batch_slice(slice(0, args.num))
    condition = _latent_conditions(model, args)
    count = latent.states[0].shape[0]
    if isinstance(condition, list) and "target" in args.from_latent:
        condition = condition[:count]       # the recorded labels of the images kept
    if isinstance(condition, list) and len(condition) != count:
        raise CLIError(f"--target lists {len(condition)} class ids; the latent holds {count} images: give one, or "
                       "one per image")
    for note in args.latent_notes:
        print(note, file=sys.stderr)
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
    if getattr(args, "latents", None) is not None:
        return _sample_latents(args)
    import shutil

    from belm.apps import datasets, tasks
    from belm.apps.io import OutputDir
    from belm.apps.sharding import shard, world
    model = _load(args)
    if args.latent is not None:
        return _sample_latent(args, model)
    if args.batch_size is None:
        args.batch_size = 64
    seeds = list(range(args.seed, args.seed + args.num))
    conditions = _sample_conditions(model, args, seeds)
    rank, size = world()
    mine = shard(seeds, block=args.batch_size, rank=rank, world_size=size)  # whole batches: same bits as 1 process
    # mine is a contiguous slice of the consecutive seeds: its conditions are the same slice (O(N)).
    first = mine[0] - args.seed if mine else 0
    cond_mine = conditions[first:first + len(mine)] if isinstance(conditions, list) else conditions
    t0 = time.perf_counter()
    batches = tasks.generate_batches(model, mine, sampler=args.sampler, steps=args.steps, condition=cond_mine,
                                     guidance=args.guidance, batch_size=args.batch_size,
                                     progress=not args.no_progress, spacing=args.spacing,
                                     sampler_options=_sampler_options(args))
    parts = Path(args.out) / datasets.PARTS_FOLDER
    if size > 1:
        # No images cross between ranks: each rank writes its batches as parts inside --out (the
        # part's number is the batch's in the seed order), and rank 0 reads them back one at a time.
        import torch.distributed as dist
        for j, images in enumerate(batches):
            datasets.write_part(parts, first // args.batch_size + j, images)
        dist.barrier()      # every part is written
        if rank != 0:
            return {}
        starts = range(0, args.num, args.batch_size)
        batches = datasets.iter_parts(parts, range(len(starts)),
                                      [min(args.batch_size, args.num - s) for s in starts])
    summary = dict(**args.settings)
    with OutputDir(args.out) as out:
        summary["grid"] = _write_samples(out, model, batches, seeds)
        summary["seconds"] = time.perf_counter() - t0
        out.write_json("summary.json", summary)
    if size > 1:
        shutil.rmtree(parts)    # after the commit: a failed commit leaves the parts for a look
    print(_table([[args.sampler, args.steps, args.num, summary["seconds"]]], ["sampler", "steps", "num", "seconds"]))
    return summary


def _write_samples(out, model, batches, numbers: Sequence[int]) -> str:
    """Write ``batches`` (each (b, C, H, W) in [−1, 1], in order) into ``out`` as they come: image i
    as sample_{numbers[i]:06d}.png, all as the rows of samples.safetensors (float32, len(numbers) rows), and
    the first :data:`GRID_IMAGES` as grid.png. Only one batch is held at a time (plus the grid's
    first images); returns the grid's line for the summary."""
    import torch

    from belm.apps.io import save_images
    samples, shown, done = None, [], 0
    for images in batches:
        if samples is None:
            samples = _RowsFile(out.file("samples.safetensors"), "images", (len(numbers), *images.shape[1:]))
        samples.write(images)
        save_images(out, images, [f"sample_{n:06d}.png" for n in numbers[done:done + len(images)]],
                    scale=_save_scale(model, images))
        if done < GRID_IMAGES:   # a copy: a view would keep the whole batch alive
            shown.append(images[:GRID_IMAGES - done].clone())
        done += len(images)
    samples.close()
    return _save_sample_grid(out, model, torch.cat(shown), total=done)


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
    model = _load(args)    # a bundled model (checked): FD-digits' features and reference set
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


# -- data sets: belm invert, --latents DIR, and runs under torchrun ------------------------------
def _invert_options(p: argparse.ArgumentParser) -> None:
    from belm.apps.datasets import FIT_POLICIES
    p.add_argument("inputs", nargs="+", metavar="IMAGES",
                   help="image files, folders (searched recursively), glob patterns or list files (.txt/.lst, one "
                        "path per line); PNG, JPEG or WebP; taken in sorted path order")
    p.add_argument("--source", default=None, help="condition of the inversion (class id or prompt); default: none")
    p.add_argument("--freeze", type=int, default=None,
                   help="stop the inversion at this level (0 = full noise; edit --latents resamples from "
                        "it); default 0")
    p.add_argument("--fit", default="none", choices=FIT_POLICIES,
                   help="inputs of another size than the model's: none refuses them (naming the file), resize "
                        "stretches them, crop center-crops them to the model's aspect ratio, then resizes")
    p.add_argument("--shard-size", type=int, default=32,
                   help="images per shard file: the unit of work, of resuming and of the split over ranks")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader worker processes that decode images, per rank (0: decode in the rank itself)")
    p.add_argument("--exact", default="float", choices=("float", "bitwise"),
                   help="bitwise: integer-lattice latents (--sampler obelm or bdia) that sample back to the "
                        "inputs bit for bit")
    for action in p._actions:       # common()'s wording is about seeds and held-out digits
        if action.dest == "num":
            action.help = "invert only the first NUM inputs (in sorted order); default: all"
        elif action.dest == "seed":
            action.help = argparse.SUPPRESS


def _latents_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latents", default=None, metavar="DIR",
                   help="a folder written by belm invert: its model, sampler, grid and condition are taken from "
                        "its index.json (a contradicting option is refused)")


def _check_invert(args: argparse.Namespace) -> None:
    """invert's own arguments; builds the plan (inputs, settings) and checks --out against it,
    all before any model load."""
    import torch

    from belm.apps import datasets
    from belm.apps.models import BUNDLED_MODELS
    if args.shard_size < 1:
        raise CLIError(f"--shard-size must be >= 1; got {args.shard_size}")
    if args.workers < 0:
        raise CLIError(f"--workers must be >= 0; got {args.workers}")
    if args.freeze is not None and not 0 <= args.freeze < args.steps:
        raise CLIError(f"--freeze must lie in [0, {args.steps - 1}] (freeze < steps); got {args.freeze}")
    if args.guidance != 1.0 and args.source is None:
        raise CLIError(f"--guidance {args.guidance:g} needs --source (the condition to guide towards)")
    batch_size = min(args.batch_size or args.shard_size, args.shard_size)
    if args.exact == "bitwise":
        if args.sampler not in ("obelm", "bdia"):
            raise CLIError(f"--exact bitwise is defined for the 2-step samplers obelm and bdia; got --sampler "
                           f"{args.sampler}")
        if batch_size != args.shard_size:
            raise CLIError("--exact bitwise inverts whole shards: omit --batch-size (or set it to --shard-size)")
    try:
        paths = datasets.list_images(args.inputs)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise CLIError(str(err)) from None
    if args.num is not None:
        paths = paths[:args.num]
    keys = ("model", "sampler", "steps", "spacing", "gamma", "p", "guidance", "source", "dtype", "null_class",
            "negative_prompt", "fit", "exact")
    settings = {k: getattr(args, k) for k in keys}
    if args.model not in BUNDLED_MODELS:
        settings["model"] = os.path.abspath(args.model)
    settings.update(freeze=args.freeze or 0, batch_size=batch_size, device=torch.device(args.device).type)
    args.plan = datasets.DatasetPlan(tuple(paths), args.shard_size, settings)
    try:
        datasets.check_folder(Path(args.out), args.plan)
    except ValueError as err:
        raise CLIError(str(err)) from None


def _apply_index(args: argparse.Namespace) -> None:
    """``--latents DIR``: take the settings that decided the latents from DIR's index (model,
    sampler, grid, condition, batches), refusing an option given with another value."""
    from belm.apps import datasets
    if getattr(args, "latent", None) is not None:
        raise CLIError("--latent and --latents exclude each other: pass one latent file or one latents folder")
    if getattr(args, "image", None):
        raise CLIError("--image does not apply with --latents: the inputs are those recorded in the folder's index")
    if args.out is not None and os.path.realpath(args.out) == os.path.realpath(args.latents):
        raise CLIError(f"--out {args.out} is the --latents folder; write the {args.command} outputs to another folder")
    try:
        index = datasets.read_index(args.latents)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise CLIError(str(err)) from None
    recorded = index["settings"]
    taken = {k: recorded.get(k) for k in ("model", "sampler", "steps", "spacing", "gamma", "p", "dtype",
                                          "null_class", "negative_prompt", "batch_size")}
    taken["num"] = index["num_images"]
    if args.command == "sample":
        taken.update(target=recorded.get("source"), guidance=recorded.get("guidance"))
    elif args.command == "reconstruct":
        taken.update(source=recorded.get("source"), guidance=recorded.get("guidance"))
    else:   # edit: inverted with --source up to --freeze; resampled with the --target and --guidance given
        taken.update(source=recorded.get("source"), inversion_guidance=recorded.get("guidance"),
                     freeze=recorded.get("freeze"))
    defaults = vars(build_parser().parse_args([args.command]))
    for name, value in taken.items():
        given = getattr(args, name)
        if given != defaults[name] and str(given) != str(value):
            flag = "--" + name.replace("_", "-")
            raise CLIError(f"{flag} {given}: {args.latents} was inverted with {flag} {value} (see its "
                           f"{datasets.INDEX_FILE}); omit {flag}")
        setattr(args, name, value)
    args.latents_index = index


def _distributed(args: argparse.Namespace) -> None:
    """Under a launcher (``$WORLD_SIZE`` > 1): join the process group for the commands that shard
    (invert, sample from seeds, sample --latents) and refuse every other command in one line,
    before any work (each rank would do all of it and write the same --out)."""
    from belm.apps.sharding import init_world, launched_world_size
    try:
        size = launched_world_size()
    except ValueError as err:
        raise CLIError(str(err)) from None
    if size <= 1:
        return
    if args.command not in ("invert", "sample") or getattr(args, "latent", None) is not None:
        what = "sample --latent" if args.command == "sample" else args.command
        raise CLIError(f"{what} does not run sharded: under $WORLD_SIZE={size} every rank would do all the work "
                       "and write the same --out; run it as one process (without torchrun). invert, sample from "
                       "seeds and sample --latents run sharded")
    args.device = init_world(args.device)


def _rank_table(ranks: Sequence[dict]) -> str:
    return _table([[r["rank"], r["images"], r["seconds"], r["images_per_s"], r["peak_rss_mib"]] for r in ranks],
                  ["rank", "images", "seconds", "images_per_s", "peak_rss_mib"])


def cmd_invert(args: argparse.Namespace) -> dict:
    from belm.apps import datasets
    from belm.apps.sharding import world
    rank, size = world(args.device)
    model = _load(args)
    plan = args.plan
    result = datasets.invert_dataset(model, plan, args.out, invert_fn=datasets.inverter(model, plan.settings),
                                     batch_size=plan.settings["batch_size"], shape=datasets.input_shape(model),
                                     workers=args.workers, progress=not args.no_progress, rank=rank, world_size=size)
    if rank != 0:
        return result
    summary = dict(result, world_size=size, dataset=plan.record(), **args.settings)
    datasets.atomic_write(Path(args.out) / datasets.SUMMARY_FILE, datasets.json_bytes(summary))
    print(f"{len(plan.paths)} images in {plan.num_shards} shards of {plan.shard_size}: {result['computed']} "
          f"computed, {result['skipped']} already done; index: {result['index']}")
    print(_rank_table(result["ranks"]))
    print(f"sample them back with: belm sample --latents {args.out} --out OUT")
    return summary


def _latents_sampler(args: argparse.Namespace, model, condition: Any, guidance: float):
    """latent of a shard → its images (B, C, H, W) in [−1, 1], in the batches it was inverted in."""
    from belm.apps import datasets, tasks
    options = datasets.sampler_options(args.latents_index["settings"])

    def sample(latent):
        return tasks.sample_latent(model, latent, sampler=args.sampler, steps=args.steps, condition=condition,
                                   guidance=guidance, batch_size=args.batch_size, progress=False,
                                   spacing=args.spacing, sampler_options=options)
    return sample


def _sample_latents(args: argparse.Namespace) -> dict:
    """``sample --latents DIR``: each rank samples its shards into parts inside --out (kept on a
    kill: a rerun resumes); rank 0 assembles them in index order and commits --out."""
    import shutil

    from belm.apps import datasets
    from belm.apps.io import OutputDir
    from belm.apps.sharding import world
    index = args.latents_index
    rank, size = world(args.device)
    model = _load(args)
    sample = _latents_sampler(args, model, model.parse_condition(args.target, "--target"), args.guidance)
    parts = Path(args.out) / datasets.PARTS_FOLDER
    t0 = time.perf_counter()
    done = datasets.sample_dataset(index, args.latents, parts, sample_fn=sample, rank=rank, world_size=size)
    seconds = time.perf_counter() - t0
    images_done = sum(index["shards"][k]["count"] for k in done)
    ranks = datasets.gather_figures({"rank": rank, "images": images_done, "seconds": seconds,
                                     "images_per_s": images_done / seconds if images_done else None,
                                     "peak_rss_mib": datasets.peak_rss_mib()}, size)
    if rank != 0:
        return {}
    summary = dict(seconds=seconds, ranks=ranks, world_size=size, latents=args.latents, **args.settings)
    summary["inputs"] = [entry["path"] for entry in index["images"]]
    counts = [entry["count"] for entry in index["shards"]]
    with OutputDir(args.out) as out:
        # one part (shard) in memory at a time, in index order, through the writer of `sample`
        summary["grid"] = _write_samples(out, model, datasets.iter_parts(parts, range(len(counts)), counts),
                                         range(sum(counts)))
        out.write_json("summary.json", summary)
        shutil.rmtree(parts)      # last: a kill before the commit keeps the parts for a rerun
    print(_rank_table(ranks))
    return summary


def _inputs_of(args: argparse.Namespace, model, shard: int):
    """The inputs of one shard of --latents, as inverted (same fit), checked against the sha256
    the index recorded (a changed file would make the comparison meaningless)."""
    import torch

    from belm.apps import datasets
    index = args.latents_index
    entries = [e for e in index["images"] if e["shard"] == shard]
    images = []
    for entry in entries:
        image, digest = datasets.read_image(entry["path"], datasets.input_shape(model), index["settings"]["fit"])
        if digest != entry["sha256"]:
            raise CLIError(f"--latents {args.latents}: input {entry['path']} changed since it was inverted (sha256 "
                           "differs from the index); invert it again")
        images.append(image)
    return torch.stack(images)


def _reconstruct_latents(args: argparse.Namespace) -> dict:
    """``reconstruct --latents DIR``: sample every shard back and compare with its inputs."""
    import torch

    from belm.apps import datasets, tasks
    from belm.apps.io import OutputDir, save_grid
    from belm.apps.metrics import reconstruction_errors
    model = _load(args)
    sample = _latents_sampler(args, model, model.parse_condition(args.source, "--source"), args.guidance)
    errors: dict[str, list] = {"max_abs_error": [], "mse": [], "psnr": []}
    shown: list = []
    for k, latent in datasets.iter_latents(args.latents, args.latents_index, device=args.device):
        inputs, rec = _inputs_of(args, model, k), sample(latent)
        for key, values in reconstruction_errors(inputs.to(rec), rec).items():
            errors[key].extend(values)
        if sum(len(a) for a, _ in shown) < 16:
            shown.append((inputs, rec.cpu()))
    summary = dict(tasks.psnr_summary(errors), num=len(errors["mse"]), latents=args.latents, **args.settings)
    summary["what"] = "sampled latents (decoded) vs the input images, in pixels in [-1, 1]"
    with OutputDir(args.out) as out:
        save_grid(out, [torch.cat([a for a, _ in shown])[:16], torch.cat([r for _, r in shown])[:16]],
                  "reconstruction.png", scale=_picture_scale(model))
        out.write_json("summary.json", summary)
    print(_table([[args.sampler, summary["num"], *tasks.psnr_summary(errors).values()]],
                 ["sampler", "num", "max_abs_error", "mse", "psnr"]))
    return summary


def _edit_latents(args: argparse.Namespace) -> dict:
    """``edit --latents DIR --target T``: resample every shard's latents (inverted with the
    folder's --source up to its --freeze level) with the target condition."""
    import torch
    from safetensors.torch import save_file

    from belm.apps import datasets, tasks
    from belm.apps.io import OutputDir, save_grid, save_images
    model = _load(args)
    if args.target is None:
        raise CLIError("edit --latents needs --target (the condition to resample with)")
    target = model.parse_condition(args.target, "--target")
    sample = _latents_sampler(args, model, target, args.guidance)
    edited = torch.cat([sample(lat).cpu() for _, lat in datasets.iter_latents(args.latents, args.latents_index,
                                                                               device=args.device)])
    summary: dict[str, Any] = dict(num=len(edited), latents=args.latents, **args.settings)
    predicted = tasks.classify(model, edited) if isinstance(target, int) else None
    if predicted is not None:
        summary["success_rate"] = float((predicted == target).float().mean())
    summary["inputs"] = [entry["path"] for entry in args.latents_index["images"]]
    with OutputDir(args.out) as out:
        save_grid(out, [_inputs_of(args, model, 0)[:16], edited[:16]], "edit.png", scale=_picture_scale(model))
        save_images(out, edited, [f"edited_{i:06d}.png" for i in range(len(edited))], scale=_save_scale(model, edited))
        save_file({"images": edited.contiguous().to(torch.float32)}, str(out.file("samples.safetensors")))
        out.write_json("summary.json", summary)
    print(_table([[args.source, args.target, args.freeze, args.guidance, len(edited), summary.get("success_rate")]],
                 ["source", "target", "freeze", "guidance", "num", "success_rate"]))
    return summary


COMMANDS = {"demo": cmd_demo, "sample": cmd_sample, "reconstruct": cmd_reconstruct, "edit": cmd_edit,
            "interpolate": cmd_interpolate, "fd": cmd_fd, "optimize": cmd_optimize, "invert": cmd_invert}


def _one_line(text: str, limit: int = 400) -> str:
    """A message as one line: its lines joined, or its first line when they run long (a state
    dict's list of mismatches); --debug shows the whole."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    joined = " ".join(lines)
    return joined if len(joined) <= limit or len(lines) < 2 else f"{lines[0]} … (--debug shows the rest)"


def _failure(err: Exception) -> tuple[int, str]:
    """(exit status, one line) for an exception that ended a run: bad input and what it asked for
    (memory, files, numerics of the chosen grid) exit 2; anything else is a bug, exit 1."""
    import torch
    text = _one_line(str(err)) or type(err).__name__
    if isinstance(err, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return EXIT_USAGE, (f"out of memory ({text}); use a smaller --batch-size (or --num), or a machine or device "
                            "with more memory")
    from belm.errors import BELMError
    if isinstance(err, (CLIError, BELMError, ValueError, TypeError, OSError, ArithmeticError, RuntimeError)):
        return EXIT_USAGE, text
    return EXIT_INTERNAL, (f"{type(err).__name__}: {text} (unexpected: rerun with --debug for the traceback and "
                           "report it)")


def _growth_line(message: str, args: argparse.Namespace) -> str:
    """A :class:`~belm.errors.GrowthWarning`'s message in the command's terms: the grid by its
    flags and the fix as flags (--spacing trailing, --steps), not Python calls. Unknown wording
    passes through, on one line."""
    import re

    from belm.schedule import default_spacing
    head = re.match(r"(\S+) on this grid \(N = (\d+), last timestep (\d+)\) multiplies the parasitic mode by "
                    r"(\S+) when inverting", message)
    if head is None:
        return _one_line(message)
    method, steps, last, factor = head.groups()
    rest = message[head.end():]
    spacing = getattr(args, "spacing", None) or f"{default_spacing(args.sampler)} (default)"   # optimize has none
    helps = re.search(r"growth (\S+?) there", rest)
    useless = re.search(r"does not help here \(growth (\S+?)\)", rest)
    if "p^-2N" in rest:       # EDICT: its p-coupling grows with the number of steps
        fix = "use fewer --steps, a --p closer to 1, or --sampler obelm or bdia --gamma 1"
    elif helps:
        fix = f"use --spacing trailing (growth {helps.group(1)} there)"
    elif useless:
        fix = f"--spacing trailing does not help here (growth {useless.group(1)}): use more --steps or --sampler bdia " \
              "--gamma 1"
    else:
        fix = "use more --steps, or --sampler obelm or bdia --gamma 1"
    effect = ("the gradients, which recover the chain's states by inverting it, carry that growth times float "
              "rounding") if "grad='reversible'" in rest else \
        "the inverted latents are exact but not noise-like, so edits and interpolations degrade (reconstruction " \
        "stays exact)"
    return (f"{method} on this grid (--steps {steps}, --spacing {spacing}: last timestep {last}) multiplies the "
            f"parasitic mode by {factor} when inverting: {effect}; {fix}")


@contextlib.contextmanager
def _warnings_in_cli_terms(args: argparse.Namespace) -> Iterator[None]:
    """Show a GrowthWarning as one line ``belm COMMAND: warning: …`` in the command's terms
    (no Python source line); other warnings as Python shows them."""
    import warnings

    from belm.errors import GrowthWarning
    python_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, GrowthWarning):
            print(f"belm {args.command}: warning: {_growth_line(str(message), args)}", file=sys.stderr)
        else:
            python_show(message, category, filename, lineno, file, line)
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = python_show


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``belm ARGV``; returns the exit status: 0, 2 (bad input: one line on stderr naming the
    argument and the fix), 130 (interrupted by Ctrl-C: one line) or 1 (an unexpected failure: one
    line; ``--debug`` shows the traceback of any of them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, prefix = "--debug" in argv, "belm"
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:       # argparse printed its one-line usage error (or --help / --version)
            return int(exc.code or 0)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        debug, prefix = debug or args.debug, f"belm {args.command}"
        threads = resolve_threads(args.threads)
        if threads > 0:
            _pin_threads(threads)
        if args.no_progress:
            _silence_libraries()
        if args.command != "demo":
            _check(args)
        args.settings = _settings(args, argv)
        _distributed(args)
        with _warnings_in_cli_terms(args):
            COMMANDS[args.command](args)
        return 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prefix}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if debug:
            raise
        status, line = _failure(err)
        print(f"{prefix}: error: {line}", file=sys.stderr)
        return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

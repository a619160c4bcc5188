"""The ``belm`` command: demo, sample, reconstruct, edit, interpolate, fd.

Every command validates its arguments before any work, writes its pictures and a
``summary.json`` into ``--out`` only when it succeeds (nothing half-written), prints a short
table, and exits non-zero with a one-line message on bad input (``--debug`` for a traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Optional, Sequence

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (the usage is one `-h` away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    from belm.solvers.registry import sampler_names

    parser = _Parser(prog="belm", description="Exact inversion of diffusion models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def common(p: argparse.ArgumentParser, steps: int = 50, num: int = 16, guidance: float = 1.0) -> None:
        p.add_argument("--model", default="digits", help="'digits' (bundled) or a local diffusers folder")
        p.add_argument("--sampler", default="obelm", choices=sampler_names(), metavar="NAME",
                       help=f"one of {', '.join(sampler_names())} (default obelm)")
        p.add_argument("--steps", type=int, default=steps, help=f"sampling steps N (default {steps})")
        p.add_argument("--guidance", type=float, default=guidance, help="classifier-free guidance scale")
        p.add_argument("--seed", type=int, default=0, help="seed (sample i uses seed + i)")
        p.add_argument("--num", type=int, default=num, help="number of images")
        p.add_argument("--out", default=None, help="output folder (default outputs/COMMAND)")
        p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
        p.add_argument("--debug", action="store_true", help="show full tracebacks")

    p = sub.add_parser("demo", help="the tour: reconstruction, editing, interpolation, sampling, FD")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--quick", action="store_true", help="fewer images and steps (a smoke test)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("sample", help="generate images from seeds")
    common(p, num=16, guidance=3.0)
    p.add_argument("--target", default=None, help="class id (digits) or prompt (SD); default: all classes in turn")
    p.add_argument("--batch-size", type=int, default=64)

    p = sub.add_parser("reconstruct", help="invert and resample images; report the error")
    common(p)
    p.add_argument("--image", action="append", default=None, help="image file (repeatable); digits: held-out set")
    p.add_argument("--source", default=None, help="condition used for both directions (class id or prompt)")

    p = sub.add_parser("edit", help="invert with --source up to --freeze, resample with --target")
    common(p, guidance=3.0)
    p.add_argument("--image", action="append", default=None, help="image file (repeatable); digits: held-out set")
    p.add_argument("--source", required=True, help="source class id (digits) or prompt (SD)")
    p.add_argument("--target", required=True, help="target class id (digits) or prompt (SD)")
    p.add_argument("--freeze", type=int, default=None, help="inversion stops at this level (0 = full noise); "
                   "default: 0 for digits")
    p.add_argument("--inversion-guidance", type=float, default=1.0)

    p = sub.add_parser("interpolate", help="interpolate between two inverted real images")
    common(p, num=8)
    p.add_argument("--image", action="append", default=None, help="two image files; digits: two held-out digits")
    p.add_argument("--source", default=None, help="condition for inversion and sampling")

    p = sub.add_parser("fd", help="Fréchet distance (FD-digits) of samples to the held-out digits")
    common(p, num=297, guidance=3.0)
    p.add_argument("--batch-size", type=int, default=128)
    return parser


# -- argument checks ----------------------------------------------------------------------
def _check(args: argparse.Namespace) -> None:
    if getattr(args, "steps", 1) < 1:
        raise CLIError(f"--steps must be >= 1; got {args.steps}")
    if getattr(args, "num", 1) < 1:
        raise CLIError(f"--num must be >= 1; got {args.num}")
    if getattr(args, "batch_size", 1) < 1:
        raise CLIError(f"--batch-size must be >= 1; got {args.batch_size}")
    if getattr(args, "guidance", 0.0) < 0:
        raise CLIError(f"--guidance must be >= 0; got {args.guidance}")
    if args.command == "edit" and args.freeze is not None and not 0 <= args.freeze < args.steps:
        raise CLIError(f"--freeze must lie in [0, {args.steps - 1}] (freeze < steps); got {args.freeze}")
    for path in getattr(args, "image", None) or []:
        if not os.path.isfile(path):
            raise CLIError(f"--image {path}: no such file")
    if args.command == "interpolate" and args.image and len(args.image) != 2:
        raise CLIError(f"--image must be given exactly twice for interpolate; got {len(args.image)}")
    if args.command != "demo" and args.model != "digits" and not os.path.isdir(args.model):
        raise CLIError(f"--model {args.model}: no such folder; pass 'digits' or a local diffusers folder")
    if getattr(args, "model", None) == "digits":
        # Known without loading the model, so a typo fails before any work.
        from belm.models.data import NUM_CLASSES
        for arg in ("source", "target"):
            value = getattr(args, arg, None)
            if value is not None and (not str(value).lstrip("-").isdigit() or not 0 <= int(value) < NUM_CLASSES):
                raise CLIError(f"--{arg} must be a class id in [0, {NUM_CLASSES - 1}] for --model digits; "
                               f"got {value!r}")
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
        return str(v)
    cells = [list(map(str, header))] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- commands -----------------------------------------------------------------------------
def _load(args: argparse.Namespace):
    from belm.apps.models import load_model
    return load_model(args.model, device=args.device)


def _digits_images(model, args, label: Optional[int] = None):
    """Held-out digits (optionally of one class), chosen by --seed; or the --image files."""
    import torch
    if args.image:
        return model.load_images(args.image), None
    if model.name != "digits":
        raise CLIError("--image is required for models other than 'digits'")
    from belm.models import digits_dataset
    images, labels = digits_dataset("heldout")
    if label is not None:
        keep = labels == label
        images, labels = images[keep], labels[keep]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    take = order[: args.num]
    if len(take) < args.num:
        raise CLIError(f"--num {args.num}: only {len(take)} held-out digits are available")
    return images[take], labels[take]


def cmd_reconstruct(args: argparse.Namespace) -> dict:
    from belm.apps import tasks
    from belm.apps.io import OutputDir, save_grid
    model = _load(args)
    images, labels = _digits_images(model, args)
    condition = model.parse_condition(args.source, "--source")
    if condition is None and labels is not None:
        condition = labels.tolist()
    progress = not args.no_progress
    samplers = [args.sampler] + (["ddim"] if args.sampler != "ddim" else [])
    results = {name: tasks.reconstruct(model, images, sampler=name, steps=args.steps, condition=condition,
                                       guidance=args.guidance, progress=progress) for name in samplers}
    summary = dict(tasks.psnr_summary(results[args.sampler]["latent"]), sampler=args.sampler, steps=args.steps,
                   num=len(images), model=model.name)
    if model.kind == "latent":
        summary["pixel"] = tasks.psnr_summary(results[args.sampler]["pixel"])
    if "ddim" in results and args.sampler != "ddim":
        summary["ddim"] = tasks.psnr_summary(results["ddim"]["latent"])
    rows = [[name, *tasks.psnr_summary(r["latent"]).values()] for name, r in results.items()]
    with OutputDir(args.out) as out:
        save_grid(out, [images] + [r["reconstruction"] for r in results.values()], "reconstruction.png")
        out.write_json("summary.json", summary)
    print(_table(rows, ["sampler", "max_abs_error", "mse", "psnr"]))
    return summary


def cmd_edit(args: argparse.Namespace) -> dict:
    from belm.apps import tasks
    from belm.apps.io import OutputDir, save_grid, save_images
    model = _load(args)
    source = model.parse_condition(args.source, "--source")
    target = model.parse_condition(args.target, "--target")
    freeze = args.freeze if args.freeze is not None else 0
    images, _ = _digits_images(model, args, label=source if not model.prompted else None)
    edited = tasks.edit(model, images, source, target, sampler=args.sampler, steps=args.steps, freeze=freeze,
                        guidance=args.guidance, inversion_guidance=args.inversion_guidance,
                        progress=not args.no_progress)
    summary: dict[str, Any] = dict(sampler=args.sampler, steps=args.steps, freeze=freeze, guidance=args.guidance,
                                   source=args.source, target=args.target, num=len(images), model=model.name)
    predicted = tasks.classify(model, edited)
    if predicted is not None:
        summary["success_rate"] = float((predicted == target).float().mean())
    with OutputDir(args.out) as out:
        save_grid(out, [images, edited], "edit.png")
        save_images(out, edited, [f"edited_{i:03d}.png" for i in range(len(edited))],
                    scale=4 if model.name == "digits" else 1)
        out.write_json("summary.json", summary)
    print(_table([[args.source, args.target, freeze, args.guidance, summary.get("success_rate", "n/a")]],
                 ["source", "target", "freeze", "guidance", "success_rate"]))
    return summary


def cmd_interpolate(args: argparse.Namespace) -> dict:
    from belm.apps import tasks
    from belm.apps.io import OutputDir, save_grid
    model = _load(args)
    if args.image:
        images, labels = model.load_images(args.image), None
    else:
        args_two = argparse.Namespace(**{**vars(args), "num": 2})
        images, labels = _digits_images(model, args_two)
    condition = model.parse_condition(args.source, "--source")
    strip = tasks.interpolate(model, images[:1], images[1:2], num=args.num, sampler=args.sampler,
                              steps=args.steps, condition=condition, guidance=args.guidance,
                              progress=not args.no_progress)
    endpoint_error = max(float((strip[0] - images[0]).abs().max()), float((strip[-1] - images[1]).abs().max()))
    summary = dict(sampler=args.sampler, steps=args.steps, num=args.num, endpoint_max_abs_error=endpoint_error,
                   model=model.name)
    with OutputDir(args.out) as out:
        save_grid(out, [strip], "interpolation.png")
        out.write_json("summary.json", summary)
    print(_table([[args.sampler, args.num, endpoint_error]], ["sampler", "frames", "endpoint_max_abs_error"]))
    return summary


def _sample_conditions(model, args, seeds):
    if args.target is not None:
        return model.parse_condition(args.target, "--target")
    if model.num_classes is not None:
        return [s % model.num_classes for s in seeds]
    return None


def cmd_sample(args: argparse.Namespace) -> dict:
    from belm.apps import tasks
    from belm.apps.io import OutputDir, save_grid, save_images
    from belm.apps.sharding import gather_in_order, shard
    model = _load(args)
    seeds = list(range(args.seed, args.seed + args.num))
    conditions = _sample_conditions(model, args, seeds)
    mine = shard(seeds, block=args.batch_size)  # whole batches per rank: same bits as one process
    cond_mine = [conditions[seeds.index(s)] for s in mine] if isinstance(conditions, list) else conditions
    t0 = time.perf_counter()
    images = tasks.generate(model, mine, sampler=args.sampler, steps=args.steps, condition=cond_mine,
                            guidance=args.guidance, batch_size=args.batch_size, progress=not args.no_progress)
    images = gather_in_order(images, mine, seeds)
    if images is None:  # a non-zero rank of a sharded run: rank 0 writes
        return {}
    summary = dict(sampler=args.sampler, steps=args.steps, num=args.num, seed=args.seed, guidance=args.guidance,
                   seconds=time.perf_counter() - t0, model=model.name)
    with OutputDir(args.out) as out:
        ncol = 10 if model.num_classes == 10 else 8
        save_grid(out, [images[i:i + ncol] for i in range(0, len(images), ncol)], "grid.png")
        save_images(out, images, [f"sample_{s:06d}.png" for s in seeds], scale=4 if model.name == "digits" else 1)
        import torch
        from safetensors.torch import save_file
        save_file({"images": images.contiguous().to(torch.float32)}, str(out.file("samples.safetensors")))
        out.write_json("summary.json", summary)
    print(_table([[args.sampler, args.steps, args.num, summary["seconds"]]], ["sampler", "steps", "num", "seconds"]))
    return summary


def cmd_fd(args: argparse.Namespace) -> dict:
    from belm.apps import tasks
    from belm.apps.io import OutputDir, save_grid
    model = _load(args)
    if model.classifier is None:
        raise CLIError(f"fd needs a feature extractor; the bundled one is for --model digits, not {model.name}")
    from belm.models import digits_dataset
    reference, _ = digits_dataset("heldout")
    seeds = list(range(args.seed, args.seed + args.num))
    images = tasks.generate(model, seeds, sampler=args.sampler, steps=args.steps,
                            condition=[s % 10 for s in seeds], guidance=args.guidance,
                            batch_size=args.batch_size, progress=not args.no_progress)
    fd = tasks.fd_to_reference(model, images, reference)
    summary = dict(fd=fd, sampler=args.sampler, steps=args.steps, num=args.num, guidance=args.guidance,
                   reference="digits held-out", model=model.name)
    with OutputDir(args.out) as out:
        save_grid(out, [images[i:i + 10] for i in range(0, min(len(images), 100), 10)], "samples.png")
        out.write_json("summary.json", summary)
    print(_table([[args.sampler, args.steps, args.num, fd]], ["sampler", "steps", "num", "fd_digits"]))
    return summary


def cmd_demo(args: argparse.Namespace) -> dict:
    from belm.apps.demo import run_demo
    from belm.apps.io import check_writable
    try:
        check_writable(args.out)
    except (ValueError, PermissionError) as err:
        raise CLIError(str(err)) from None
    return run_demo(args.out, quick=args.quick, progress=not args.no_progress)


COMMANDS = {"demo": cmd_demo, "sample": cmd_sample, "reconstruct": cmd_reconstruct, "edit": cmd_edit,
            "interpolate": cmd_interpolate, "fd": cmd_fd}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:       # argparse printed its one-line usage error
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    debug = args.debug or "--debug" in argv
    try:
        if args.command != "demo":
            _check(args)
        COMMANDS[args.command](args)
        return 0
    except CLIError as err:
        print(f"belm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, PermissionError, OSError) as err:
        if debug:
            raise
        print(f"belm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

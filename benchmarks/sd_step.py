"""``python -m benchmarks.sd_step [--steps 20] [--repeats 25] [--write]``: belm per step on Stable Diffusion.

belm's O-BELM ``sample`` on the tiny Stable Diffusion pipeline of ``tests/tiny_models.py``
(UNet2DConditionModel, batch 1, guidance 1, float32 network, float64 state), ÷ a bare loop
of N UNet calls on the same latent and prompt embedding (what any sampler must spend).
Target (issue 15): ≤ 1.01×. A third variant re-reads the network's dtype/device from the
module tree on every call (what ``DiffusersEps`` did before it cached them) to show the cost
of that walk. Variants run interleaved in one process, 1 thread; ratios are medians of
per-repeat ratios. ``--write`` replaces this section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from .sections import markers, write_section
from .common import cpu_model, interleaved, load_average, median, paired_ratio

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = markers("sd_step")


def measure(steps: int, repeats: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_sd_pipeline

    from belm import OBELM
    from belm.adapters import StableDiffusion
    from belm.adapters import eps as eps_module

    with tempfile.TemporaryDirectory() as tmp:
        sd = StableDiffusion.from_pretrained(tiny_sd_pipeline(tmp))
    eps = sd.eps(prompt="a photo of a cat", guidance_scale=1.0)
    schedule = sd.schedule(steps)
    sampler = OBELM(eps, schedule, progress=False)
    z = torch.randn(1, sd.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = sd.prompt_embeds("a photo of a cat")
    unet = sd.unet
    times = [torch.tensor(schedule.timestep(n)) for n in range(steps)]

    def bare() -> None:
        with torch.no_grad():
            for t in times:
                unet(z, t, encoder_hidden_states=cond).sample

    def belm_cached() -> None:
        sampler.sample(z)

    walk = eps_module._model_dtype_device

    class Uncached(eps_module.DiffusersEps):
        def _model_dtype_device(self):  # the module walk on every call, as before the cache
            return walk(self.model)

    uncached = OBELM(Uncached(unet, sd.scheduler, encoder_hidden_states=cond), schedule, progress=False)

    def belm_uncached() -> None:
        uncached.sample(z)

    t = interleaved({"bare": bare, "belm": belm_cached, "belm_walk": belm_uncached}, repeats)
    return {"steps": steps, "repeats": repeats,
            "bare_ms": 1e3 * median(t["bare"]) / steps, "belm_ms": 1e3 * median(t["belm"]) / steps,
            "walk_ms": 1e3 * median(t["belm_walk"]) / steps,
            "ratio": paired_ratio(t["belm"], t["bare"]), "ratio_walk": paired_ratio(t["belm_walk"], t["bare"]),
            "load": load_average()}


def markdown(r: dict) -> str:
    ok = "met" if r["ratio"] <= 1.01 else "**not met**"
    return "\n".join([
        BEGIN, "## Per step on Stable Diffusion at batch 1 (DiffusersEps overhead)", "",
        f"_`python -m benchmarks.sd_step` on {time.strftime('%Y-%m-%d %H:%M')}; CPU {cpu_model()} "
        f"({os.cpu_count()} cores, torch threads {torch.get_num_threads()}); load average {r['load']}. Tiny SD "
        f"pipeline (tests/tiny_models.py), latent 1×4×8×8, guidance 1, N = {r['steps']}, median of {r['repeats']} "
        "interleaved repeats._", "",
        "| variant | ms/step | ÷ bare UNet loop | target |", "|---|---|---|---|",
        f"| bare loop of N `unet(z, t, encoder_hidden_states=c)` | {r['bare_ms']:.3f} | 1 | |",
        f"| belm O-BELM `sample` (DiffusersEps, dtype/device cached) | {r['belm_ms']:.3f} | **{r['ratio']:.3f}×** | "
        f"≤ 1.01× ({ok}) |",
        f"| the same, module tree walked per call (before the cache) | {r['walk_ms']:.3f} | {r['ratio_walk']:.3f}× | |",
        END])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sd_step", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="sampling steps N")
    p.add_argument("--repeats", type=int, default=25, help="interleaved repeats")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    p.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    text = markdown(measure(args.steps, args.repeats))
    print(text)
    if args.write:
        write_section("sd_step", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

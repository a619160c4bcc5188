"""``python -m benchmarks.sd_step [--steps 20] [--repeats 60] [--sd15] [--write]``: belm per step on Stable Diffusion.

belm's O-BELM ``sample`` on the tiny Stable Diffusion pipeline of ``tests/tiny_models.py``
(UNet2DConditionModel, batch 1, guidance 1, float32 network, float64 state), ÷ a bare loop
of N UNet calls on the same latent and prompt embedding. Target (issue 15): ≤ 1.01×.

Two ratios per variant, from the same interleaved run (1 thread):

* *paired*: the median over repeats of (variant time ÷ bare-loop time of the same repeat).
  This is the target's definition, but on a shared machine the speed of the host drifts by
  ±20 % between neighbouring 50 ms runs, which moves it by a few percent.
* *in-run*: the variant's time ÷ the time spent inside the UNet's ``forward`` during that
  same run (timed around ``forward``); the drift hits both alike. The bare loop's own in-run
  ratio (module-call overhead) is shown for reference.

Extra rows: the *floor*, a hand-written loop doing only what any float64-state sampler must
do besides the network (cast the state to float32, three in-place float64 updates: O-BELM's
x_n = a·x_{n−2} + b·x_{n−1} + c·ε), and belm with the network's module tree walked on every
call (what ``DiffusersEps`` did before it cached dtype/device). ``--sd15`` adds belm and the
bare loop on a UNet with Stable Diffusion 1.5's configuration (860 M parameters, random
weights, latent 1×4×16×16, N = 10): the same fixed cost per call on a real-sized network.
``--write`` replaces this section of benchmarks/RESULTS.md.
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


def tiny_sd() -> dict:
    """The tiny SD pipeline's UNet, scheduler, prompt embedding and a 1×4×8×8 latent."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_sd_pipeline

    from belm.adapters import StableDiffusion

    with tempfile.TemporaryDirectory() as tmp:
        sd = StableDiffusion.from_pretrained(tiny_sd_pipeline(tmp))
    return {"name": "tiny SD pipeline (tests/tiny_models.py)", "unet": sd.unet, "scheduler": sd.scheduler,
            "cond": sd.prompt_embeds("a photo of a cat"), "latent": (1, sd.latent_channels, 8, 8)}


def sd15_sized() -> dict:
    """A UNet2DConditionModel with Stable Diffusion 1.5's configuration (860 M parameters,
    random weights: no hub access here), a 77×768 embedding and a 1×4×16×16 latent."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64).eval()
    return {"name": "SD-1.5-sized UNet (860 M parameters, random weights)", "unet": unet,
            "scheduler": DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
            "cond": torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), "latent": (1, 4, 16, 16)}


def measure(net: dict, steps: int, repeats: int, names: tuple[str, ...]) -> dict:
    """Per-step time of each variant on ``net`` (see the module docstring), interleaved."""
    from belm import OBELM, Schedule
    from belm.adapters import eps as eps_module

    unet, cond = net["unet"], net["cond"]
    eps = eps_module.DiffusersEps(unet, net["scheduler"], encoder_hidden_states=cond)
    schedule = Schedule.from_diffusers(net["scheduler"], steps, spacing="trailing")
    sampler = OBELM(eps, schedule, progress=False)
    z = torch.randn(*net["latent"], generator=torch.Generator().manual_seed(0))
    times = [torch.tensor(schedule.timestep(n)) for n in range(steps)]

    # Time inside the UNet's forward, accumulated per run (an instance attribute shadows the
    # class's forward, so nn.Module.__call__ and its hooks stay outside the timed part).
    inner, in_forward = unet.forward, [0.0]

    def timed_forward(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        in_forward[0] += time.perf_counter() - t0
        return out

    unet.forward = timed_forward

    def bare() -> None:
        with torch.no_grad():
            for t in times:
                unet(z, t, encoder_hidden_states=cond).sample

    def floor() -> None:
        with torch.no_grad():
            older, newer = z.double(), z.double()
            for t in times:
                e = unet(newer.float(), t, encoder_hidden_states=cond).sample
                older.mul_(0.5).add_(newer, alpha=0.5).add_(e, alpha=1e-3)
                older, newer = newer, older

    walk = eps_module._model_dtype_device

    class Uncached(eps_module.DiffusersEps):
        def _model_dtype_device(self):  # the module walk on every call, as before the cache
            return walk(self.model)

    uncached = OBELM(Uncached(unet, net["scheduler"], encoder_hidden_states=cond), schedule, progress=False)
    unchecked = OBELM(eps, schedule, progress=False, check_finite=False)
    variants = {name: fn for name, fn in {"bare": bare, "floor": floor, "belm": lambda: sampler.sample(z),
                                          "belm_unchecked": lambda: unchecked.sample(z),
                                          "belm_walk": lambda: uncached.sample(z)}.items() if name in names}
    forward_s: dict[str, list[float]] = {name: [] for name in variants}

    def recording(name):
        def run() -> None:
            in_forward[0] = 0.0
            variants[name]()
            forward_s[name].append(in_forward[0])
        return run

    wall = interleaved({name: recording(name) for name in variants}, repeats)
    del unet.forward   # the class's forward again
    result = {"name": net["name"], "latent": net["latent"], "steps": steps, "repeats": repeats,
              "load": load_average(), "rows": {}}
    for name in variants:
        fwd = forward_s[name][-len(wall[name]):]   # drop the warm-up run
        result["rows"][name] = {
            "ms": 1e3 * median(wall[name]) / steps,
            "paired": paired_ratio(wall[name], wall["bare"]),
            "in_run": median([w / f for w, f in zip(wall[name], fwd)]),
            "outside_us": 1e6 * median([w - f for w, f in zip(wall[name], fwd)]) / steps,
        }
    return result


def markdown(results: list[dict]) -> str:
    labels = {
        "bare": "bare loop of N `unet(z, t, encoder_hidden_states=c)`",
        "floor": "floor: cast + 3 float64 updates per step, no checks",
        "belm": "belm O-BELM `sample` (DiffusersEps)",
        "belm_unchecked": "the same with `check_finite=False` (no NaN/Inf check per ε)",
        "belm_walk": "the same, module tree walked per call (before the cache)",
    }
    first = results[0]
    lines = [
        BEGIN, "## Per step on Stable Diffusion at batch 1 (DiffusersEps overhead)", "",
        f"_`python -m benchmarks.sd_step{' --sd15' if len(results) > 1 else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}; CPU {cpu_model()} ({os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}); load average {first['load']}. Guidance 1, float32 network, float64 state, "
        "interleaved repeats; medians. *Paired*: ÷ the bare loop of the same repeat. *In-run*: ÷ the time inside "
        "the UNet's forward during the same run (immune to the host's drift). *Outside*: time per step outside "
        "the UNet's forward._", "",
        "| network, latent, N, repeats | variant | ms/step | paired ÷ bare | in-run ÷ UNet forward | outside µs/step "
        "| target |",
        "|---|---|---|---|---|---|---|"]
    for r in results:
        where = f"{r['name']}, {'×'.join(map(str, r['latent']))}, N = {r['steps']}, {r['repeats']}"
        for name, row in r["rows"].items():
            is_target = name == "belm" and r is first
            ok = "met" if row["paired"] <= 1.01 and row["in_run"] <= 1.01 else "**not met**"
            bold = "**" if name == "belm" else ""
            lines.append(f"| {where} | {labels[name]} | {row['ms']:.3f} | {bold}{row['paired']:.4f}×{bold} | "
                         f"{bold}{row['in_run']:.4f}×{bold} | {row['outside_us']:.0f} | "
                         f"{f'≤ 1.01× ({ok})' if is_target else ''} |")
    lines += ["", "The target (issue 15) is on the tiny pipeline. The floor row is what any sampler with a float64 "
              "state spends beside the network; belm adds the finiteness check of every ε (one reduction), "
              "argument validation and its layers (sampler → network wrapper → DiffusersEps). That cost is fixed "
              "per call, so on an SD-sized network it vanishes.", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sd_step", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="sampling steps N")
    p.add_argument("--repeats", type=int, default=60, help="interleaved repeats")
    p.add_argument("--sd15", action="store_true",
                   help="also measure an SD-1.5-sized UNet (random weights; ~1 s per call, N = 10, 4 repeats)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    p.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    results = [measure(tiny_sd(), args.steps, args.repeats, ("bare", "floor", "belm", "belm_unchecked", "belm_walk"))]
    if args.sd15:
        results.append(measure(sd15_sized(), 10, 4, ("bare", "belm")))
    text = markdown(results)
    print(text)
    if args.write:
        write_section("sd_step", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

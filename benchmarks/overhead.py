"""Sampler overhead: per-step time of belm's samplers with a zero-cost ε versus diffusers' schedulers."""

from __future__ import annotations

import torch

from belm.schedule import Schedule
from belm.solvers.registry import make_sampler

import os

from .common import interleaved, md_table, median, paired_ratio, pyplot

SHAPES = [(64, 1, 16, 16), (4, 4, 64, 64)]

# (row label, registry name, kwargs); float64 state unless stated
VARIANTS = [
    ("DDIM", "ddim", {}),
    ("BDIA (γ=1)", "bdia", {}),
    ("O-BELM", "obelm", {}),
    ("O-BELM, check_finite=False", "obelm", {"check_finite": False}),
    ("O-BELM, state float32", "obelm", {"state_dtype": torch.float32}),
    ("O-BELM bitwise", "obelm", {"exact": "bitwise"}),
    ("EDICT (2 ε/step)", "edict", {}),
    ("leapfrog3 (BELM k=3)", "leapfrog3", {}),
]

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def run(device: str, quick: bool, plot_dir: str | None = None) -> tuple[str, dict]:
    from diffusers import DDIMInverseScheduler, DDIMScheduler, DPMSolverMultistepScheduler

    N = 20 if quick else 50
    repeats = 5 if quick else 15
    text = ["ε: `eps_fn = lambda x, t: eps`, a preallocated float32 tensor; the same tensor is diffusers' "
            "`model_output`. Per step = time of a whole N-step `sample(x)` / `invert(x)` (belm; includes the "
            "entry and exit casts float32 ↔ state dtype, the ε validation and the default NaN/Inf check) or "
            "of the N-step `scheduler.step` loop (diffusers), ÷ N. Ratios: median over repeats of the ratio of "
            "two neighbouring timings (variants interleaved, rotating order). belm's state is float64 by "
            "default; diffusers' is float32 (the input's dtype)."]
    figures = {}
    for shape in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(device)
        eps = torch.randn(shape, generator=g).to(device)      # preallocated: the "network" costs nothing

        ddim = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=True)
        ddim.set_timesteps(N)
        ddim_inv = DDIMInverseScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_zero=False)
        ddim_inv.set_timesteps(N)
        dpm = DPMSolverMultistepScheduler(**SD_BETAS)
        schedule = Schedule.from_diffusers(ddim, N)

        def diffusers_loop(scheduler, reset: bool = False):
            def loop():
                if reset:                      # DPM-Solver keeps a history; restart it (cost ÷ N)
                    scheduler.set_timesteps(N, device=device)
                y = x
                for t in scheduler.timesteps:
                    y = scheduler.step(eps, t, y).prev_sample
                return y
            return loop

        fns = {"diffusers DDIMScheduler.step": diffusers_loop(ddim),
               "diffusers DPMSolverMultistepScheduler.step (order 2)": diffusers_loop(dpm, reset=True),
               "diffusers DDIMInverseScheduler.step": diffusers_loop(ddim_inv)}
        samplers = {}
        for label, name, kwargs in VARIANTS:
            s = make_sampler(name, lambda x_, t_: eps, schedule, progress=False, **kwargs)
            samplers[label] = s
            fns[f"{label}|sample"] = (lambda s=s: s.sample(x))
            fns[f"{label}|invert"] = (lambda s=s: s.invert(x))
        times = interleaved(fns, repeats, device)
        base, base_inv = times["diffusers DDIMScheduler.step"], times["diffusers DDIMInverseScheduler.step"]
        rows = []
        for label in ("diffusers DDIMScheduler.step", "diffusers DPMSolverMultistepScheduler.step (order 2)"):
            rows.append([label, "float32", median(times[label]) / N * 1e6, paired_ratio(times[label], base),
                         "–", "–"])
        rows.append(["diffusers DDIMInverseScheduler.step", "float32", "–", "–",
                     median(base_inv) / N * 1e6, 1.0])
        for label, name, kwargs in VARIANTS:
            ts, ti = times[f"{label}|sample"], times[f"{label}|invert"]
            state = "int64 lattice" if kwargs.get("exact") == "bitwise" else \
                str(kwargs.get("state_dtype", torch.float64)).replace("torch.", "")
            rows.append([f"belm {label}", state, median(ts) / N * 1e6, paired_ratio(ts, base),
                         median(ti) / N * 1e6, paired_ratio(ti, base_inv)])
            figures[(shape, label)] = paired_ratio(ts, base)
        dims = "×".join(map(str, shape))
        text.append(f"**{dims}** ({x.numel():,} elements, float32 input; N = {N}; median of {repeats} "
                    "interleaved repeats)\n\n" + md_table(
                        ["stepper", "state", "sample µs/step", "× diffusers DDIM", "invert µs/step",
                         "× diffusers DDIMInverse"], rows))
    if plot_dir is not None:
        plt = pyplot()
        labels = [label for label, _, _ in VARIANTS]
        fig, ax = plt.subplots(figsize=(7.0, 4.0))
        width = 0.4
        for i, shape in enumerate(SHAPES):
            ax.barh([y + i * width for y in range(len(labels))], [figures[(shape, lb)] for lb in labels],
                    height=width, label="×".join(map(str, shape)))
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks([y + width / 2 for y in range(len(labels))], labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("sample time per step ÷ diffusers DDIMScheduler.step (zero-cost ε)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(plot_dir, f"overhead_{device}.png"), dpi=110)
        plt.close(fig)
        text.append(f"![overhead](plots/overhead_{device}.png)")
    return "\n\n".join(text), figures

"""Latent optimization through the chain (belm.apps.optimize) with reversible gradients."""

from __future__ import annotations

import pytest
import torch

from belm import EDICT, OBELM, Schedule
from belm.schedule import make_betas
from tiny_models import tiny_sd_folder  # noqa: F401  (fixture)

SD_BETAS = make_betas("scaled_linear", 1000, 0.00085, 0.012)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.lin1 = torch.nn.Linear(4, 16, dtype=torch.float64)
            self.lin2 = torch.nn.Linear(16, 4, dtype=torch.float64)

    def forward(self, x, t):
        return self.lin2(torch.tanh(self.lin1(x) + t.to(x.dtype) / 1000))


@pytest.mark.parametrize("cls", [OBELM, EDICT])
def test_optimize_latent_lowers_the_loss_and_returns_a_consistent_latent(cls):
    from belm.apps.optimize import optimize_latent
    s = cls(_MLP().requires_grad_(False), Schedule.from_betas(SD_BETAS, 10), progress=False)
    x0 = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    goal = torch.full_like(x0, 0.5)
    latent = s.invert(x0)
    losses = []
    new, out, iters = optimize_latent(s, latent, lambda x: (x - goal).square().mean(1), iters=15, lr=0.1,
                                      callback=lambda i, x, l: losses.append(float(l.sum())))
    assert iters == 15 and len(losses) == 15
    assert float((out - goal).square().mean(1).sum()) < 0.5 * losses[0]
    # The returned latent samples to the returned output (the optimizer's last iterate).
    assert torch.allclose(s.sample(new), out, rtol=0, atol=1e-12)
    assert all(not t.requires_grad for t in new.states) and all(not t.requires_grad for t in latent.states)


def test_done_samples_are_frozen_and_noisiest_only_keeps_the_rest():
    from belm.apps.optimize import optimize_latent
    s = OBELM(_MLP().requires_grad_(False), Schedule.from_betas(SD_BETAS, 8), progress=False)
    x0 = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    latent = s.invert(x0)
    # Sample 0 counts as done from the start: it keeps its latent and output exactly.
    new, out, _ = optimize_latent(s, latent, lambda x: x.square().mean(1), iters=5, lr=0.1,
                                  done=lambda x: torch.tensor([True, False]))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(new.states, latent.states))
    assert torch.allclose(out[0], x0[0], rtol=0, atol=1e-12) and not torch.allclose(out[1], x0[1])
    new, _, _ = optimize_latent(s, latent, lambda x: x.square().mean(1), iters=3, lr=0.1, states="noisiest")
    assert torch.equal(new.states[1], latent.states[1]) and not torch.equal(new.states[0], latent.states[0])


def test_optimize_latent_rejects_bad_input():
    from belm.apps.optimize import optimize_latent
    s = OBELM(_MLP(), Schedule.from_betas(SD_BETAS, 5), progress=False)
    latent = s.invert(torch.randn(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="states must be 'all' or 'noisiest'"):
        optimize_latent(s, latent, lambda x: x.sum(), states="both")
    with pytest.raises(ValueError, match="lr must be a positive number"):
        optimize_latent(s, latent, lambda x: x.sum(), lr=0)
    bitwise = OBELM(_MLP(), Schedule.from_betas(SD_BETAS, 5), progress=False, exact="bitwise")
    with pytest.raises(TypeError, match="float Latent"):
        optimize_latent(bitwise, bitwise.invert(torch.randn(1, 4, dtype=torch.float64)), lambda x: x.sum())


def test_optimize_latent_on_the_tiny_stable_diffusion_adapter(tiny_sd_folder):
    """A loss on SD latents, gradients through the text-conditioned UNet (DiffusersEps)."""
    from belm.adapters.stable_diffusion import StableDiffusion
    from belm.apps.optimize import optimize_latent
    sd = StableDiffusion.from_pretrained(tiny_sd_folder)
    eps = sd.eps(prompt="a digit", guidance_scale=1.0)
    eps.differentiable = True
    s = OBELM(eps, sd.schedule(6), progress=False)
    z0 = torch.randn(1, sd.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    first = []
    _, out, _ = optimize_latent(s, s.invert(z0), lambda z: z.square().mean(),
                                iters=5, lr=0.1, callback=lambda i, x, l: first.append(float(l)))
    assert float(out.square().mean()) < first[0]


def test_optimize_latents_digits_smoke():
    """The digits application end to end on 2 digits, few steps (the acceptance run is
    reported by the session, not asserted here: success depends on iterations)."""
    from belm.apps.models import load_model
    from belm.apps.optimize import optimize_latents
    from belm.models import digits_dataset
    model = load_model("digits")
    images, labels = digits_dataset("heldout")
    images = images[labels == 3][:2]
    result = optimize_latents(model, images, 3, 8, steps=4, iters=2, lr=0.2, penalty=5.0)
    summary = result["summary"]
    for key in ("success_rate", "mean_l2", "mean_psnr", "seconds", "edit_success_rate", "edit_mean_l2",
                "edit_mean_psnr", "edit_seconds"):
        assert key in summary
    assert result["optimized"].shape == images.shape == result["edited"].shape
    assert summary["mean_l2"] > 0 and 0 <= summary["success_rate"] <= 1
    with pytest.raises(ValueError, match="target must be a class id"):
        optimize_latents(model, images, 3, 12, steps=4, iters=1)
    with pytest.raises(ValueError, match="confidence must lie in"):
        optimize_latents(model, images, 3, 8, steps=4, iters=1, confidence=1.0)


def test_normalized_descent_moves_each_latent_by_lr():
    from belm.apps.optimize import optimize_latent
    s = OBELM(_MLP().requires_grad_(False), Schedule.from_betas(SD_BETAS, 8), progress=False)
    latent = s.invert(torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    new, _, _ = optimize_latent(s, latent, lambda x: x.sin().sum(1), iters=1, lr=0.3, optimizer="normalized")
    moved = torch.sqrt(sum((a - b).flatten(1).square().sum(1) for a, b in zip(new.states, latent.states)))
    assert torch.allclose(moved, torch.full_like(moved, 0.3), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="optimizer must be 'adam' or 'normalized'"):
        optimize_latent(s, latent, lambda x: x.sum(), optimizer="sgd")

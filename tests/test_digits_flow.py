"""The bundled rectified-flow model "digits-flow": loader, velocity function, round trip."""
import pytest
import torch

from belm import OBELM, Schedule
from belm.models import DIGITS_FLOW_PATH, NULL_CLASS, UNetVelocity, digits_dataset, load_digits_flow_unet



@pytest.fixture(scope="module")
def flow_model():
    return load_digits_flow_unet()


def test_bundle_is_small_safetensors_with_a_flow_scheduler(flow_model):
    unet, scheduler = flow_model
    files = [p for p in DIGITS_FLOW_PATH.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 8 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert scheduler.config.shift == 1.0 and scheduler.config.num_train_timesteps == 1000
    assert unet.config.num_class_embeds == NULL_CLASS + 1 and not unet.training
    sched = Schedule.from_diffusers(scheduler, num_steps=10)
    assert sched.kind == "flow" and sched.sigmas[0].item() == 1.0


class Spy(torch.nn.Module):
    """Records (batch, timestep, labels) of each call; returns x·(1 + label) so guidance is visible."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x, t, class_labels=None):
        self.calls.append((x.shape[0], t.clone(), None if class_labels is None else class_labels.clone()))
        scale = 1.0 if class_labels is None else (1.0 + class_labels.to(x.dtype)).view(-1, 1, 1, 1)
        return x * scale * self.w


def test_velocity_function_timestep_and_guidance_in_one_forward():
    spy = Spy()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    v = UNetVelocity(spy, class_labels=2, guidance_scale=3.0, null_class_labels=10)(x, torch.tensor(0.25,
                                                                                                dtype=torch.float64))
    assert len(spy.calls) == 1                                   # CFG halves batched into one call
    batch, t, labels = spy.calls[0]
    assert batch == 6 and t.dtype == torch.float32 and torch.equal(t, torch.full((6,), 250.0))
    assert labels.tolist() == [10, 10, 10, 2, 2, 2]              # unconditional half first
    xf = x.float()
    v_u, v_c = (xf * 11).double(), (xf * 3).double()          # network dtype out, combined in x's dtype
    assert v.dtype == torch.float64 and torch.equal(v, v_u + 3.0 * (v_c - v_u))
    spy.calls.clear()
    UNetVelocity(spy, class_labels=torch.tensor([1, 2, 3]))(x, 1.0)
    assert spy.calls[0][0] == 3 and spy.calls[0][2].tolist() == [1, 2, 3]


def test_velocity_function_rejects_bad_input():
    spy = Spy()
    with pytest.raises(TypeError, match="integer timestep"):
        UNetVelocity(spy)(torch.zeros(1, 1, 4, 4), torch.tensor(500))
    with pytest.raises(ValueError, match=r"σ in \[0, 1\]"):
        UNetVelocity(spy)(torch.zeros(1, 1, 4, 4), 1.5)
    with pytest.raises(ValueError, match="null_class_labels"):
        UNetVelocity(spy, class_labels=1, guidance_scale=2.0)
    with pytest.raises(ValueError, match="batch size"):
        UNetVelocity(spy, class_labels=torch.tensor([1, 2]))(torch.zeros(3, 1, 4, 4), 0.5)


def test_load_model_digits_flow_gives_velocity_and_flow_schedule():
    from belm.apps.models import load_model

    model = load_model("digits-flow")
    assert model.name == "digits-flow" and model.shape == (1, 16, 16) and model.classifier is not None
    assert model.schedule(12).kind == "flow"
    fn = model.eps(condition=3, guidance=2.0)
    assert isinstance(fn, UNetVelocity) and fn.guidance_scale == 2.0
    assert isinstance(model.eps(), UNetVelocity)


def test_round_trip_of_heldout_digits(flow_model):
    unet, scheduler = flow_model
    images, labels = digits_dataset("heldout")
    x0 = images[:4]
    fn = UNetVelocity(unet, class_labels=labels[:4], guidance_scale=2.0, null_class_labels=NULL_CLASS)
    s = OBELM(fn, Schedule.from_diffusers(scheduler, num_steps=10), progress=False)
    lat = s.invert(x0)
    # at σ = 1 the latent is noise-like, not the image
    assert (lat.x - x0).abs().mean().item() > 0.3
    assert (s.sample(lat) - x0).abs().max().item() <= 1e-5

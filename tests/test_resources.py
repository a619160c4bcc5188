"""Resources that must not grow with the problem: per-step allocations, set-up cost, derivation
time; and round-trip exactness over a sweep of step counts (issue 20).

Memory itself (peak RSS flat in N) is measured by ``python -m benchmarks.memory --in-n``,
never asserted here.
"""

import pytest
import torch

import reference as ref

from belm import EDICT, OBELM, Schedule
from belm.schedule import make_betas
from belm.solvers.registry import make_sampler


def _recording_schedule(N: int, events: list) -> Schedule:
    """A schedule whose ``model_time`` (the per-level tensors handed to eps_fn) logs "t"."""
    schedule = Schedule.from_betas(make_betas("scaled_linear", 1000, 0.00085, 0.012), N, spacing="trailing")
    plain = schedule.model_time

    def model_time(level: int) -> torch.Tensor:
        events.append("t")
        return plain(level)

    schedule.model_time = model_time
    return schedule


@pytest.mark.parametrize("make, grad", [(OBELM, None), (OBELM, "reversible"), (EDICT, None)])
def test_per_level_tensors_are_created_before_the_steps(make, grad):
    # Small tensors created one per step, between the large per-step buffers, pin the heap: peak
    # RSS grew with N (benchmarks/memory.py --in-n). All of them must exist before the 2nd step.
    events: list = []
    N = 30
    sampler = make(lambda x, t: (events.append("eps"), 0.1 * torch.tanh(x))[1], _recording_schedule(N, events),
                   progress=False)
    x = torch.randn(2, 3, requires_grad=grad is not None)
    out = sampler.sample(x, grad=grad)
    sampler.sample(sampler.invert(out.detach()))            # other loops reuse the same tensors
    if grad is not None:
        out.sum().backward()
    first_call = events.index("eps")
    assert events.count("eps") > 2 * N
    assert "t" not in events[first_call + 1:], "a per-level tensor was created inside the loop"
    assert events.count("t") == N + 1                       # one per level, once per sampler and device


# -- exactness over a sweep of step counts -------------------------------------------------------
# `belm reconstruct --steps 300` once gave 2.5e-6 where other N gave 1e-13. Not the grid: with a
# network that sees the float64 state itself every N is exact to rounding. With a float32 network
# the state is rounded to float32 before each call; the two directions' float64 states differ by
# ~1e-14, and where an element lies that close to a float32 rounding midpoint the network gets
# inputs one float32 ulp apart, whose effect (~1e-7) then propagates (~1e-6). Which N (and which
# images) hit such a midpoint is chance; exact="bitwise" removes it.
SWEEP = sorted(set(range(2, 1001, 37)) | {250, 300, 400})


def test_round_trip_exactness_over_a_sweep_of_step_counts():
    betas = make_betas("linear", 1000, 1e-4, 0.02)        # the bundled digits model's schedule
    x0 = torch.randn(4, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors: dict[str, dict[int, float]] = {"float64 network": {}, "float32 network": {}, "float32, bitwise": {}}
    for N in SWEEP:
        schedule = Schedule.from_betas(betas, N, spacing="trailing")
        for name, options in (("float64 network", {}), ("float32 network", {"model_dtype": torch.float32}),
                              ("float32, bitwise", {"model_dtype": torch.float32, "exact": "bitwise"})):
            sampler = OBELM(ref.nonlinear_eps, schedule, progress=False, **options)
            errors[name][N] = (sampler.sample(sampler.invert(x0)) - x0).abs().max().item()
    worst = {name: max(e.values()) for name, e in errors.items()}
    assert worst["float64 network"] < 1e-11, errors["float64 network"]
    assert worst["float32, bitwise"] == 0.0, errors["float32, bitwise"]
    # Where the float32 rounding lottery hits (which N: chance, and the CPU's float32 kernels) the
    # error stays at the level of one float32 rounding of the network's input, amplified.
    assert worst["float32 network"] < 1e-5, errors["float32 network"]


@pytest.mark.parametrize("kind", ["sigmas", "alphas_cumprod"])
def test_a_grid_with_near_duplicate_levels_is_refused_by_name(kind):
    # Levels one rounding unit apart: a step ~1e-16 beside steps ~0.2. O-BELM's coefficients
    # grow like (H_t / H_p)² and cancel to noise; the error names the grid, not the rule's formulas.
    import numpy as np
    if kind == "sigmas":
        schedule = Schedule.from_sigmas([1.0, 0.8, 0.6, np.nextafter(0.6, 0.0), 0.4, 0.2], kind="ve")
        names = ["sigmas", "0.6, 0.5999999999999999, 0.4"]
    else:
        ac = np.array([0.9, 0.7, 0.5, np.nextafter(0.5, 0.0), 0.3, 0.1])
        schedule = Schedule(ac, [5, 4, 3, 2, 1, 0])
        names = ["train timesteps", "3, 2, 1"]
    with pytest.raises(ValueError, match="cannot run on this grid") as info:
        OBELM(ref.nonlinear_eps, schedule)
    message = str(info.value)
    assert "num_steps = 6" in message and "duplicate levels" in message and "formulas" not in message
    for name in names:
        assert name in message
    # A wrong rule on a good grid still blames the formulas.
    from belm.solvers.relation import Relation
    good = OBELM(ref.nonlinear_eps, Schedule.from_betas(make_betas(), 6, spacing="trailing"))
    rel = good.members[1]
    with pytest.raises(ValueError, match="check the rule's formulas"):
        Relation("broken", 2, rel.a, -rel.c, good.schedule)


# -- BELM(k): bounded derivation ---------------------------------------------------------------------
@pytest.mark.parametrize("k, allow_unstable, match", [
    (4, False, "not zero-stable.*Dahlquist.*allow_unstable"),
    (5, False, "not zero-stable.*Dahlquist.*allow_unstable"),
    (5, True, "k=5: deriving.*k <= 4"),
    (12, True, "k=12: deriving.*k <= 4"),
])
def test_belm_k_refuses_before_deriving_what_it_would_refuse_or_take_minutes(monkeypatch, k, allow_unstable, match):
    # k = 5 derived for 13 minutes, k = 4 for seconds only to be refused as unstable.
    import belm.lte
    from belm import BELM
    derived = []
    monkeypatch.setattr(belm.lte, "derive_belm", lambda *a, **kw: derived.append(a) or pytest.fail("derived"))
    with pytest.raises(ValueError, match=match):
        BELM(ref.nonlinear_eps, Schedule.from_betas(make_betas(), 20, spacing="trailing"), k=k,
             allow_unstable=allow_unstable)
    assert derived == []


# -- belm sample: set-up linear in --num, grid capped ------------------------------------------------
class _CountingList(list):
    """A list that counts the elements its look-ups touch (index() scans, item reads), and stops
    the run once they exceed ``budget``."""

    touched = 0
    budget = 0

    def _touch(self, count: int) -> None:
        _CountingList.touched += count
        assert _CountingList.touched <= _CountingList.budget, "set-up work grows faster than --num"

    def index(self, value, *args):
        position = super().index(value, *args)
        self._touch(position + 1)
        return position

    def __getitem__(self, item):
        self._touch(1)
        return super().__getitem__(item)


def test_sample_setup_is_linear_in_num(monkeypatch, tmp_path):
    # 20,000 seeds took 2.6 s of set-up (seeds.index per seed: N²/2 steps), 10⁶ about 1.8 h per rank.
    # The seed and condition lists cmd_sample builds count the elements their look-ups touch.
    import belm.cli as cli
    from belm.apps import tasks
    num = 100_000
    monkeypatch.setattr(cli, "list", _CountingList, raising=False)      # cmd_sample's list(range(...))
    plain = cli._sample_conditions
    monkeypatch.setattr(cli, "_sample_conditions", lambda *a: _CountingList(plain(*a)))
    _CountingList.touched, _CountingList.budget = 0, 4 * num
    handed = {}

    class Stop(ValueError):
        pass

    def generate(model, seeds, *, condition, **kwargs):
        handed.update(seeds=seeds, condition=condition)
        raise Stop("set-up done")

    monkeypatch.setattr(tasks, "generate_batches", generate)
    code = cli.main(["sample", "--num", str(num), "--seed", "5", "--out", str(tmp_path / "o"), "--no-progress"])
    assert code != 0 and handed["seeds"][0] == 5 and len(handed["seeds"]) == num
    assert list(handed["condition"][:12]) == [s % 10 for s in range(5, 17)]
    assert len(handed["condition"]) == num and handed["condition"][-1] == (5 + num - 1) % 10


def test_sample_grid_shows_at_most_grid_images(tmp_path):
    from PIL import Image

    import belm.cli as cli
    out = tmp_path / "o"
    assert cli.main(["sample", "--num", "130", "--steps", "2", "--batch-size", "65", "--out", str(out),
                     "--no-progress"]) == 0
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert "first 100 of 130" in summary["grid"]
    with Image.open(out / "grid.png") as grid:
        # 10 rows of 10 digits of 16 px, 1 px padding, upscaled 4×: 10 × 17 + 1 = 171 px per side, × 4.
        assert grid.size == (684, 684)
    assert (out / "sample_000129.png").is_file()


def test_sample_writes_each_batch_before_sampling_the_next(monkeypatch, tmp_path):
    # All samples were held in RAM (10⁶ digits: 1 GB, SD images far more). Now one batch at a time.
    from alive_batches import AliveBatches
    from safetensors.torch import load_file

    import belm.cli as cli
    from belm.apps import tasks
    produced = AliveBatches(tasks.generate_batches)
    monkeypatch.setattr(tasks, "generate_batches", produced.wrapped)
    out = tmp_path / "o"
    assert cli.main(["sample", "--num", "130", "--steps", "2", "--batch-size", "40", "--out", str(out),
                     "--no-progress"]) == 0
    assert len(produced.copies) == 4 and produced.most_alive <= 1
    written = load_file(out / "samples.safetensors")["images"]
    assert written.shape == (130, 1, 16, 16) and written.dtype == torch.float32
    assert torch.equal(written, torch.cat(produced.copies).to(torch.float32))


@pytest.mark.parametrize("sampler, dtype, gamma, error, noted", [
    ("obelm", "float32", None, 3.7e-6, True),      # the N = 16 --steps 300 case: 2.5e-6
    ("bdia", "bfloat16", None, 1e-4, True),
    ("obelm", "float32", None, 1.9e-13, False),    # float64 rounding: nothing to explain
    ("obelm", "float64", None, 3.7e-6, False),     # a float64 network: not this cause
    ("ddim", "float32", None, 0.15, False),        # DDIM is not exact
    ("edict", "float32", None, 1e-6, False),       # EDICT's own growth (GrowthWarning)
    ("bdia", "float32", 0.5, 1e-6, False),
])
def test_reconstruct_names_the_network_precision_when_the_round_trip_exceeds_state_rounding(
        sampler, dtype, gamma, error, noted):
    import argparse
    from belm.cli import _precision_note
    note = _precision_note(argparse.Namespace(sampler=sampler, dtype=dtype, gamma=gamma), error)
    assert (note is not None) == noted
    if noted:
        assert f"{error:.2g}" in note and "--dtype float64" in note and "bitwise" in note

"""The stepping core: method identity by exact parameters, latents on disk, gradients off by default."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference as ref
from graph_nodes import Tracked
from belm import BDIA, BELM, DDIM, EDICT, OBELM, Latent, Schedule
from belm.errors import LatentMismatchError
from belm.schedule import make_betas
from belm.solvers import MultistepChain

SD_BETAS = make_betas("scaled_linear", 1000, 0.00085, 0.012)


def _x0(shape=(2, 3, 4), seed=0):
    return torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- identity -------------------------------------------------------------------------
def test_bdia_gammas_one_ulp_apart_are_different_methods():
    sched = Schedule.from_betas(SD_BETAS, 10)
    lat = BDIA(ref.nonlinear_eps, sched, gamma=0.9000001, progress=False).invert(_x0())
    with pytest.raises(LatentMismatchError, match=r"BDIA\(gamma=0.9000001\).*BDIA\(gamma=0.9000004\)"):
        BDIA(ref.nonlinear_eps, sched, gamma=0.9000004, progress=False).sample(lat)
    gamma = 0.9
    lat = BDIA(ref.nonlinear_eps, sched, gamma=gamma, progress=False).invert(_x0())
    with pytest.raises(LatentMismatchError):
        BDIA(ref.nonlinear_eps, sched, gamma=math.nextafter(gamma, 1.0), progress=False).sample(lat)


def test_edict_p_and_belm_rules_and_methods_are_identities():
    sched = Schedule.from_betas(SD_BETAS, 10)
    x0 = _x0()
    lat = EDICT(ref.nonlinear_eps, sched, p=0.93, progress=False).invert(x0)
    with pytest.raises(LatentMismatchError, match="EDICT"):
        EDICT(ref.nonlinear_eps, sched, p=math.nextafter(0.93, 1.0), progress=False).sample(lat)
    lat = BELM(ref.nonlinear_eps, sched, rule="leapfrog3", progress=False).invert(x0)
    with pytest.raises(LatentMismatchError):
        BELM(ref.nonlinear_eps, sched, rule="leapfrog3-scaled", progress=False).sample(lat)
    lat = OBELM(ref.nonlinear_eps, sched, progress=False).invert(x0)
    with pytest.raises(LatentMismatchError, match="OBELM.*BDIA"):
        BDIA(ref.nonlinear_eps, sched, progress=False).sample(lat)


def test_schedules_one_bit_apart_are_refused():
    ac = np.cumprod(1 - SD_BETAS)
    sched = Schedule(ac, [900, 500, 100])
    ac2 = ac.copy()
    ac2[500] = np.nextafter(ac2[500], 0.0)
    other = Schedule(ac2, [900, 500, 100])
    lat = OBELM(ref.nonlinear_eps, sched, progress=False).invert(_x0())
    with pytest.raises(LatentMismatchError, match="schedule"):
        OBELM(ref.nonlinear_eps, other, progress=False).sample(lat)


# -- latents on disk ------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda e, s: OBELM(e, s, progress=False),
    lambda e, s: BDIA(e, s, gamma=0.97, progress=False),
    lambda e, s: EDICT(e, s, progress=False),
    lambda e, s: BELM(e, s, rule="leapfrog3", progress=False),
    lambda e, s: OBELM(e, s, progress=False, exact="bitwise"),
    lambda e, s: DDIM(e, s, progress=False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_latents_round_trip_through_disk_bit_exactly(tmp_path, make, dtype):
    sched = Schedule.from_betas(SD_BETAS, 12)
    s = make(ref.nonlinear_eps, sched)
    x0 = _x0().to(dtype)
    lat = s.invert(x0, to_level=np.int64(1))
    path = tmp_path / "z.safetensors"
    lat.save(path)
    back = Latent.load(path)
    assert type(back) is type(lat) and back.method == lat.method and back.level == lat.level
    assert back.schedule == lat.schedule and back.dtype == lat.dtype
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(lat.states, back.states))
    assert torch.equal(s.sample(back), s.sample(lat))
    assert [p.name for p in tmp_path.iterdir()] == ["z.safetensors"]     # nothing half-written left beside


def test_a_latent_of_another_method_or_schedule_loaded_from_disk_is_refused(tmp_path):
    sched = Schedule.from_betas(SD_BETAS, 10)
    OBELM(ref.nonlinear_eps, sched, progress=False).invert(_x0()).save(tmp_path / "z.safetensors")
    lat = Latent.load(tmp_path / "z.safetensors")
    with pytest.raises(LatentMismatchError, match="OBELM"):
        BDIA(ref.nonlinear_eps, sched, progress=False).sample(lat)
    with pytest.raises(LatentMismatchError, match="schedule"):
        OBELM(ref.nonlinear_eps, Schedule.from_betas(SD_BETAS, 11), progress=False).sample(lat)


def test_latent_files_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Latent.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        Latent.load(junk)
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a belm latent"):
        Latent.load(tmp_path / "other.safetensors")
    lat = OBELM(ref.nonlinear_eps, Schedule.from_betas(SD_BETAS, 5), progress=False).invert(_x0())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lat.save(tmp_path / "no" / "such" / "z.safetensors")


# -- gradients off unless asked ---------------------------------------------------------
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4, dtype=torch.float64)

    def forward(self, x, t):
        return Tracked.apply(torch.tanh(self.lin(x)))


def _live_graph_nodes(N, grad):
    s = OBELM(_Net(), Schedule.from_betas(SD_BETAS, N), progress=False)
    seen = []
    out = s.sample(torch.randn(3, 4, dtype=torch.float64), callback=lambda e: seen.append(Tracked.live), grad=grad)
    return out, max(seen)


def test_sampling_keeps_no_graph_by_default_and_memory_does_not_grow_with_N():
    out10, live10 = _live_graph_nodes(10, None)
    out100, live100 = _live_graph_nodes(100, None)
    assert out10.grad_fn is None and not out10.requires_grad and out100.grad_fn is None
    assert live100 == live10 == 0
    lat = OBELM(_Net(), Schedule.from_betas(SD_BETAS, 10), progress=False).invert(torch.randn(3, 4).double())
    assert all(s.grad_fn is None for s in lat.states)
    # The documented switch keeps the graph: one node per network call piles up with N.
    out, live = _live_graph_nodes(10, "autograd")
    assert out.grad_fn is not None and live == 10
    del out
    assert Tracked.live == 0


def test_grad_argument_is_validated():
    s = OBELM(ref.nonlinear_eps, Schedule.from_betas(SD_BETAS, 5), progress=False)
    with pytest.raises(ValueError, match="grad must be one of"):
        s.sample(_x0(), grad="yes")


# -- levels, warnings, errors -------------------------------------------------------------
@pytest.mark.parametrize("level", [np.int64(2), np.int32(2), torch.tensor(2)])
def test_levels_accept_any_integer_type(level):
    s = OBELM(ref.nonlinear_eps, Schedule.from_betas(SD_BETAS, 6), progress=False)
    x0 = _x0()
    lat = s.invert(x0, to_level=level)
    assert lat.level == 2 and isinstance(lat.level, int)
    assert (s.sample(lat) - x0).abs().max() < 1e-12
    with pytest.warns(UserWarning, match="latent.x"):
        assert s.sample(lat.x, from_level=level).shape == x0.shape
    for bad in (2.0, True, "2", 6, -1):
        with pytest.raises(ValueError, match="to_level must be an integer level"):
            s.invert(x0, to_level=bad)


def test_sampling_the_noise_of_a_pair_alone_warns():
    s = OBELM(ref.nonlinear_eps, Schedule.from_betas(SD_BETAS, 10), progress=False)
    lat = s.invert(_x0())
    with pytest.warns(UserWarning, match="pass the latent itself"):
        s.sample(lat.x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.sample(lat)
        s.sample(lat.x.clone())                   # a tensor the user made: no warning
        d = DDIM(ref.nonlinear_eps, s.schedule, progress=False)
        d.sample(d.invert(_x0()).x)               # one state is the whole latent


def test_edict_has_no_bitwise_mode_and_says_so():
    with pytest.raises(ValueError, match="EDICT has no bitwise mode"):
        EDICT(ref.nonlinear_eps, Schedule.from_betas(SD_BETAS, 5), exact="bitwise")


def test_edict_overflow_names_the_growth():
    from belm.errors import NonFiniteError
    sched = Schedule.from_betas(SD_BETAS, 1000)
    # A network that turns an overflowed input into NaN names the level ...
    with pytest.raises(NonFiniteError, match=r"state grew to .* before level .*p\^-2N") as info:
        EDICT(lambda x, t: torch.sin(x), sched, p=0.5, progress=False).invert(_x0().float())
    assert info.value.level is not None
    # ... and one that stays bounded cannot hide the overflow either.
    with pytest.raises(NonFiniteError, match=r"overflowed to NaN/Inf during inversion.*p\^-2N"):
        EDICT(lambda x, t: torch.tanh(x), sched, p=0.5, progress=False).invert(_x0().float())


# -- the chain --------------------------------------------------------------------------
@given(N=st.integers(3, 40), to_level=st.integers(0, 2), seed=st.integers(0, 10),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_retreat_undoes_advance(N, to_level, seed, dtype):
    """The chain's two directions are exact inverses on the same states (member k both ways)."""
    s = OBELM(ref.nonlinear_eps, Schedule.from_betas(SD_BETAS, N), progress=False)
    lat = s.invert(_x0(seed=seed).to(dtype), to_level=to_level)
    chain = s.chain_from_latent(lat)
    assert isinstance(chain, MultistepChain)
    start = [t.clone() for t in chain.window()]
    for _ in range(N - to_level - 1):
        chain.advance()
    for _ in range(N - to_level - 1):
        chain.retreat()
    assert chain.lo == to_level
    for a, b in zip(chain.window(), start):
        assert (a - b).abs().max() <= 1e-11 * max(1.0, float(b.abs().max()))

"""Issue 20: latent files are checked field by field, and with a sha256 per field, before use.

Each finding of the issue gets a test that edits one field of a file written by
``Latent.save`` (with safetensors itself, as an attacker or a bad disk would) and expects
a :class:`~belm.errors.LatentFileError` naming that field, or, for what only the sampler
knows, a :class:`~belm.errors.LatentMismatchError` when sampling.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import reference as ref
from belm import OBELM, Latent, Schedule
from belm.errors import LatentFileError, LatentMismatchError, LatticeOverflowError
from belm.schedule import make_betas
from belm.solvers.bitwise import LatticeLatent

SCHEDULE = Schedule.from_betas(make_betas("scaled_linear", 1000, 0.00085, 0.012), 8, "trailing")
X0 = torch.rand(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def eps(x, t):
    return ref.nonlinear_eps(x, t).to(x.dtype)


def sampler(exact):
    return OBELM(eps, SCHEDULE, progress=False, exact=exact)


def write(path, exact="float", digest=True):
    """A latent of X0 in ``path``, as Latent.save writes it (without its sha256 record if not ``digest``)."""
    latent = sampler(exact).invert(X0)
    latent.save(path)
    if not digest:
        edit(path, drop=["sha256"])
    return latent


def read(path):
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def edit(path, tensors=None, metadata=None, drop=()):
    """Rewrite ``path`` with some fields replaced or dropped (keeping everything else as written)."""
    meta, ts = read(path)
    ts.update(tensors or {})
    meta.update(metadata or {})
    for key in drop:
        meta.pop(key, None)
        ts.pop(key, None)
    save_file(ts, str(path), metadata=meta)


def refused(path, field):
    with pytest.raises(LatentFileError, match=f"field '{field}'"):
        Latent.load(path)


@pytest.mark.parametrize("digest", [True, False])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_states_are_refused_at_load_naming_the_state(tmp_path, digest, value):
    # Before: sampling blamed the recursion ("the state grew to inf ... use O-BELM") while running O-BELM.
    path = tmp_path / "lat.safetensors"
    latent = write(path, digest=digest)
    bad = latent.states[1].clone()
    bad[1, 3] = value
    edit(path, tensors={"state_1": bad})
    refused(path, "state_1")


def test_non_finite_latents_built_in_python_are_refused_naming_the_state():
    latent = sampler("float").invert(X0)
    broken = latent.replace(states=(latent.states[0], latent.states[1] / 0))
    with pytest.raises(ValueError, match=r"latent.states\[1\] contains NaN or Inf"):
        sampler("float").sample(broken)


@pytest.mark.parametrize("exact", ["float", "bitwise"])
@pytest.mark.parametrize("shape", ["0-dim", "batch 0"])
def test_states_without_a_batch_are_refused(tmp_path, exact, shape):
    # Before: 0-dim states were broadcast (float) or IndexError; batch 0 "got None" / RuntimeError.
    path = tmp_path / "lat.safetensors"
    latent = write(path, exact, digest=False)
    cut = (lambda t: t[0, 0].clone()) if shape == "0-dim" else (lambda t: t[:0].clone())
    edit(path, tensors={f"state_{i}": cut(s) for i, s in enumerate(latent.states)})
    refused(path, "state_0")


def test_states_of_a_wrong_dtype_are_refused(tmp_path):
    path = tmp_path / "lat.safetensors"
    latent = write(path, "bitwise", digest=False)
    edit(path, tensors={"state_0": latent.states[0].to(torch.float64), "state_1": latent.states[1].to(torch.float64)})
    refused(path, "state_0")
    write(path, "float", digest=False)
    edit(path, tensors={"state_1": torch.zeros(2, 5, dtype=torch.int32)})
    refused(path, "state_1")


def test_a_residual_of_the_wrong_shape_is_refused(tmp_path):
    # Before: a residual of shape (1,) was broadcast into a finite, wrong result.
    path = tmp_path / "lat.safetensors"
    latent = write(path, "bitwise", digest=False)
    edit(path, tensors={"residual": latent.residual.reshape(-1)[:1].clone()})
    refused(path, "residual")


def test_a_residual_larger_than_the_lattice_step_is_refused(tmp_path):
    path = tmp_path / "lat.safetensors"
    latent = write(path, "bitwise", digest=False)
    edit(path, tensors={"residual": latent.residual + latent.lattice.x_scale})
    refused(path, "residual")


def test_x_bits_off_by_one_is_refused_by_the_digest(tmp_path):
    # Before: the output was off by 4.18 (x_bits cannot be derived from the other fields).
    path = tmp_path / "lat.safetensors"
    latent = write(path, "bitwise")
    edit(path, metadata={"x_bits": str(latent.lattice.x_bits - 1)})
    refused(path, "x_bits")


@pytest.mark.parametrize("field,value", [("scale", "nan"), ("scale", "inf"), ("scale", "-0x1p-3"),
                                         ("scale", "0.5"), ("x_bits", "-5000"), ("v_bits", "99"),
                                         ("x_bits", "4.5"), ("level", "-1"), ("level", "ten"),
                                         ("num_states", "0"), ("dtype", "int8"), ("schedule", "x"),
                                         ("method", "OBELM"), ("method", "")])
def test_malformed_metadata_is_refused_naming_the_field(tmp_path, field, value):
    # Before: scale="nan" gave NaN, x_bits="-5000" an OverflowError. ("0.5" is not float.hex
    # form; "OBELM" contradicts the lattice kind.)
    path = tmp_path / "lat.safetensors"
    write(path, "bitwise", digest=False)
    edit(path, metadata={field: value})
    refused(path, field)


@pytest.mark.parametrize("field", ["kind", "method", "schedule", "level", "dtype", "num_states", "x_bits",
                                   "v_bits", "scale", "state_0", "state_1"])
def test_a_missing_field_is_refused_naming_it(tmp_path, field):
    # Before: a missing key gave KeyError.
    path = tmp_path / "lat.safetensors"
    write(path, "bitwise", digest=False)
    edit(path, drop=[field])
    refused(path, field)


def test_a_missing_residual_is_refused_by_the_digest(tmp_path):
    path = tmp_path / "lat.safetensors"
    write(path, "bitwise")
    edit(path, drop=["residual"])
    refused(path, "residual")


def test_an_extra_tensor_is_refused(tmp_path):
    path = tmp_path / "lat.safetensors"
    write(path, "float", digest=False)
    edit(path, tensors={"residual": torch.zeros(2, 5, dtype=torch.float64)})
    refused(path, "residual")


@pytest.mark.parametrize("field,change", [("scale", lambda lat: (lat.scale * 2).hex()),
                                          ("v_bits", lambda lat: str(lat.lattice.v_bits - 1)),
                                          ("x_bits", lambda lat: "59")])
def test_lattice_fields_without_digest_are_checked_against_the_schedule(tmp_path, field, change):
    """What the sampler can derive (scale, v_bits, the largest x_bits) is compared when sampling."""
    path = tmp_path / "lat.safetensors"
    latent = write(path, "bitwise", digest=False)
    # (a zero residual: an x_bits finer than the residual's size is already refused at load)
    edit(path, metadata={field: change(latent)}, tensors={"residual": torch.zeros_like(latent.residual)})
    with pytest.raises(LatentMismatchError, match=f"latent.*{field}"):
        sampler("bitwise").sample(Latent.load(path))


@pytest.mark.parametrize("exact", ["float", "bitwise"])
@pytest.mark.parametrize("digest", [True, False])
def test_files_as_written_load_and_sample_back_exactly(tmp_path, exact, digest):
    """Files without the sha256 record (written before it) still load, checked field by field."""
    path = tmp_path / "lat.safetensors"
    latent = write(path, exact, digest=digest)
    loaded = Latent.load(path)
    assert type(loaded) is type(latent) and loaded.method == latent.method and loaded.level == latent.level
    assert torch.equal(sampler(exact).sample(loaded), sampler(exact).sample(latent))


def test_info_round_trips_and_is_protected_by_the_digest(tmp_path):
    path = tmp_path / "lat.safetensors"
    latent = sampler("float").invert(X0).replace(info={"guidance": "1", "condition": "a red cat"})
    latent.save(path)
    assert Latent.load(path).info == {"guidance": "1", "condition": "a red cat"}
    edit(path, metadata={"info.guidance": "3"})
    refused(path, "info.guidance")


@pytest.mark.parametrize("direction", ["invert", "sample"])
def test_bitwise_inputs_near_the_float64_limit_raise_lattice_overflow(direction):
    # Before: OverflowError ("cannot convert float infinity to integer").
    x = torch.full((1, 3), 9e307, dtype=torch.float64)
    with pytest.raises(LatticeOverflowError, match="scale the input down"):
        getattr(sampler("bitwise"), direction)(x)


# -- any single field changed: refused, or the very same result --------------------------------
def _corruptions():
    text = st.one_of(st.text(max_size=12), st.integers(-2**70, 2**70).map(str),
                     st.floats(allow_nan=True, allow_infinity=True).map(lambda f: f.hex()))
    return st.one_of(
        st.tuples(st.just("set"), text),
        st.tuples(st.just("drop"), st.none()),
        st.tuples(st.just("bump"), st.integers(-3, 3)),       # integers +-3, floats ×(1 + k·2^-52)
        st.tuples(st.just("element"), st.integers(0, 2**31)),  # one tensor element replaced
        st.tuples(st.just("reshape"), st.none()),
        st.tuples(st.just("retype"), st.sampled_from([torch.float32, torch.float64, torch.int64, torch.int32])),
    )


def _corrupt(meta, tensors, field, how, arg):
    meta, tensors = dict(meta), dict(tensors)
    if field in tensors:
        t = tensors[field]
        if how == "drop":
            del tensors[field]
        elif how == "reshape":
            tensors[field] = t.reshape(-1) if t.ndim > 1 else t.reshape(1, -1)
        elif how == "retype":
            tensors[field] = t.to(arg)
        else:
            flat = t.clone().reshape(-1)
            number = arg if isinstance(arg, int) else len(arg)
            flat[number % flat.numel()] += 1 if how in ("element", "set") else number   # bump 0: unchanged
            tensors[field] = flat.reshape(t.shape)
    else:
        value = meta.get(field, "")
        if how == "drop":
            meta.pop(field, None)
        elif how == "set":
            meta[field] = arg
        elif how == "bump" and value.lstrip("-").isdigit():
            meta[field] = str(int(value) + arg)
        elif how == "bump" and value.startswith(("0x", "-0x")):
            meta[field] = (float.fromhex(value) * (1 + arg * 2.0**-52)).hex()
        else:
            meta[field] = value + "x"
    return meta, tensors


@pytest.mark.parametrize("exact", ["float", "bitwise"])
@given(data=st.data())
def test_any_single_field_corruption_is_refused_or_harmless(tmp_path_factory, exact, data):
    path = tmp_path_factory.mktemp("lat") / "lat.safetensors"
    latent = write(path, exact)
    expected = sampler(exact).sample(latent)
    meta, tensors = read(path)
    field = data.draw(st.sampled_from(sorted(set(meta) | set(tensors))), label="field")
    how, arg = data.draw(_corruptions(), label="corruption")
    meta, tensors = _corrupt(meta, tensors, field, how, arg)
    save_file(tensors, str(path), metadata=meta)
    try:
        result = sampler(exact).sample(Latent.load(path))
    except (LatentFileError, LatentMismatchError) as err:
        assert "\n" not in str(err)
        return
    assert torch.equal(result, expected), (field, how, arg)


# -- the CLI: a latent records the conditioning of its inversion -------------------------------------
def test_cli_sample_latent_uses_the_recorded_guidance_and_condition(tmp_path, capsys):
    # Before: sample used its own --guidance 3.0 (and needed --target) where reconstruct inverted with 1.
    from safetensors.torch import load_file

    from test_cli import run
    lat = tmp_path / "lat.safetensors"
    code, _ = run(["reconstruct", "--num", "3", "--steps", "6", "--guidance", "1", "--save-latent", str(lat)],
                  tmp_path, "rec")
    assert code == 0
    info = Latent.load(lat).info
    assert float(info["guidance"]) == 1.0 and len(info["target"].split(",")) == 3      # the digits' labels
    capsys.readouterr()
    code, out = run(["sample", "--latent", str(lat), "--steps", "6"], tmp_path, "back")
    assert code == 0 and "inverted with --guidance 1" in capsys.readouterr().out
    back = load_file(out / "samples.safetensors")["images"]
    # the same bits as with the inversion's settings spelled out (test_cli: that is the exact round trip)
    code, out = run(["sample", "--latent", str(lat), "--steps", "6", "--guidance", "1", "--target", info["target"]],
                    tmp_path, "explicit")
    assert code == 0 and torch.equal(load_file(out / "samples.safetensors")["images"], back)
    # --num keeps the recorded labels of the images it keeps
    code, out = run(["sample", "--latent", str(lat), "--steps", "6", "--num", "2"], tmp_path, "two")
    assert code == 0 and torch.equal(load_file(out / "samples.safetensors")["images"], back[:2])


def test_cli_an_explicit_flag_overrides_the_record_with_a_note(tmp_path, capsys):
    from safetensors.torch import load_file

    from test_cli import run
    lat = tmp_path / "lat.safetensors"
    assert run(["reconstruct", "--num", "2", "--steps", "4", "--source", "3", "--save-latent", str(lat)],
               tmp_path, "rec")[0] == 0
    capsys.readouterr()
    code, recorded = run(["sample", "--latent", str(lat), "--steps", "4"], tmp_path, "a")
    assert code == 0 and "note" not in capsys.readouterr().err
    code, same = run(["sample", "--latent", str(lat), "--steps", "4", "--guidance", "1", "--target", "3"],
                     tmp_path, "b")
    assert code == 0 and "note" not in capsys.readouterr().err      # the same as recorded: nothing to say
    code, other = run(["sample", "--latent", str(lat), "--steps", "4", "--guidance", "3"], tmp_path, "c")
    notes = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and len(notes) == 1 and "--guidance 3.0 overrides the latent's recorded 1.0" in notes[0]
    images = {name: load_file(path / "samples.safetensors")["images"] for name, path in
              (("recorded", recorded), ("same", same), ("other", other))}
    assert torch.equal(images["recorded"], images["same"])
    assert (images["recorded"] - images["other"]).abs().max() > 0.1


def test_cli_refuses_a_bad_latent_file_in_one_line_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import belm.apps.models

    from test_cli import _one_line_error, run
    lat = tmp_path / "lat.safetensors"
    latent = write(lat, "bitwise")
    edit(lat, metadata={"x_bits": str(latent.lattice.x_bits + 1)})

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the latent file was checked")
    monkeypatch.setattr(belm.apps.models, "load_model", no_model)
    code, out = run(["sample", "--latent", str(lat), "--steps", "8"], tmp_path)
    _one_line_error(capsys, code, "--latent", "field 'x_bits'", "changed")
    assert not out.exists()

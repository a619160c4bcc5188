"""Data sets, not images: invert whole folders into latent shards, resumably, on many ranks.

A latents folder (``belm invert IMAGES… --out DIR``) holds:

- ``shard-000000.safetensors``, ``shard-000001.safetensors``, …: the inverted latents of a
  fixed run of ``shard_size`` inputs each, in the sorted order of the input paths (the
  :class:`~belm.solvers.base.Latent` file format, so ``Latent.load`` reads a shard; the
  latent's identity, the shard's number, its input paths and the sha256 record of every
  field, :meth:`~belm.solvers.base.Latent.file_parts`, are in the metadata). Each is written atomically (a temporary file in DIR, fsync, rename,
  fsync of DIR) as soon as it is done, with its JSON header in canonical order, so the same
  latents give the same bytes.
- ``dataset.json``: the settings that decide the latents (model, sampler, grid, condition,
  fit policy, shard and batch size, the input list's hash, belm's version), written first.
- ``index.json``: which input → which shard and row, the settings, each shard's file
  sha256; written atomically last, by rank 0 after every rank is done.
- ``summary.json``: this run's timing (images/s per rank); the only file that varies.

The unit of work is the shard: shard i is computed by rank i mod world size, in batches of
``batch_size`` counted from the shard's first row, so every batch, hence every bit, is the
same for any world size. A rerun skips the shards whose file carries the expected identity
and whose tensors match their recorded hash: a killed run (any rank, any instant) loses only
the shards in flight. Latents made with other settings are never mixed into DIR.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from belm._files import write_atomically

from belm.apps.models import ModelHandle
from belm.solvers.base import DIGEST_KEY, Latent

__all__ = ["IMAGE_SUFFIXES", "FIT_POLICIES", "DATASET_FORMAT", "list_images", "read_image", "ImageFiles",
           "atomic_write", "canonical_safetensors", "DatasetPlan", "invert_dataset",
           "read_index", "load_shard", "iter_latents", "sample_dataset", "shard_name", "check_folder", "check_headers",
           "inverter", "sampler_options", "input_shape", "write_index", "gather_figures",
           "PARTS_FOLDER", "part_path", "write_part", "iter_parts",
           "peak_rss_mib", "json_bytes", "SETTINGS_FILE", "INDEX_FILE", "SUMMARY_FILE"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: How an input of another size meets the model's: "none" refuses it (naming the file), "resize"
#: stretches it to the model's size, "crop" center-crops it to the model's aspect ratio, then resizes.
FIT_POLICIES = ("none", "resize", "crop")
DATASET_FORMAT = "belm-dataset/1"
SETTINGS_FILE, INDEX_FILE, SUMMARY_FILE = "dataset.json", "index.json", "summary.json"
#: inside --out of a sharded `sample`: each rank's part files, until rank 0 has assembled them
PARTS_FOLDER = ".belm-parts"
#: test-only: seconds each rank sleeps after writing a shard (lets a test SIGKILL a run mid-way)
_PAUSE_ENV = "BELM_TEST_PAUSE_AFTER_SHARD"


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.safetensors"


# -- inputs ---------------------------------------------------------------------------------
def list_images(specs: Sequence[str]) -> list[str]:
    """The input images of ``specs``, sorted and without repeats.

    Each spec is a folder (its image files, recursively), a glob pattern (``'data/*.png'``),
    an image file, or a list file (``.txt``/``.lst``: one path per line, relative to the list
    file's folder; blank lines and ``#`` comments skipped). Image files are those ending in
    :data:`IMAGE_SUFFIXES` (any case). Paths are normalised (``os.path.normpath``) and sorted
    as strings: the order, hence the shards, is the same on every rank and every machine.

    Raises:
        FileNotFoundError: a spec that names nothing; ValueError: no image at all, or a file
            of another type named directly.
    """
    found: list[str] = []

    def add_file(path: str, spec: str) -> None:
        if not path.lower().endswith(IMAGE_SUFFIXES):
            raise ValueError(f"IMAGES: {path} (from {spec}) is not a PNG, JPEG or WebP file; belm invert reads "
                             f"{', '.join(IMAGE_SUFFIXES)}")
        found.append(os.path.normpath(path))

    for spec in specs:
        if os.path.isdir(spec):
            for root, dirs, files in os.walk(spec):
                dirs.sort()
                found.extend(os.path.normpath(os.path.join(root, f)) for f in files
                             if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))
        elif os.path.isfile(spec) and spec.lower().endswith((".txt", ".lst")):
            base = os.path.dirname(spec)
            with open(spec, encoding="utf-8") as fh:
                for line in fh:
                    entry = line.strip()
                    if entry and not entry.startswith("#"):
                        path = entry if os.path.isabs(entry) else os.path.join(base, entry)
                        if not os.path.isfile(path):
                            raise FileNotFoundError(f"IMAGES: {path} (listed in {spec}) does not exist")
                        add_file(path, spec)
        elif os.path.isfile(spec):
            add_file(spec, spec)
        elif glob.has_magic(spec):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"IMAGES: the pattern {spec!r} matches no file")
            found.extend(os.path.normpath(p) for p in matches if p.lower().endswith(IMAGE_SUFFIXES))
        else:
            raise FileNotFoundError(f"IMAGES: {spec} is neither a file, a folder nor a glob pattern that matches")
    paths = sorted(set(found))
    if not paths:
        raise ValueError(f"IMAGES: no PNG, JPEG or WebP file in {' '.join(specs)}")
    return paths


def _size_refusal(path: str, size: tuple[int, int], model_size: tuple[int, int]) -> str:
    return (f"{path} is {size[0]}x{size[1]}; the model takes {model_size[0]}x{model_size[1]}: pass --fit resize "
            "(stretch) or --fit crop (center crop, then resize), or resize the images first")


def read_image(path: str, shape: Sequence[int], fit: str) -> tuple[torch.Tensor, str]:
    """One input as a (C, H, W) float32 tensor in [−1, 1] at ``shape`` = (C, H, W), and the
    sha256 of the file's bytes (recorded in the index: which exact file became which latent).

    Raises:
        ValueError: unreadable file, or (``fit="none"``) a size other than (H, W), naming both.
    """
    from PIL import Image

    from belm.adapters.images import load_image, to_tensor
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    C, H, W = (int(v) for v in shape)
    img = load_image(path)
    if C == 1:
        img = img.convert("L")   # as ModelHandle.load_images: grey first, then resized
    if img.size != (W, H):
        if fit == "none":
            raise ValueError(_size_refusal(path, img.size, (W, H)))
        if fit == "crop":
            # the largest centered window of the model's aspect ratio
            scale = min(img.width / W, img.height / H)
            cw, ch = round(W * scale), round(H * scale)
            left, top = (img.width - cw) // 2, (img.height - ch) // 2
            img = img.crop((left, top, left + cw, top + ch))
        img = img.resize((W, H), Image.BICUBIC)
    x = to_tensor(img)[0]
    return (x[:1] if C == 1 else x).to(torch.float32), digest


class ImageFiles(torch.utils.data.Dataset):
    """``paths[i]`` → (i, image (C, H, W), file sha256): what a DataLoader's workers decode."""

    def __init__(self, paths: Sequence[str], shape: Sequence[int], fit: str) -> None:
        self.paths, self.shape, self.fit = list(paths), tuple(shape), fit

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        image, digest = read_image(self.paths[i], self.shape, self.fit)
        return i, image, digest


def _collate(items: list) -> tuple[list[int], torch.Tensor, list[str]]:
    return [i for i, _, _ in items], torch.stack([x for _, x, _ in items]), [d for _, _, d in items]


# -- files ----------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a kill at any instant leaves the old file or the new
    one, never a part (:func:`belm._files.write_atomically`: a new file beside it, fsync, rename,
    fsync of the folder, mode 0o666 less the umask)."""
    def fill(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    write_atomically(path, fill, prefix=f".{Path(path).name}.tmp-")


def json_bytes(data: Any) -> bytes:
    from belm.apps.io import strict_json
    return (json.dumps(strict_json(data), indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def canonical_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file whose bytes depend only on its content: safetensors writes its metadata
    in hash-map order (different in every process), so the JSON header is rewritten with sorted
    keys (readers accept any order; the header stays padded to 8 bytes)."""
    from safetensors.torch import save
    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + n:]


def _concat(latents: Sequence[Latent]) -> Latent:
    """One latent of a shard's batches; bitwise (lattice) latents also carry a residual."""
    from belm.apps.tasks import concat_latents
    if len(latents) == 1 or latents[0].kind == "float":
        return concat_latents(latents)
    first = latents[0]
    residuals = [getattr(lat, "residual") for lat in latents]
    return first.replace(states=[torch.cat(parts) for parts in zip(*(lat.states for lat in latents))],
                         residual=None if residuals[0] is None else torch.cat(residuals))


# -- the plan -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetPlan:
    """What a latents folder holds: the sorted inputs, cut into shards of ``shard_size``, and the
    settings that decide the latents (compared, as a whole, with a folder's earlier run).

    ``settings`` must be JSON-able; it gets the input list's sha256 and belm's version added.
    """

    paths: tuple[str, ...]
    shard_size: int
    settings: dict

    @property
    def num_shards(self) -> int:
        return -(-len(self.paths) // self.shard_size)

    def rows(self, k: int) -> range:
        """The input indices of shard ``k``."""
        return range(k * self.shard_size, min(len(self.paths), (k + 1) * self.shard_size))

    def record(self) -> dict:
        """The settings as recorded in ``dataset.json`` and ``index.json``."""
        from belm._version import __version__
        listing = hashlib.sha256("\n".join(self.paths).encode()).hexdigest()
        return {"format": DATASET_FORMAT, "belm_version": __version__, "num_images": len(self.paths),
                "shard_size": self.shard_size, "inputs_sha256": listing, "settings": self.settings}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()


def _differences(old: dict, new: dict) -> str:
    flat_old = {**{k: v for k, v in old.items() if k != "settings"}, **old.get("settings", {})}
    flat_new = {**{k: v for k, v in new.items() if k != "settings"}, **new.get("settings", {})}
    keys = sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k))
    return ", ".join(f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}" for k in keys[:4]) or "format"


def check_folder(out: Path, plan: DatasetPlan) -> None:
    """Refuse, in one line, to mix into ``out`` what another run (other settings or inputs) wrote,
    and to write into a folder that is not a latents folder. Run by every rank (each decides
    from the same files, so no rank waits for another's refusal)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder; choose a folder path")
    if not out.is_dir():
        return
    record_path = out / SETTINGS_FILE
    if record_path.is_file():
        try:
            old = json.loads(record_path.read_text())
        except ValueError:
            raise ValueError(f"--out {out}: {SETTINGS_FILE} is not JSON; choose another --out") from None
        # a run that stopped before its first shard (e.g. refused an input) left nothing to mix with
        if old != json.loads(json_bytes(plan.record())) and any(out.glob("shard-*.safetensors")):
            changed = _differences(old, plan.record())
            raise ValueError(f"--out {out} holds latents made with other settings or inputs ({changed}); rerun "
                             "with the same ones to resume, or choose another --out")
        return
    foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise ValueError(f"--out {out} is not empty and is not a belm latents folder (it holds {foreign[0]}{more}); "
                         "choose an empty or new folder")


def _finished_shard(path: Path, plan: DatasetPlan, k: int, fingerprint: str) -> Optional[dict[str, str]]:
    """The metadata of shard ``k`` if its file is done: it exists, carries this plan's identity
    for shard ``k``, and passes :meth:`Latent.load`, which checks every tensor and metadata entry
    against the sha256 record that :meth:`Latent.file_parts` wrote (required here: file presence
    alone proves nothing, so a foreign, damaged or record-less file is redone). Else None."""
    if not path.is_file():
        return None
    try:
        _, meta = load_shard(path)
        paths = json.loads(meta.get("belm_paths", "null"))
    except (ValueError, OSError):
        return None
    done = (DIGEST_KEY in meta and meta.get("belm_dataset") == fingerprint and meta.get("belm_shard") == str(k)
            and paths == [plan.paths[i] for i in plan.rows(k)])
    return meta if done else None


def load_shard(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Latent, dict[str, str]]:
    """A shard's latent and its metadata (the dataset's fields start with ``belm_``)."""
    from safetensors import safe_open
    lat = Latent.load(path, device=device)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return lat, meta


# -- invert ---------------------------------------------------------------------------------
def invert_dataset(model: ModelHandle, plan: DatasetPlan, out: str | os.PathLike, *,
                   invert_fn: Callable[[torch.Tensor], Latent], batch_size: Optional[int] = None,
                   shape: Sequence[int], workers: int = 2, progress: bool = True,
                   rank: int = 0, world_size: int = 1) -> dict:
    """Invert this rank's unfinished shards of ``plan`` into ``out``; rank 0 writes the index last.

    Args:
        invert_fn: images (B, C, H, W) in [−1, 1] (on the model's device) → their latent; called
            once per batch of ``batch_size`` rows (default: a whole shard).
        shape: (C, H, W) every input is brought to (see :func:`read_image`).
        workers: DataLoader worker processes decoding images (0: in this process).

    Returns (rank 0: with every rank's figures; other ranks: their own) a dict with
    ``shards`` (total), ``computed`` / ``skipped`` (this run, all ranks), ``ranks`` (per rank:
    ``images``, ``seconds``, ``cpu_seconds`` (the rank's own process, decoding workers not
    counted), ``images_per_s``, ``peak_rss_mib``) and ``index`` (rank 0).
    """
    out = Path(out)
    fingerprint = plan.fingerprint()
    from belm.apps.sharding import shards_of_rank
    mine = shards_of_rank(plan.num_shards, rank, world_size)
    pending = [k for k in mine if _finished_shard(out / shard_name(k), plan, k, fingerprint) is None]
    check_headers([plan.paths[i] for k in pending for i in plan.rows(k)], shape, plan.settings.get("fit", "none"))
    out.mkdir(parents=True, exist_ok=True)
    record = json_bytes(plan.record())
    if rank == 0 and not ((out / SETTINGS_FILE).is_file() and (out / SETTINGS_FILE).read_bytes() == record):
        atomic_write(out / SETTINGS_FILE, record)     # new, or replacing one that has no shard yet
    for k in mine:   # what a killed run of this rank's shards left (no other rank touches them)
        for stale in out.glob(f".{shard_name(k)}.tmp-*"):
            stale.unlink(missing_ok=True)
    skipped_mine = len(mine) - len(pending)
    step = batch_size or plan.shard_size
    loader = torch.utils.data.DataLoader(
        ImageFiles(plan.paths, shape, plan.settings.get("fit", "none")),
        batch_sampler=[list(plan.rows(k)) for k in pending], num_workers=workers, collate_fn=_collate,
        persistent_workers=False)
    bar = _Progress(out, plan, enabled=progress and rank == 0)
    t0, cpu0, images_done = time.perf_counter(), time.process_time(), 0
    pause = float(os.environ.get(_PAUSE_ENV, "0") or 0)
    for k, (rows, images, digests) in zip(pending, _reraised(loader)):
        assert rows == list(plan.rows(k))
        parts = [invert_fn(images[i:i + step].to(model.unet.device)) for i in range(0, len(rows), step)]
        latent = _concat(parts)
        tensors, metadata = latent.file_parts(extra=dict(
            belm_dataset=fingerprint, belm_shard=str(k), belm_paths=json.dumps([plan.paths[i] for i in rows]),
            belm_inputs_sha256=json.dumps(digests)))
        atomic_write(out / shard_name(k), canonical_safetensors(tensors, metadata))
        images_done += len(rows)
        bar.update()
        if pause:
            time.sleep(pause)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    mine_figures = {"rank": rank, "images": images_done, "seconds": seconds, "cpu_seconds": cpu_seconds,
                    "images_per_s": images_done / seconds if seconds > 0 and images_done else None,
                    "peak_rss_mib": peak_rss_mib(), "computed": len(pending), "skipped": skipped_mine}
    ranks = gather_figures(mine_figures, world_size)
    bar.close()
    result = {"shards": plan.num_shards, "computed": sum(r["computed"] for r in ranks),
              "skipped": sum(r["skipped"] for r in ranks), "ranks": ranks}
    if rank == 0:
        index = write_index(out, plan)
        result["index"] = str(out / INDEX_FILE)
        result["num_images"] = len(index["images"])
    return result


def check_headers(paths: Sequence[str], shape: Sequence[int], fit: str) -> None:
    """Open every input's header (not its pixels) before any work: an unreadable file, or with
    ``fit="none"`` a size other than the model's, is refused here, in one line naming it, rather
    than in a decoding worker half-way through the run."""
    from PIL import Image, UnidentifiedImageError
    H, W = int(shape[1]), int(shape[2])
    for path in paths:
        try:
            with Image.open(path) as im:
                size = im.size
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"IMAGES: cannot read {path}: {exc}") from None
        if fit == "none" and size != (W, H):
            raise ValueError("IMAGES: " + _size_refusal(path, size, (W, H)))


def _reraised(loader):
    """The loader's batches; a worker's error comes back as its own one-line message (the
    DataLoader wraps it in a multi-line traceback)."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (ValueError, OSError) as exc:     # unreadable or vanished input
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            raise ValueError(lines[-1].split(": ", 1)[-1] if len(lines) > 1 else str(exc)) from None
        yield batch


def input_shape(model: ModelHandle) -> tuple[int, int, int]:
    """(C, H, W) in pixels every input is brought to: the model's own size."""
    return tuple(int(v) for v in model.shape)  # type: ignore[return-value]


def inverter(model: ModelHandle, settings: dict) -> Callable[[torch.Tensor], Latent]:
    """images (B, C, H, W) in [−1, 1] → their latent, with the plan's sampler, grid, condition,
    guidance, freeze level and exactness mode."""
    from belm.apps.tasks import _sampler
    condition = model.parse_condition(settings.get("source"), "--source")

    def invert(images: torch.Tensor) -> Latent:
        s = _sampler(model, settings["sampler"], settings["steps"], condition, settings["guidance"], False,
                     settings.get("spacing"), sampler_options(settings), images.shape[-2:])
        return s.invert(model.encode(images), to_level=settings.get("freeze") or 0)
    return invert


def sampler_options(settings: dict) -> dict:
    """The sampler keywords of a plan's settings (BDIA's gamma, EDICT's p, bitwise mode)."""
    options = {k: settings[k] for k in ("gamma", "p") if settings.get(k) is not None}
    if settings.get("exact", "float") != "float":
        options["exact"] = settings["exact"]
    return options


def peak_rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def gather_figures(item: dict, world_size: int) -> list[dict]:
    """Every rank's small dict of figures on every rank (after a barrier: all shards are written)."""
    if world_size <= 1:
        return [item]
    import torch.distributed as dist
    parts: list = [None] * world_size
    dist.all_gather_object(parts, item)
    return sorted(parts, key=lambda r: r["rank"])


def write_index(out: Path, plan: DatasetPlan) -> dict:
    """Check every shard (identity, content hash) and write ``index.json`` atomically.

    Raises:
        ValueError: a shard is missing or not this plan's (a rank failed): rerun to resume.
    """
    fingerprint = plan.fingerprint()
    images, shards = [], []
    for k in range(plan.num_shards):
        path = out / shard_name(k)
        meta = _finished_shard(path, plan, k, fingerprint)
        if meta is None:
            raise ValueError(f"--out {out}: {shard_name(k)} is missing or incomplete after the run; rerun the same "
                             "command to resume")
        digests = json.loads(meta["belm_inputs_sha256"])
        for row, (i, digest) in enumerate(zip(plan.rows(k), digests)):
            images.append({"path": plan.paths[i], "shard": k, "row": row, "sha256": digest})
        shards.append({"file": shard_name(k), "first": plan.rows(k).start, "count": len(plan.rows(k)),
                       "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    index = {**plan.record(), "fingerprint": fingerprint, "images": images, "shards": shards}
    atomic_write(out / INDEX_FILE, json_bytes(index))
    return index


class _Progress:
    """One bar on rank 0 over the whole data set: it counts the shard files in the folder (every
    rank's, on a shared file system), so images/s and the ETA are the job's, not rank 0's."""

    def __init__(self, out: Path, plan: DatasetPlan, enabled: bool) -> None:
        self.out, self.plan, self.bar = out, plan, None
        if enabled:
            from tqdm.auto import tqdm
            self.start = self._done()
            self.bar = tqdm(total=len(plan.paths), initial=self._images(self.start), unit="img", file=sys.stderr,
                            desc="invert", dynamic_ncols=True)
            self._postfix(self.start)

    def _done(self) -> int:
        return sum(1 for k in range(self.plan.num_shards) if (self.out / shard_name(k)).is_file())

    def _images(self, shards: int) -> int:
        return min(len(self.plan.paths), shards * self.plan.shard_size)

    def _postfix(self, done: int) -> None:
        self.bar.set_postfix_str(f"shards {done}/{self.plan.num_shards}")

    def update(self) -> None:
        if self.bar is not None:
            done = self._done()
            self.bar.n = self._images(done)
            self._postfix(done)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.update()
            self.bar.close()


# -- reading a latents folder back -------------------------------------------------------------
def read_index(folder: str | os.PathLike) -> dict:
    """``index.json`` of a latents folder, every field checked before use.

    Raises:
        FileNotFoundError: no folder or no index (an unfinished run: rerun ``belm invert``).
        ValueError: a field is missing or malformed (named), or a shard's file does not match
            its recorded sha256.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--latents {folder}: no such folder; pass the --out folder of belm invert")
    path = folder / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--latents {folder}: no {INDEX_FILE} (not a latents folder, or belm invert did not "
                                "finish: rerun it to resume)")
    try:
        index = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"--latents {folder}: {INDEX_FILE} is not JSON ({exc})") from None
    found = index.get("format") if isinstance(index, dict) else None
    if found != DATASET_FORMAT:
        raise ValueError(f"--latents {folder}: {INDEX_FILE} has format {found!r}, expected {DATASET_FORMAT!r}")
    for key, kind in (("settings", dict), ("images", list), ("shards", list), ("num_images", int),
                      ("shard_size", int)):
        if not isinstance(index.get(key), kind):
            raise ValueError(f"--latents {folder}: {INDEX_FILE} field {key!r} is missing or not a {kind.__name__}")
    if len(index["images"]) != index["num_images"] or index["num_images"] < 1:
        raise ValueError(f"--latents {folder}: {INDEX_FILE} lists {len(index['images'])} images, num_images says "
                         f"{index['num_images']}")
    first = 0
    for k, shard in enumerate(index["shards"]):
        if not isinstance(shard, dict) or shard.get("file") != shard_name(k) or shard.get("first") != first \
                or not isinstance(shard.get("count"), int) or shard["count"] < 1 \
                or not isinstance(shard.get("sha256"), str):
            raise ValueError(f"--latents {folder}: {INDEX_FILE} field shards[{k}] is malformed")
        first += shard["count"]
    for i, entry in enumerate(index["images"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) \
                or not isinstance(entry.get("shard"), int) or not 0 <= entry["shard"] < len(index["shards"]) \
                or not isinstance(entry.get("row"), int) or not isinstance(entry.get("sha256"), str) \
                or index["shards"][entry["shard"]]["first"] + entry["row"] != i:
            raise ValueError(f"--latents {folder}: {INDEX_FILE} field images[{i}] is malformed")
    if first != index["num_images"]:
        raise ValueError(f"--latents {folder}: the shards hold {first} images, num_images says {index['num_images']}")
    return index


def iter_latents(folder: str | os.PathLike, index: dict, shards: Optional[Sequence[int]] = None,
                 device: str | torch.device = "cpu"):
    """Yield (shard number, its latent) for ``shards`` (default: all), each file checked against
    the sha256 the index records before it is read."""
    folder = Path(folder)
    for k in range(len(index["shards"])) if shards is None else shards:
        entry = index["shards"][k]
        path = folder / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"--latents {folder}: {entry['file']} is missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            raise ValueError(f"--latents {folder}: {entry['file']} does not match the sha256 in {INDEX_FILE} "
                             "(changed or damaged since belm invert wrote it)")
        lat, _ = load_shard(path, device=device)
        if lat.states[0].shape[0] != entry["count"]:
            raise ValueError(f"--latents {folder}: {entry['file']} holds {lat.states[0].shape[0]} images, the index "
                             f"says {entry['count']}")
        yield k, lat


def sample_dataset(index: dict, folder: str | os.PathLike, parts: str | os.PathLike, *,
                   sample_fn: Callable[[Latent], torch.Tensor], rank: int = 0, world_size: int = 1) -> list[int]:
    """Sample this rank's shards of a latents folder into ``parts`` (one atomically written
    ``part-K.safetensors`` of images per shard; finished parts are kept, so a rerun resumes).
    Returns the shards this rank computed."""
    from belm.apps.sharding import shards_of_rank
    mine = shards_of_rank(len(index["shards"]), rank, world_size)
    todo = [k for k in mine if not _part_is_done(part_path(parts, k), index, k)]
    for k, lat in iter_latents(folder, index, todo):
        write_part(parts, k, sample_fn(lat), {"shard_sha256": index["shards"][k]["sha256"]})
    return todo


def part_path(parts: str | os.PathLike, k: int) -> Path:
    """Where part ``k`` (the images of one shard, or of one batch of seeds) lives in ``parts``."""
    return Path(parts) / f"part-{k:06d}.safetensors"


def write_part(parts: str | os.PathLike, k: int, images: torch.Tensor,
               metadata: Optional[dict[str, str]] = None) -> None:
    """Write ``images`` (b, C, H, W; stored as float32 on the CPU) as part ``k`` in ``parts``,
    atomically: a reader (or a rerun checking what is done) sees the whole part or none."""
    from safetensors.torch import save
    images = images.detach().to(device="cpu", dtype=torch.float32).contiguous()
    Path(parts).mkdir(parents=True, exist_ok=True)
    atomic_write(part_path(parts, k), save({"images": images}, metadata=metadata))


def iter_parts(parts: str | os.PathLike, ks: Sequence[int], counts: Optional[Sequence[int]] = None):
    """Yield the images (b, C, H, W) float32 of parts ``ks`` in that order, one part read at a
    time (the caller writes each out before the next is read, so memory holds one part).

    Raises:
        FileNotFoundError: a part is missing.
        ValueError: part ``ks[i]`` does not hold ``counts[i]`` images (a rank wrote another batch).
    """
    from safetensors.torch import load_file
    for i, k in enumerate(ks):
        path = part_path(parts, k)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the rank that computes part {k} did not write it")
        images = load_file(str(path))["images"]
        if counts is not None and images.shape[0] != counts[i]:
            raise ValueError(f"{path} holds {images.shape[0]} images; {counts[i]} expected")
        yield images


def _part_is_done(path: Path, index: dict, k: int) -> bool:
    from safetensors import safe_open
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("shard_sha256") == index["shards"][k]["sha256"] \
                and f.get_slice("images").get_shape()[0] == index["shards"][k]["count"]
    except Exception:  # noqa: BLE001 - a damaged part is recomputed
        return False

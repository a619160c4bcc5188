"""Tiny diffusers models built from configs in milliseconds (no hub, no downloads).

- :func:`tiny_unet`: a pixel ``UNet2DModel`` (3×8×8) and an SD-like ``DDIMScheduler``.
- :func:`tiny_sd_pipeline`: a saved tiny ``StableDiffusionPipeline`` folder
  (UNet2DConditionModel, AutoencoderKL with factor 2, 2-layer CLIPTextModel, a
  CLIPTokenizer over a locally written byte-level vocabulary, DDIMScheduler).
- :func:`tiny_sd_folder`: session-scoped pytest fixture returning that folder (built once
  per session, under the session's base temp dir, shared by every test module);
  :func:`tiny_sd_folder_v`: the same with a v-prediction scheduler.

Import from tests as ``from tiny_models import tiny_unet, tiny_sd_pipeline, tiny_sd_folder``
(pytest puts ``tests/`` on sys.path). Weights are initialised under a fixed seed
inside ``torch.random.fork_rng`` so the global RNG is untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

__all__ = ["sd_scheduler", "tiny_unet", "tiny_tokenizer_files", "tiny_sd_pipeline", "tiny_sd_folder",
           "tiny_sd_folder_v"]

SEED = 0


def sd_scheduler(prediction_type: str = "epsilon"):
    """A DDIMScheduler with Stable Diffusion's training schedule (scaled_linear 0.00085..0.012, T = 1000)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, prediction_type=prediction_type)


def tiny_unet(prediction_type: str = "epsilon", class_conditional: bool = False, *, seed: int = SEED):
    """(UNet2DModel, DDIMScheduler): 3 channels, 8×8, blocks (8, 16), one attention block.

    ``class_conditional``: adds ``num_class_embeds=10`` (labels 0..9), so the model takes
    ``class_labels``. The scheduler carries ``prediction_type``.
    """
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(
            sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            num_class_embeds=10 if class_conditional else None,
        )
    unet.eval()
    return unet, sd_scheduler(prediction_type)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character map (256 entries)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_tokenizer_files(folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write a byte-level CLIP vocabulary (514 tokens) and an empty merges file.

    Tokens: the 256 byte characters (ids 0..255), the same with ``</w>`` (ids 256..511),
    ``<|startoftext|>`` = 512 and ``<|endoftext|>`` = 513. With no merges every word
    becomes one token per byte (the last one with ``</w>``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = [_bytes_to_unicode()[b] for b in range(256)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n", encoding="utf-8")
    return vocab_file, merges_file


def tiny_sd_pipeline(tmpdir: str | os.PathLike, prediction_type: str = "epsilon", *, seed: int = SEED) -> Path:
    """Build, save (safetensors) and return the folder of a tiny StableDiffusionPipeline.

    The folder is ``tmpdir / f"tiny_sd_{prediction_type}"``; if it already holds a saved
    pipeline it is reused. Components:

    - UNet2DConditionModel: 4 latent channels, sample_size 8, blocks (16, 32),
      CrossAttnDownBlock2D + DownBlock2D, cross_attention_dim 32, 2 heads.
    - AutoencoderKL: blocks (8, 16) -> VAE factor 2, latent_channels 4, scaling 0.18215.
    - CLIPTextModel: hidden 32, 2 layers, 2 heads, 77 positions, vocab 514.
    - CLIPTokenizer from :func:`tiny_tokenizer_files` (model_max_length 77).
    - DDIMScheduler with SD's schedule (:func:`sd_scheduler`).
    """
    folder = Path(tmpdir) / f"tiny_sd_{prediction_type}"
    if (folder / "model_index.json").is_file():
        return folder
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_file, merges_file = tiny_tokenizer_files(Path(tmpdir) / "tiny_tokenizer_src")
    tokenizer = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=77)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, norm_num_groups=8, attention_head_dim=2,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=8, sample_size=16,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=sd_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    os.replace(tmp, folder)  # atomic: a half-written folder is never mistaken for a pipeline
    return folder


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the tiny epsilon-prediction SD pipeline, built once per test session."""
    return tiny_sd_pipeline(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def tiny_sd_folder_v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the tiny v-prediction SD pipeline (same weights), built once per test session."""
    return tiny_sd_pipeline(tmp_path_factory.getbasetemp(), "v_prediction")

"""Tiny diffusers models built from configs in milliseconds (no hub, no downloads).

- :func:`tiny_unet`: a pixel ``UNet2DModel`` (3×8×8) and an SD-like ``DDIMScheduler``.
- :func:`tiny_sd_pipeline`: a saved tiny ``StableDiffusionPipeline`` folder
  (UNet2DConditionModel, AutoencoderKL with factor 2, 2-layer CLIPTextModel, a
  CLIPTokenizer over a locally written byte-level vocabulary, DDIMScheduler).
- :func:`tiny_sd_folder`: session-scoped pytest fixture returning that folder (built once
  per session, under the session's base temp dir, shared by every test module);
  :func:`tiny_sd_folder_v`: the same with a v-prediction scheduler.
- :func:`tiny_sd3_pipeline`, :func:`tiny_flux_pipeline`, :func:`tiny_sdxl_pipeline`: saved
  tiny StableDiffusion3Pipeline / FluxPipeline / StableDiffusionXLPipeline folders (CLIP
  tokenizers over the local byte vocabulary, a T5 tokenizer built in memory from a
  character vocabulary); fixtures :func:`tiny_sd3_folder`, :func:`tiny_flux_folder`,
  :func:`tiny_sdxl_folder`.
- :func:`tiny_kandinsky22_img2img`, :func:`tiny_animatediff_video2video`: in-memory
  ``KandinskyV22Img2ImgPipeline`` / ``AnimateDiffVideoToVideoPipeline`` from the tiny
  configs of diffusers' own pipeline tests (the latter with the byte-level CLIP tokenizer).

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
           "tiny_sd_folder_v", "tiny_clip_tokenizer", "tiny_t5_tokenizer", "tiny_sd3_pipeline",
           "tiny_flux_pipeline", "tiny_sdxl_pipeline", "tiny_sd3_folder", "tiny_flux_folder", "tiny_sdxl_folder",
           "tiny_kandinsky22_img2img", "tiny_animatediff_video2video"]

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


# -- flow transformers (SD3, FLUX) and SDXL ------------------------------------------------

def tiny_clip_tokenizer(tmpdir: str | os.PathLike, model_max_length: int = 77):
    """A CLIPTokenizer over the byte-level vocabulary of :func:`tiny_tokenizer_files`."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = tiny_tokenizer_files(Path(tmpdir) / "tiny_tokenizer_src")
    return CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 32):
    """A T5 tokenizer (Unigram, built in memory with the ``tokenizers`` library, no files).

    Vocabulary: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, the word-start marker ``▁``
    and the printable ASCII characters (one token each, equal scores), so every prompt
    tokenizes character by character and ends with ``</s>``.
    """
    from transformers import T5Tokenizer

    chars = ["▁"] + [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _tiny_clip_encoder(tokenizer, with_projection: bool, hidden_size: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _tiny_t5_encoder(tokenizer, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _tiny_vae(latent_channels: int, shift_factor: float | None, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=16, shift_factor=shift_factor,
        scaling_factor=scaling_factor, use_quant_conv=shift_factor is None,
        use_post_quant_conv=shift_factor is None)


def _save(pipe, folder: Path) -> Path:
    tmp = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    os.replace(tmp, folder)  # atomic: a half-written folder is never mistaken for a pipeline
    return folder


def tiny_sd3_pipeline(tmpdir: str | os.PathLike, *, seed: int = SEED) -> Path:
    """Build, save (safetensors) and return the folder of a tiny StableDiffusion3Pipeline.

    ``tmpdir / "tiny_sd3"`` (reused if present). Components:

    - SD3Transformer2DModel: 4 latent channels, patch 1, 1 joint layer, 2 heads of 8,
      joint_attention_dim 32, pooled_projection_dim 64, sample_size 8.
    - AutoencoderKL: factor 2, 4 latent channels, SD3-style shift_factor 0.0609 and
      scaling_factor 1.5035, no quant convs.
    - two CLIPTextModelWithProjection (hidden 32) + byte-level CLIP tokenizers,
      a T5EncoderModel (d_model 32) + an in-memory Unigram T5 tokenizer.
    - FlowMatchEulerDiscreteScheduler(shift=3.0), SD3's.
    """
    folder = Path(tmpdir) / "tiny_sd3"
    if (folder / "model_index.json").is_file():
        return folder
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(tmpdir), tiny_clip_tokenizer(tmpdir)
    tokenizer_3 = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=64,
            pos_embed_max_size=16)
        vae = _tiny_vae(4, shift_factor=0.0609, scaling_factor=1.5035)
        text_encoder = _tiny_clip_encoder(tokenizer, True)
        text_encoder_2 = _tiny_clip_encoder(tokenizer_2, True)
        text_encoder_3 = _tiny_t5_encoder(tokenizer_3)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    return _save(pipe, folder)


def tiny_flux_pipeline(tmpdir: str | os.PathLike, *, guidance_embeds: bool = True, seed: int = SEED) -> Path:
    """Build, save (safetensors) and return the folder of a tiny FluxPipeline.

    ``tmpdir / "tiny_flux"`` (``"tiny_flux_schnell"`` without the guidance embedding;
    reused if present). Components:

    - FluxTransformer2DModel: in_channels 16 (4 latent channels packed 2×2), 1 double and
      1 single block, 2 heads of 16, rope axes (4, 4, 8), joint_attention_dim 32,
      pooled_projection_dim 32, ``guidance_embeds`` as given (FLUX.1-dev style: True).
    - AutoencoderKL: factor 2, 4 latent channels, FLUX-style shift_factor 0.1159,
      scaling_factor 0.3611, no quant convs.
    - CLIPTextModel (hidden 32) + byte-level CLIP tokenizer; T5EncoderModel (d_model 32)
      + an in-memory Unigram T5 tokenizer.
    - FlowMatchEulerDiscreteScheduler with FLUX's dynamic shifting (base 0.5, max 1.15,
      sequence lengths 256..4096, shift 3.0).
    """
    folder = Path(tmpdir) / ("tiny_flux" if guidance_embeds else "tiny_flux_schnell")
    if (folder / "model_index.json").is_file():
        return folder
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(tmpdir), tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8))
        vae = _tiny_vae(4, shift_factor=0.1159, scaling_factor=0.3611)
        text_encoder = _tiny_clip_encoder(tokenizer, False)
        text_encoder_2 = _tiny_t5_encoder(tokenizer_2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    return _save(pipe, folder)


def tiny_sdxl_pipeline(tmpdir: str | os.PathLike, *, seed: int = SEED) -> Path:
    """Build, save (safetensors) and return the folder of a tiny StableDiffusionXLPipeline.

    ``tmpdir / "tiny_sdxl"`` (reused if present). Components:

    - UNet2DConditionModel with SDXL's added conditioning (addition_embed_type "text_time",
      addition_time_embed_dim 8, projection_class_embeddings_input_dim 32 + 6·8 = 80),
      cross_attention_dim 64 (the two encoders' hidden states concatenated).
    - AutoencoderKL: factor 2, 4 latent channels, scaling 0.13025.
    - CLIPTextModel + CLIPTextModelWithProjection (hidden 32), byte-level CLIP tokenizers.
    - SD's DDIMScheduler (:func:`sd_scheduler`), epsilon prediction.
    """
    folder = Path(tmpdir) / "tiny_sdxl"
    if (folder / "model_index.json").is_file():
        return folder
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(tmpdir), tiny_clip_tokenizer(tmpdir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, norm_num_groups=8,
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=80)
        vae = _tiny_vae(4, shift_factor=None, scaling_factor=0.13025)
        text_encoder = _tiny_clip_encoder(tokenizer, False)
        text_encoder_2 = _tiny_clip_encoder(tokenizer_2, True)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=sd_scheduler(), force_zeros_for_empty_prompt=True,
        add_watermarker=False)
    return _save(pipe, folder)


@pytest.fixture(scope="session")
def tiny_sd3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the tiny SD3 pipeline, built once per test session."""
    return tiny_sd3_pipeline(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def tiny_flux_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the tiny FLUX pipeline (with the guidance embedding), built once per test session."""
    return tiny_flux_pipeline(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the tiny SDXL pipeline, built once per test session."""
    return tiny_sdxl_pipeline(tmp_path_factory.getbasetemp())


# -- pipelines that slice their timesteps (img2img, video-to-video) -------------------------

def tiny_kandinsky22_img2img(*, seed: int = SEED):
    """An in-memory ``KandinskyV22Img2ImgPipeline`` (the components of diffusers' own fast test).

    - UNet2DConditionModel with image conditioning (addition_embed_type "image",
      encoder_hid_dim_type "image_proj", image embeddings of 32), blocks (32, 64), 4 latent
      channels in, 8 out (ε and a learned variance, which the pipeline drops).
    - VQModel ("movq"): blocks (32, 64) -> factor 2, 4 latent channels, spatial norm.
    - DDIMScheduler: linear betas 0.00085..0.012, set_alpha_to_one False, steps_offset 0.

    Call it with ``image_embeds``/``negative_image_embeds`` of shape (1, 32) and a 16×16 image.
    """
    from diffusers import DDIMScheduler, KandinskyV22Img2ImgPipeline, UNet2DConditionModel, VQModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            in_channels=4, out_channels=8, addition_embed_type="image",
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
            encoder_hid_dim=32, encoder_hid_dim_type="image_proj", cross_attention_dim=32, attention_head_dim=4,
            resnet_time_scale_shift="scale_shift", class_embed_type=None)
        movq = VQModel(
            block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
            in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
            num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
            vq_embed_dim=4)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=0, prediction_type="epsilon",
                              thresholding=False)
    pipe = KandinskyV22Img2ImgPipeline(unet=unet, scheduler=scheduler, movq=movq)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_animatediff_video2video(tmpdir: str | os.PathLike, *, seed: int = SEED):
    """An in-memory ``AnimateDiffVideoToVideoPipeline`` (diffusers' fast-test configs).

    UNet2DConditionModel and MotionAdapter with blocks (8, 8), cross_attention_dim 8,
    AutoencoderKL (factor 2), a 2-layer CLIPTextModel (hidden 8) over the byte-level
    tokenizer of :func:`tiny_clip_tokenizer`, DDIMScheduler (linear 0.00085..0.012).
    """
    from diffusers import AnimateDiffVideoToVideoPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter, \
        UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer(tmpdir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(8, 8), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=8, norm_num_groups=2)
        vae = AutoencoderKL(
            block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"])
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=8, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
        motion_adapter = MotionAdapter(block_out_channels=(8, 8), motion_layers_per_block=2,
                                       motion_norm_num_groups=2, motion_num_attention_heads=4)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False)
    pipe = AnimateDiffVideoToVideoPipeline(
        unet=unet, motion_adapter=motion_adapter, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=scheduler, feature_extractor=None, image_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe

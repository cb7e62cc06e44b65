"""Load each model stage for a `ModelConfig`: built in code (tiny) or from a local folder.

Stages load separately (the text encoder, DiT and VAE run on different replicas), so each
loader takes only the config and returns only its part. A local folder is checked as a
whole first, and a missing or incomplete one is one error that lists everything missing.
With a `SimulationConfig` each loader returns the stage's simulated stand-in instead
(serving/simulate/): the one place where real and simulated compute part ways.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from serving.config import ModelConfig, SimulationConfig
from serving.models import tiny
from serving.models.presets import PRESETS, Preset


class ModelFolderError(Exception):
    """The configured model folder is missing or does not have the diffusers layout."""


# What a diffusers-format Wan2.1 folder holds; each entry is (what, acceptable alternatives).
EXPECTED_LAYOUT: list[tuple[str, tuple[str, ...]]] = [
    ("model_index.json", ("model_index.json",)),
    ("scheduler config", ("scheduler/scheduler_config.json",)),
    ("tokenizer", ("tokenizer/tokenizer_config.json", "tokenizer/tokenizer.json", "tokenizer/spiece.model")),
    ("text encoder config", ("text_encoder/config.json",)),
    ("text encoder weights", ("text_encoder/model.safetensors", "text_encoder/model.safetensors.index.json")),
    ("transformer config", ("transformer/config.json",)),
    ("transformer weights", ("transformer/diffusion_pytorch_model.safetensors",
                             "transformer/diffusion_pytorch_model.safetensors.index.json")),
    ("VAE config", ("vae/config.json",)),
    ("VAE weights", ("vae/diffusion_pytorch_model.safetensors",)),
]
# What an image-to-video folder holds besides (WanImageToVideoPipeline's layout).
IMAGE_LAYOUT: list[tuple[str, tuple[str, ...]]] = [
    ("image encoder config", ("image_encoder/config.json",)),
    ("image encoder weights", ("image_encoder/model.safetensors", "image_encoder/model.safetensors.index.json")),
    ("image processor config", ("image_processor/preprocessor_config.json",)),
]


def preset_of(cfg: ModelConfig) -> Preset:
    return PRESETS[cfg.preset]


def check_model_folder(cfg: ModelConfig) -> Path | None:
    """Return the folder to load from (None for presets built in code), or raise ModelFolderError."""
    preset = preset_of(cfg)
    if cfg.path is None and preset.bundled is not None:
        folder = Path(__file__).parent / preset.bundled
        if not folder.is_dir():
            raise ModelFolderError(f"the {preset.name!r} weights shipped with ditserve are missing from "
                                   f"{str(folder)!r}; reinstall the package or rebuild them with `ditserve train-tiny`")
        return _complete(folder, preset)
    if cfg.path is None:
        if preset.needs_folder:
            raise ModelFolderError(
                f"model.preset {preset.name!r} loads from a local folder, but model.path is not set; "
                "point it at a diffusers-format Wan2.1 folder (nothing is downloaded)"
            )
        return None
    folder = Path(cfg.path).expanduser()
    if not folder.is_dir():
        raise ModelFolderError(f"model.path {str(folder)!r} does not exist or is not a folder")
    return _complete(folder, preset)


def _complete(folder: Path, preset: Preset) -> Path:
    layout = EXPECTED_LAYOUT + (IMAGE_LAYOUT if preset.takes_image else [])
    missing = [
        f"{what} ({' or '.join(options)})"
        for what, options in layout
        if not any((folder / option).is_file() for option in options)
    ]
    if missing:
        raise ModelFolderError(
            f"model folder {str(folder)!r} is incomplete (expected the diffusers layout); missing: " + "; ".join(missing)
        )
    return folder


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ModelFolderError("model.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(cfg.device)


def resolve_dtype(cfg: ModelConfig) -> torch.dtype:
    name = preset_of(cfg).dtype if cfg.dtype == "auto" else cfg.dtype
    return getattr(torch, name)


@dataclass
class TextEncoderParts:
    tokenizer: Any
    model: torch.nn.Module


def load_text_encoder(cfg: ModelConfig, simulation: SimulationConfig | None = None) -> TextEncoderParts:
    if simulation is not None:
        from serving.simulate import stages

        return stages.text_encoder(cfg, simulation)
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = check_model_folder(cfg)
    device, dtype = resolve_device(cfg), resolve_dtype(cfg)
    if folder is None:
        tokenizer, model = tiny.build_tokenizer(), tiny.build_text_encoder(cfg.seed)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        model = UMT5EncoderModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype, local_files_only=True)
    return TextEncoderParts(tokenizer=tokenizer, model=_place(model, device, dtype))


@dataclass
class ImageEncoderParts:
    processor: Any  # CLIPImageProcessor: resize, crop and normalize as the encoder was trained
    model: torch.nn.Module  # CLIPVisionModel


def load_image_encoder(cfg: ModelConfig) -> ImageEncoderParts | None:
    """The CLIP image encoder of an image-to-video preset (None for text-to-video ones)."""
    if not preset_of(cfg).takes_image:
        return None
    from transformers import CLIPImageProcessor, CLIPVisionModel

    folder = check_model_folder(cfg)
    processor = CLIPImageProcessor.from_pretrained(folder / "image_processor", local_files_only=True)
    # float32, as diffusers' Wan I2V examples load it: one image of 257 tokens per job, so the
    # precision costs little.
    model = CLIPVisionModel.from_pretrained(folder / "image_encoder", torch_dtype=torch.float32, local_files_only=True)
    return ImageEncoderParts(processor=processor, model=_place(model, resolve_device(cfg), torch.float32))


def load_transformer(cfg: ModelConfig, simulation: SimulationConfig | None = None) -> torch.nn.Module:
    if simulation is not None:
        from serving.simulate import stages

        return stages.transformer(cfg, simulation)
    from diffusers import WanTransformer3DModel

    folder = check_model_folder(cfg)
    device, dtype = resolve_device(cfg), resolve_dtype(cfg)
    if folder is None:
        model = tiny.build_transformer(cfg.seed)
    else:
        model = WanTransformer3DModel.from_pretrained(folder / "transformer", torch_dtype=dtype, local_files_only=True)
    patch = tuple(model.config.patch_size)
    geometry = preset_of(cfg).geometry
    if patch[1] * geometry.vae_spatial_factor != geometry.spatial_multiple:
        raise ModelFolderError(f"transformer patch_size {patch} does not fit preset {cfg.preset!r}")
    # Our kernels replace diffusers' attention where they can run: on CUDA for "auto", and
    # wherever asked for explicitly (the dispatcher falls back, with a logged reason, if not).
    if cfg.attention_backend != "sdpa" and (cfg.attention_backend != "auto" or device.type == "cuda"):
        from serving.kernels.wan import use_kernel_attention

        use_kernel_attention(model, cfg.attention_backend)
    return _place(model, device, dtype)


def load_vae(cfg: ModelConfig, simulation: SimulationConfig | None = None) -> torch.nn.Module:
    if simulation is not None:
        from serving.simulate import stages

        return stages.vae(cfg, simulation)
    from diffusers import AutoencoderKLWan

    folder = check_model_folder(cfg)
    device = resolve_device(cfg)
    if folder is None:
        model = tiny.build_vae(cfg.seed)
    else:
        # Wan decodes in float32: bf16 VAE output shows banding for little speed gained.
        model = AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.float32, local_files_only=True)
    geometry = preset_of(cfg).geometry
    if (model.config.scale_factor_spatial, model.config.scale_factor_temporal) != (
        geometry.vae_spatial_factor, geometry.temporal_factor
    ):
        raise ModelFolderError(f"VAE scale factors do not fit preset {cfg.preset!r}")
    return _place(model, device, torch.float32)


def _place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    # Cast only when needed: from_pretrained already set the dtype (keeping norms in fp32).
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype=dtype)
    return model.to(device=device).eval()


def load_scheduler_config(cfg: ModelConfig, simulation: SimulationConfig | None = None) -> dict:
    # Simulated: no folder; the tiny preset's UniPC flow-matching config is Wan's own scheduler.
    folder = None if simulation is not None else check_model_folder(cfg)
    if folder is None:
        return tiny.scheduler_config()
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())

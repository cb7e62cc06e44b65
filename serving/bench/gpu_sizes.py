"""What `ditserve bench gpu` measures at, and the random-weight models it measures.

Two size sets run the same code: `real` (a GPU: the Wan2.1 shapes, the Wan2.1-1.3B DiT's own
config, the Wan2.1 VAE, a UMT5-XXL-size text encoder) and `tiny` (the CPU smoke test: the
tiny preset's configs and shapes). Random weights cost what trained ones do, so nothing is
downloaded; the tokenizer is the tiny preset's byte-level one (a prompt is padded to the
encoder's fixed length either way, so the cost is the same).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from serving.models import tiny

# (label, heads, query tokens, key tokens) at head dim 128: Wan2.1 480p is 32,760 tokens, 720p 75,600.
WAN_ATTENTION_SHAPES = (
    *[(f"self 1.3B S={s}", 12, s, s) for s in (4096, 16384, 32760, 75600)],
    *[(f"self 14B S={s}", 40, s, s) for s in (4096, 16384, 32760, 75600)],
    ("cross 1.3B S=32760", 12, 32760, 512),
    ("cross 14B S=75600", 40, 75600, 512),
)
# Wan2.1-T2V-1.3B's transformer/config.json.
WAN_13B_DIT = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                   out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
# google/umt5-xxl's encoder, as Wan2.1's text_encoder/config.json has it.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)


@dataclass(frozen=True)
class Sizes:
    name: str
    preset: str  # whose geometry and default job the DiT, VAE and profile use
    attention_shapes: tuple[tuple[str, int, int, int], ...]
    head_dim: int
    reference_rows: int  # query rows compared with the float64 definition (a big shape's full reference won't fit)
    dit: dict
    text_encoder: dict
    vae: dict | None  # None: diffusers' default AutoencoderKLWan, which is Wan2.1's VAE
    batches: tuple[int, ...] = (1, 2, 4)  # jobs per DiT forward (each 2 rows with CFG)
    iterations: int = 10
    profile_factors: dict = field(default_factory=dict)  # measure_parts' size/frame/prompt choices


REAL = Sizes("real", "wan2.1-t2v-1.3b", WAN_ATTENTION_SHAPES, 128, 64, WAN_13B_DIT, UMT5_XXL, None,
             profile_factors=dict(size_factors=(0.5, 1), frame_factors=(0.5, 1), prompt_counts=(1, 2)))
TINY = Sizes("tiny", "tiny", (("self odd S=77", 2, 77, 77), ("cross S=45 keys=19", 2, 45, 19)), 32, 10_000,
             tiny.TRANSFORMER_CONFIG, tiny.TEXT_ENCODER_CONFIG, tiny.VAE_CONFIG, iterations=2,
             profile_factors=dict(size_factors=(1,), frame_factors=(1, 2), prompt_counts=(1, 2)))
SIZES = {"real": REAL, "tiny": TINY}


@contextlib.contextmanager
def _building(device: torch.device, dtype: torch.dtype):
    """Parameters are made on the device in their dtype: a 5.7 B-parameter encoder built in
    fp32 on the host first would take minutes and 23 GB."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _as_loaded(model: torch.nn.Module) -> torch.nn.Module:
    """The dtypes diffusers' `from_pretrained(torch_dtype=...)` gives: the modules the class names
    in `_keep_in_fp32_modules` (Wan's norms, rope and time embedder) stay fp32, matched on whole
    name components as diffusers matches them."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, param in model.named_parameters():
        if any(module in name.split(".") for module in keep):
            param.data = param.data.float()
    return model


@dataclass
class Models:
    tokenizer: object
    text_encoder: torch.nn.Module
    transformer: torch.nn.Module
    vae: torch.nn.Module
    built_seconds: dict[str, float]


def build_models(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> Models:
    """Random-weight stages at `sizes` on `device`: DiT and text encoder in `dtype`, the VAE in
    fp32 (as serving/models/loading.py runs it)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    seconds = {}
    torch.manual_seed(0)
    started = time.perf_counter()
    with _building(device, dtype):
        text_encoder = UMT5EncoderModel(UMT5Config(**sizes.text_encoder)).eval()  # bf16 loads keep no fp32 modules
    seconds["text_encoder"] = time.perf_counter() - started
    started = time.perf_counter()
    with _building(device, dtype):
        transformer = _as_loaded(WanTransformer3DModel(**sizes.dit).eval())
    seconds["denoiser"] = time.perf_counter() - started
    started = time.perf_counter()
    with _building(device, torch.float32):
        vae = (AutoencoderKLWan(**sizes.vae) if sizes.vae is not None else AutoencoderKLWan()).eval()
    seconds["vae_decoder"] = time.perf_counter() - started
    return Models(tiny.build_tokenizer(), text_encoder, transformer, vae, seconds)

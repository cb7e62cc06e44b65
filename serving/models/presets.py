"""Model presets: what each named model is, its request defaults, and its geometry.

A preset says what to serve; the weights come from a folder shipped with the package
(`tiny`, trained by `ditserve train-tiny`), from code (`tiny-random`, built from a seed), or
from a local diffusers-format folder (`wan2.1-*`). Geometry lives here, not in
the loaded modules, so the API can validate a request without holding a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Wan's own default negative prompt (from the Wan2.1 release), used by the wan2.1 presets.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


# Wan2.1-I2V's text context: its DiT takes [image tokens, text tokens] as one sequence and
# splits them by counting this many text tokens from the end (diffusers' processor and ours,
# serving/kernels/wan.py), so an image-to-video preset always encodes prompts to this length.
I2V_TEXT_TOKENS = 512


@dataclass(frozen=True)
class GenerationDefaults:
    size: str
    seconds: float
    fps: int
    num_inference_steps: int
    guidance_scale: float
    shift: float
    negative_prompt: str
    max_sequence_length: int


@dataclass(frozen=True)
class Geometry:
    """How pixels map to latents: sizes must be multiples of `spatial_multiple`,
    frame counts of the form `temporal_factor * k + 1`."""

    spatial_multiple: int = 16  # VAE 8x downsampling times the DiT's 2x2 patch
    temporal_factor: int = 4  # the Wan VAE packs 4 frames per latent frame (after the first)
    vae_spatial_factor: int = 8


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    dtype: str
    needs_folder: bool
    defaults: GenerationDefaults
    # A prior for wait estimates until the Denoisers have measured real steps (seconds per
    # batched step at the default size on the hardware the preset is meant for).
    typical_step_seconds: float
    # The most one request may cost, in latent token-steps (serving/pipeline/cost.py): about
    # twice the default job, so twice the length or twice the steps fits, and fps or size
    # cannot be raised without bound (generation.max_cost overrides it).
    max_cost: int
    geometry: Geometry = Geometry()
    # The DiT's attention heads: a sequence-parallel degree must divide them (serving/parallel/).
    attention_heads: int = 4
    # Step-cache thresholds by name (serving/pipeline/step_cache.py): the accumulated relative
    # change of the first block's modulated input a request tolerates before it runs the
    # blocks again. Model-specific; see docs/benchmarks.md for how each was measured.
    step_cache: tuple[tuple[str, float], ...] = (("balanced", 0.15), ("fast", 0.2))
    # A diffusers-format folder shipped inside the package (under serving/models/weights/),
    # used when model.path is not set.
    bundled: str | None = None
    # "t2v": video from text; "i2v": video from text and a first frame (input_reference), which
    # the folder's CLIP image encoder and the VAE turn into the DiT's extra conditioning.
    task: str = "t2v"

    @property
    def takes_image(self) -> bool:
        return self.task == "i2v"


# The two tiny presets are one architecture: the trained weights, and random ones.
_TINY = Preset(
    name="tiny",
    description="Wan2.1 architecture at toy size, trained on synthetic shape clips (ships with ditserve); "
                "runs on a laptop CPU in seconds",
    dtype="float32",
    needs_folder=False,
    defaults=GenerationDefaults(
        size="64x64", seconds=1.0, fps=16, num_inference_steps=8, guidance_scale=5.0,
        shift=3.0, negative_prompt="", max_sequence_length=128,
    ),
    typical_step_seconds=0.02,
    attention_heads=4,  # serving/models/tiny.py's TRANSFORMER_CONFIG
    # A toy on a CPU: room for 128x128 x 10 s x 100 steps, or 256x256 x 4 s x 100 steps.
    max_cost=1_000_000,
    bundled="weights/tiny",
)

# Wan2.1 I2V: the 14B DiT with 36 input channels (noise, first-frame mask, first-frame latents)
# and an image cross-attention over CLIP ViT-H/14 tokens; one folder per resolution, with the
# flow shift the Wan release recommends for it (3.0 at 480p, 5.0 at 720p).
_I2V_480P = Preset(
    name="wan2.1-i2v-14b-480p",
    description="Wan2.1 I2V 14B 480P from a local diffusers folder: a video from a first frame and a prompt",
    dtype="bfloat16",
    needs_folder=True,
    defaults=GenerationDefaults(
        size="832x480", seconds=5.0, fps=16, num_inference_steps=40, guidance_scale=5.0,
        shift=3.0, negative_prompt=WAN_NEGATIVE_PROMPT, max_sequence_length=I2V_TEXT_TOKENS,
    ),
    typical_step_seconds=4.0,
    attention_heads=40,
    max_cost=8_000_000,  # as the 480p T2V preset: its default job is 2.7 M token-steps
    task="i2v",
)

PRESETS: dict[str, Preset] = {
    "tiny": _TINY,
    "tiny-random": dataclasses.replace(
        _TINY, name="tiny-random", bundled=None,
        description="the tiny architecture with random weights built from model.seed: coloured noise, for tests"),
    # The tiny model taught to animate a first frame (serving/models/train_tiny_i2v.py): the
    # same DiT with Wan2.1-I2V's image inputs, the same text encoder and VAE. 512 text tokens,
    # as every Wan I2V model: the DiT tells its image tokens from its text ones by that count
    # (I2V_TEXT_TOKENS).
    "tiny-i2v": dataclasses.replace(
        _TINY, name="tiny-i2v", bundled="weights/tiny-i2v", task="i2v",
        defaults=dataclasses.replace(_TINY.defaults, max_sequence_length=I2V_TEXT_TOKENS),
        description="the tiny model as image-to-video, trained to move the shape of a given first frame the way "
                    "the prompt says (ships with ditserve)"),
    "wan2.1-t2v-1.3b": Preset(
        name="wan2.1-t2v-1.3b",
        description="Wan2.1 T2V 1.3B from a local diffusers folder (480p)",
        dtype="bfloat16",
        needs_folder=True,
        defaults=GenerationDefaults(
            size="832x480", seconds=5.0, fps=16, num_inference_steps=50, guidance_scale=5.0,
            shift=3.0, negative_prompt=WAN_NEGATIVE_PROMPT, max_sequence_length=512,
        ),
        typical_step_seconds=1.0,
        attention_heads=12,
        # Default job: 3.3 M. Fits 10 s at the defaults (6.4 M), 100 steps (6.6 M), 1280x720 x 5 s (7.6 M).
        max_cost=8_000_000,
    ),
    "wan2.1-t2v-14b": Preset(
        name="wan2.1-t2v-14b",
        description="Wan2.1 T2V 14B from a local diffusers folder (720p)",
        dtype="bfloat16",
        needs_folder=True,
        defaults=GenerationDefaults(
            size="1280x720", seconds=5.0, fps=16, num_inference_steps=50, guidance_scale=5.0,
            shift=5.0, negative_prompt=WAN_NEGATIVE_PROMPT, max_sequence_length=512,
        ),
        typical_step_seconds=8.0,
        attention_heads=40,
        # Default job: 7.6 M. Fits 10 s at the defaults (14.8 M) or 100 steps (15.1 M).
        max_cost=16_000_000,
    ),
    "wan2.1-i2v-14b-480p": _I2V_480P,
    "wan2.1-i2v-14b-720p": dataclasses.replace(
        _I2V_480P, name="wan2.1-i2v-14b-720p",
        description="Wan2.1 I2V 14B 720P from a local diffusers folder: a video from a first frame and a prompt",
        defaults=dataclasses.replace(_I2V_480P.defaults, size="1280x720", shift=5.0),
        typical_step_seconds=8.0, max_cost=16_000_000),
}


def image_presets() -> list[str]:
    """The presets that take a first frame (input_reference)."""
    return [name for name, preset in PRESETS.items() if preset.takes_image]

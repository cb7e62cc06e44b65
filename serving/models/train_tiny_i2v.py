"""Train the `tiny-i2v` preset: the tiny model made to animate a given first frame.

    ditserve train-tiny --task i2v --out serving/models/weights/tiny-i2v --seed 0

The recipe Wan2.1-I2V followed at full size, at toy size: start from the text-to-video
model and teach it the image inputs.

- Kept from the shipped `tiny` (serving/models/weights/tiny), frozen: the tokenizer, text
  encoder, VAE (and its latent normalization) and scheduler, so the first frame is encoded
  by the very VAE that decodes the clip.
- The DiT (tiny.I2V_TRANSFORMER_CONFIG) starts as `tiny`'s: every weight of the same shape
  is copied; the patch embedding's 20 new input channels (first-frame mask and latents)
  start at zero, and so does each block's image value projection (add_v_proj), so at step 0
  the model is exactly `tiny` and the image inputs grow in from there.
- A toy CLIP vision encoder (tiny.IMAGE_ENCODER_CONFIG) is trained with the DiT, end to end
  through the image cross-attention.

Data: the synthetic clips of `tiny` (serving/models/synthetic.py, the same held-out
combinations kept out); a clip's first frame is its condition, prepared by the functions
the service runs (serving/pipeline/image.py: CLIP tokens of the frame, the mask and the VAE
latents of [frame, black...]). Captions: 60 % the full caption ("a red circle moving
right", any phrasing), 30 % the direction alone ("a shape moving right": the frame already
shows what and where), 10 % "" for guidance. Flow matching as in train_tiny.py.

The result is a WanImageToVideoPipeline folder that serving.models.loading loads with
model.preset=tiny-i2v. Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from serving.config import GenerationConfig
from serving.models import synthetic, tiny
from serving.models.presets import PRESETS
from serving.models.train_tiny import _EMA, _column_means, _lr_at, _set_lr, encode_latents
from serving.pipeline.encode import encode_text
from serving.pipeline.image import first_frame_condition
from serving.pipeline.spec import build_spec

PRESET = PRESETS["tiny-i2v"]
TINY_FOLDER = Path(__file__).parent / "weights" / "tiny"

FULL_CAPTION, DIRECTION_ONLY = 0.6, 0.3  # the rest: "" (classifier-free guidance)


def first_frame(frames: torch.Tensor) -> Image.Image:
    """A clip's first frame (uint8 (T, H, W, 3)) as the PIL image a client would upload."""
    return Image.fromarray(frames[0].numpy(), mode="RGB")


def load_tiny_parts(folder: Path = TINY_FOLDER):
    """The shipped `tiny` model's parts that `tiny-i2v` keeps (tokenizer, text encoder, VAE)
    and its DiT, to start from."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    return (tiny.build_tokenizer(), UMT5EncoderModel.from_pretrained(folder / "text_encoder").eval(),
            AutoencoderKLWan.from_pretrained(folder / "vae").eval(),
            WanTransformer3DModel.from_pretrained(folder / "transformer").eval())


def transformer_from_t2v(t2v: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The I2V DiT, equal to `t2v` on text-only inputs: shared weights copied, the image
    inputs' patch channels and value projections zero."""
    i2v = tiny.build_i2v_transformer(seed)
    source = t2v.state_dict()
    with torch.no_grad():
        for name, param in i2v.named_parameters():
            if name == "patch_embedding.weight":
                param.zero_()
                param[:, :source[name].shape[1]] = source[name]
            elif name in source and source[name].shape == param.shape:
                param.copy_(source[name])
            elif ".add_v_proj." in name:
                param.zero_()
    return i2v


def prompt_table(keys: list[tuple[str, str, str]]) -> list[str]:
    """Row (k * NUM_PHRASINGS + v): phrasing v of keys[k]; then the direction-only captions,
    row (base + d * NUM_PHRASINGS + v); then ""."""
    full = [p for c, s, d in keys for p in synthetic.captions(c, s, d)]
    direction_only = [synthetic.caption(None, None, d, v) for d in synthetic.DIRECTIONS
                      for v in range(synthetic.NUM_PHRASINGS)]
    return full + direction_only + [""]


def conditions(vae, clips: list[synthetic.Clip]) -> torch.Tensor:
    """Each clip's first-frame condition as the service computes it, (N, 4 + z, T', H', W')."""
    spec = build_spec(PRESET, GenerationConfig(), "x")
    return torch.cat([first_frame_condition(vae, first_frame(c.frames), spec, PRESET.geometry) for c in clips])


def train_dit(transformer, image_encoder, pixel_values: torch.Tensor, latents: torch.Tensor, condition: torch.Tensor,
              text_table: torch.Tensor, combos: list[tuple[str, str, str]], steps: int, generator: torch.Generator, *,
              batch: int = 32, lr: float = 1e-3, shift: float = PRESET.defaults.shift, ema_decay: float = 0.998,
              log: Callable[[str], None] = print):
    """latents: normalised (N, C, T', H', W'); condition: (N, 4 + C, T', H', W'); pixel_values:
    CLIP inputs (N, 3, S, S); text_table: embeddings of prompt_table(sorted(set(combos)))."""
    keys = sorted(set(combos))
    key_index = {k: i for i, k in enumerate(keys)}
    clip_key = torch.tensor([key_index[c] for c in combos])
    clip_direction = torch.tensor([synthetic.DIRECTIONS.index(c[2]) for c in combos])
    n_phrasings = synthetic.NUM_PHRASINGS
    direction_base, empty = len(keys) * n_phrasings, text_table.shape[0] - 1

    params = list(transformer.parameters()) + list(image_encoder.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = _EMA([transformer, image_encoder], ema_decay)
    started, running = time.monotonic(), []
    for step in range(steps):
        _set_lr(optimizer, _lr_at(step, steps, lr, warmup=100))
        idx = torch.randint(latents.shape[0], (batch,), generator=generator)
        phrasing = torch.randint(n_phrasings, (batch,), generator=generator)
        kind = torch.rand(batch, generator=generator)
        row = torch.where(kind < FULL_CAPTION, clip_key[idx] * n_phrasings + phrasing,
                          torch.where(kind < FULL_CAPTION + DIRECTION_ONLY,
                                      direction_base + clip_direction[idx] * n_phrasings + phrasing,
                                      torch.full_like(phrasing, empty)))
        x0 = latents[idx]
        u = torch.rand(batch, generator=generator)
        s = shift * u / (1 + (shift - 1) * u)
        noise = torch.randn(x0.shape, generator=generator)
        sv = s.view(-1, 1, 1, 1, 1)
        xt = torch.cat([(1 - sv) * x0 + sv * noise, condition[idx]], dim=1)
        tokens = image_encoder(pixel_values=pixel_values[idx], output_hidden_states=True).hidden_states[-2]
        pred = transformer(hidden_states=xt, timestep=s * 1000, encoder_hidden_states=text_table[row],
                           encoder_hidden_states_image=tokens, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update(step)
        running.append((loss.item(),))
        if (step + 1) % 100 == 0 or step + 1 == steps:
            (f,) = _column_means(running)
            log(f"i2v dit step {step + 1}/{steps} flow {f:.4f} ({time.monotonic() - started:.0f} s)")
            running = []
    ema.copy_to_model()
    for p in params:
        p.requires_grad_(False)
    return transformer.eval(), image_encoder.eval()


def train(out_dir: str | Path, seed: int = 0, *, num_clips: int = 1320, dit_steps: int = 6000, dit_batch: int = 32,
          dit_lr: float = 1e-3, threads: int | None = None, log: Callable[[str], None] = print) -> Path:
    """Train tiny-i2v from the shipped tiny model and write a diffusers folder to `out_dir`."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline

    if threads is not None:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    started = time.monotonic()
    log(f"train-tiny --task i2v: seed {seed}, {num_clips} clips, dit {dit_steps} steps x {dit_batch}, "
        f"from {TINY_FOLDER}, {torch.get_num_threads()} threads")
    with torch.random.fork_rng(devices=[]):
        tokenizer, text_encoder, vae, t2v = load_tiny_parts()
        clips = synthetic.make_clips(num_clips, seed)
        combos = [(c.colour, c.shape, c.direction) for c in clips]
        videos = torch.stack([c.frames for c in clips])
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)
        latents = (encode_latents(vae, videos) - mean) / std
        condition = conditions(vae, clips)
        processor = tiny.build_image_processor()
        pixel_values = processor(images=[first_frame(c.frames) for c in clips], return_tensors="pt").pixel_values
        text_table = encode_text(tokenizer, text_encoder, prompt_table(sorted(set(combos))),
                                 PRESET.defaults.max_sequence_length)
        log(f"data: {len(clips)} clips, latents {tuple(latents.shape[1:])}, condition {tuple(condition.shape[1:])}, "
            f"{text_table.shape[0]} prompts ({time.monotonic() - started:.0f} s)")
        torch.manual_seed(seed + 1)
        transformer, image_encoder = train_dit(
            transformer_from_t2v(t2v, seed), tiny.build_image_encoder(seed), pixel_values, latents, condition,
            text_table, combos, dit_steps, torch.Generator().manual_seed(seed + 1), batch=dit_batch, lr=dit_lr, log=log)

    WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, image_processor=processor,
        image_encoder=image_encoder, transformer=transformer,
        scheduler=UniPCMultistepScheduler.from_config(tiny.SCHEDULER_CONFIG),
    ).save_pretrained(out_dir, safe_serialization=True)
    elapsed = time.monotonic() - started
    info = dict(task="i2v", seed=seed, num_clips=num_clips, dit_steps=dit_steps, dit_batch=dit_batch, dit_lr=dit_lr,
                started_from=str(TINY_FOLDER.relative_to(Path(__file__).parents[2])),
                transformer=tiny.I2V_TRANSFORMER_CONFIG, image_encoder=tiny.IMAGE_ENCODER_CONFIG,
                captions=dict(full=FULL_CAPTION, direction_only=DIRECTION_ONLY,
                              empty=round(1 - FULL_CAPTION - DIRECTION_ONLY, 2)),
                threads=torch.get_num_threads(), wall_seconds=round(elapsed), torch=torch.__version__,
                held_out=[list(c) for c in synthetic.HELD_OUT])
    (out_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"wrote {out_dir} in {elapsed:.0f} s")
    return out_dir

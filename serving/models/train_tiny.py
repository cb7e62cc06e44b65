"""Train the `tiny` preset on synthetic shape clips so that it follows simple prompts.

    python -m serving.models.train_tiny --out serving/models/weights/tiny --seed 0

Three stages, all on the classes the service runs (built by serving/models/tiny.py):

1. VAE (AutoencoderKLWan): reconstruction (MSE + L1, object pixels weighted up) plus a
   small KL term, on whole 64x64 frames, 2 clips a step (batch > 1 also puts conv3d on
   oneDNN): 5-frame windows (the causal first frame and one 4-frame chunk) on 3 steps of
   4 and whole 17-frame clips on every 4th, so the later chunks and their caches are fitted
   too. (Tried and dropped: 9-frame windows only left the last chunks of a 17-frame clip
   off-colour; 32x32 crops made the mid-block attention see 4x4 latent grids instead of 8x8
   and whole frames came back tinted; 500 steps of 4 whole clips left colours washed out.)
2. Latents: each 17-frame clip is encoded (posterior mean, 16x5x8x8). Their per-channel
   mean and std go into the VAE config (latents_mean / latents_std), which is how
   serving/pipeline/decode.py undoes the normalisation: z = z_norm * std + mean.
3. DiT (WanTransformer3DModel) and text encoder (UMT5EncoderModel), jointly, with flow
   matching in the sampler's convention: x_s = (1 - s) x0 + s noise, timestep = 1000 s,
   target v = noise - x0, s = shift u / (1 + (shift - 1) u) with u uniform and shift 3
   (the preset's), AdamW 1.5e-3 (5e-4 needed twice the steps for a worse score). 10 % of captions are dropped to "" (the preset's negative prompt) so
   classifier-free guidance works. Text embeddings are made exactly as
   serving/pipeline/encode.py makes them (cleaned, padded to 128 tokens with EOS, rows past
   the prompt zeroed). Small linear heads on the pooled text embedding predict the colour,
   shape and direction as an auxiliary loss (the heads are thrown away afterwards).
   Optionally (`partial_captions`, off by default) some captions say only one or two of
   the attributes; at 3000 steps that lowered the held-out score (21/60 against 44/60).

The result is a diffusers-format folder (WanPipeline.save_pretrained) that
serving.models.loading loads with model.preset=tiny and model.path=<folder>.
Everything is drawn from `seed`; runs with the same seed and thread count are identical.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from serving.models import synthetic, tiny
from serving.models.presets import PRESETS
from serving.pipeline.encode import tokenize, zero_padding

PRESET = PRESETS["tiny"]


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _column_means(rows: list[tuple[float, ...]]) -> list[float]:
    """Mean of each loss over the steps since the last log line."""
    return [sum(column) / len(rows) for column in zip(*rows)]


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _crop_on_object(clip: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """A crop x crop window of a (T, H, W, 3) clip around the object in its middle frame,
    shifted at random by up to a quarter of the crop (the VAE is convolutional: small crops
    teach it the same thing at a quarter of the cost of whole frames)."""
    size = clip.shape[1]
    if crop >= size:
        return clip
    frame = clip[clip.shape[0] // 2].float()
    foreground = (frame - frame[0, 0]).abs().amax(dim=-1) > 25
    ys, xs = foreground.nonzero(as_tuple=True)
    cy, cx = (ys.float().mean().item(), xs.float().mean().item()) if len(ys) else (size / 2, size / 2)
    jitter = torch.randint(-(crop // 4), crop // 4 + 1, (2,), generator=generator).tolist()
    top = int(min(max(round(cy) - crop // 2 + jitter[0], 0), size - crop))
    left = int(min(max(round(cx) - crop // 2 + jitter[1], 0), size - crop))
    return clip[:, top:top + crop, left:left + crop]


def train_vae(vae, videos: torch.Tensor, steps: int, generator: torch.Generator, *, batch: int = 2,
              window: int = 5, full_every: int = 4, crop: int = 64, lr: float = 1.5e-3, kl_weight: float = 1e-4, log: Callable[[str], None] = print):
    """videos: uint8 (N, T, H, W, 3)."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    num, frames = videos.shape[0], videos.shape[1]
    started, running = time.monotonic(), []
    for step in range(steps):
        _set_lr(optimizer, _lr_at(step, steps, lr, warmup=min(30, steps // 10 + 1)))
        # Mostly short windows (the first frame and one 4-frame chunk: cheap, many steps), and
        # every `full_every`-th step whole clips, so the later chunks and caches are fitted too.
        length = frames if step % full_every == full_every - 1 else window
        idx = torch.randint(num, (batch,), generator=generator)
        start = int(torch.randint(frames - length + 1, (), generator=generator))
        x = torch.stack([synthetic.to_model_range(_crop_on_object(videos[i, start:start + length], crop, generator))
                         for i in idx.tolist()])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        # Object pixels (those away from the top-left corner's background colour) weigh more:
        # they are ~5 % of the frame and carry all of the meaning.
        background = x[:, :, :, :1, :1]
        weight = 1.0 + 4.0 * ((x - background).abs().amax(dim=1, keepdim=True) > 0.1).float()
        err = recon - x
        rec_loss = (weight * (err.pow(2) + 0.5 * err.abs())).mean()
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = rec_loss + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        running.append((rec_loss.item(), kl.item()))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            r, k = _column_means(running)
            log(f"vae step {step + 1}/{steps} rec {r:.4f} kl {k:.3f} ({time.monotonic() - started:.0f} s)")
            running = []
    return vae.eval()


@torch.no_grad()
def encode_latents(vae, videos: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Posterior means of whole clips: (N, C, T', H', W'), not normalised."""
    out = []
    for i in range(0, videos.shape[0], batch):
        x = torch.stack([synthetic.to_model_range(v) for v in videos[i:i + batch]])
        out.append(vae.encode(x).latent_dist.mean)
    return torch.cat(out)


class TextHeads(torch.nn.Module):
    """Auxiliary classifiers on the pooled text embedding (training only)."""

    def __init__(self, dim: int):
        super().__init__()
        self.colour = torch.nn.Linear(dim, len(synthetic.COLOURS))
        self.shape = torch.nn.Linear(dim, len(synthetic.SHAPES))
        self.direction = torch.nn.Linear(dim, len(synthetic.DIRECTIONS))

    def forward(self, pooled):
        return self.colour(pooled), self.shape(pooled), self.direction(pooled)


def _embed(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """encode_text's embeddings, with gradients: the encoder runs only over the longest
    prompt of the batch (masked keys make the padding irrelevant), then rows past each
    prompt are zero, out to the full max_sequence_length."""
    used = max(1, int(mask.sum(dim=1).max()))
    hidden = zero_padding(text_encoder(ids[:, :used], mask[:, :used]).last_hidden_state, mask[:, :used])
    return F.pad(hidden, (0, 0, 0, ids.shape[1] - used))


class _EMA:
    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


# Which attributes a caption says, as (colour, shape, direction) flags: the full caption
# first, then the partial ones that `partial_captions` mixes in.
_SAID = [(True, True, True)] + [m for m in itertools.product((True, False), repeat=3) if not all(m) and any(m)]


def caption_table(keys: list[tuple[str, str, str]]) -> tuple[list[str], torch.Tensor]:
    """Every phrasing of every combination in `keys`, saying all or part of it, then ""
    (the preset's negative prompt). Row (k * len(_SAID) + m) * NUM_PHRASINGS + v holds
    phrasing v of keys[k] saying _SAID[m]; returns the prompts and, per prompt, the
    (colour, shape, direction) indices it says (-100 where unsaid, cross entropy's ignore)."""
    colours, shapes, directions = list(synthetic.COLOURS), list(synthetic.SHAPES), list(synthetic.DIRECTIONS)
    prompts, labels = [], []
    for c, s, d in keys:
        for said in _SAID:
            parts = [value if keep else None for value, keep in zip((c, s, d), said)]
            for v in range(synthetic.NUM_PHRASINGS):
                prompts.append(synthetic.caption(*parts, variant=v))
                labels.append([names.index(value) if value else -100
                               for names, value in zip((colours, shapes, directions), parts)])
    return prompts + [""], torch.tensor(labels + [[-100, -100, -100]])


def train_dit(transformer, text_encoder, tokenizer, latents: torch.Tensor, combos: list[tuple[str, str, str]],
              steps: int, generator: torch.Generator, *, batch: int = 32, lr: float = 1.5e-3,
              caption_dropout: float = 0.1, partial_captions: float = 0.0, shift: float = PRESET.defaults.shift,
              aux_weight: float = 0.1, ema_decay: float = 0.998, log: Callable[[str], None] = print):
    """latents: normalised (N, C, T', H', W'); combos[i] describes clip i. Each caption is
    dropped to "" with probability `caption_dropout` (for classifier-free guidance), else
    replaced by a partial one (one or two of its three attributes) with probability
    `partial_captions`."""
    max_len = PRESET.defaults.max_sequence_length
    keys = sorted(set(combos))
    prompts, labels = caption_table(keys)
    ids, mask = tokenize(tokenizer, prompts, max_len)
    key_index = {k: i for i, k in enumerate(keys)}
    clip_key = torch.tensor([key_index[c] for c in combos])
    empty = len(prompts) - 1

    heads = TextHeads(text_encoder.config.d_model)
    # Dropout off (eval mode) for a model this small; gradients still flow.
    transformer.eval(), text_encoder.eval()
    params = list(transformer.parameters()) + list(text_encoder.parameters()) + list(heads.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = _EMA([transformer, text_encoder], ema_decay)
    num = latents.shape[0]
    started, running = time.monotonic(), []
    for step in range(steps):
        _set_lr(optimizer, _lr_at(step, steps, lr, warmup=200))
        idx = torch.randint(num, (batch,), generator=generator)
        x0 = latents[idx]
        phrasing = torch.randint(synthetic.NUM_PHRASINGS, (batch,), generator=generator)
        partial = torch.randint(1, len(_SAID), (batch,), generator=generator)
        said = torch.where(torch.rand(batch, generator=generator) < partial_captions, partial, 0)
        dropped = torch.rand(batch, generator=generator) < caption_dropout
        key = clip_key[idx]
        row = (key * len(_SAID) + said) * synthetic.NUM_PHRASINGS + phrasing
        prompt_idx = torch.where(dropped, torch.full_like(key, empty), row)
        u = torch.rand(batch, generator=generator)
        s = shift * u / (1 + (shift - 1) * u)
        noise = torch.randn(x0.shape, generator=generator)
        sv = s.view(-1, 1, 1, 1, 1)
        xt = (1 - sv) * x0 + sv * noise
        embeds = _embed(text_encoder, ids[prompt_idx], mask[prompt_idx])
        pred = transformer(hidden_states=xt, timestep=s * 1000, encoder_hidden_states=embeds, return_dict=False)[0]
        fm_loss = F.mse_loss(pred, noise - x0)
        kept = ~dropped
        m = mask[prompt_idx][kept].unsqueeze(-1).float()
        pooled = (embeds[kept] * F.pad(m, (0, 0, 0, embeds.shape[1] - m.shape[1]))).sum(1) / m.sum(1).clamp(min=1)
        logits = heads(pooled)
        target = labels[prompt_idx[kept]]
        aux = sum(F.cross_entropy(lg, target[:, j]) if (target[:, j] >= 0).any() else lg.sum() * 0
                  for j, lg in enumerate(logits)) / 3
        loss = fm_loss + aux_weight * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update(step)
        running.append((fm_loss.item(), aux.item()))
        if (step + 1) % 100 == 0 or step + 1 == steps:
            f, a = _column_means(running)
            log(f"dit step {step + 1}/{steps} flow {f:.4f} aux {a:.3f} ({time.monotonic() - started:.0f} s)")
            running = []
    ema.copy_to_model()
    for p in params:
        p.requires_grad_(False)
    return transformer.eval(), text_encoder.eval()


def save_folder(out_dir: Path, tokenizer, text_encoder, vae, transformer) -> None:
    from diffusers import UniPCMultistepScheduler, WanPipeline

    scheduler = UniPCMultistepScheduler.from_config(tiny.SCHEDULER_CONFIG)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(out_dir, safe_serialization=True)


def train(out_dir: str | Path, seed: int = 0, *, num_clips: int = 1320, vae_steps: int = 2000, dit_steps: int = 6000,
          dit_batch: int = 32, dit_lr: float = 1.5e-3, partial_captions: float = 0.0, vae_from: str | Path | None = None,
          threads: int | None = None, log: Callable[[str], None] = print) -> Path:
    """Train the tiny preset from scratch and write a diffusers folder to `out_dir`.

    Deterministic for a given seed (and thread count). Returns the folder. `threads` sets
    torch's intra-op threads (None leaves torch's setting alone). `vae_from` takes the VAE
    of an earlier run's folder instead of training one: the DiT stage draws from its own
    seeded generator, so with the same seed this gives the same DiT as the full run, in
    half the time."""
    if threads is not None:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    started = time.monotonic()
    log(f"train-tiny: seed {seed}, {num_clips} clips, vae {f'from {vae_from}' if vae_from else f'{vae_steps} steps'}, "
        f"dit {dit_steps} steps x {dit_batch}, {torch.get_num_threads()} threads")
    with torch.random.fork_rng(devices=[]):
        clips = synthetic.make_clips(num_clips, seed)
        videos = torch.stack([c.frames for c in clips])
        combos = [(c.colour, c.shape, c.direction) for c in clips]
        log(f"data: {len(clips)} clips of {len(set(combos))} training combinations "
            f"({len(synthetic.HELD_OUT)} held out) ({time.monotonic() - started:.0f} s)")

        if vae_from is not None:
            from diffusers import AutoencoderKLWan

            vae = AutoencoderKLWan.from_pretrained(Path(vae_from) / "vae").eval()
        else:
            torch.manual_seed(seed)
            vae = train_vae(tiny.build_vae(seed), videos, vae_steps, torch.Generator().manual_seed(seed), log=log)
        raw = encode_latents(vae, videos)
        mean = raw.mean(dim=(0, 2, 3, 4))
        std = raw.std(dim=(0, 2, 3, 4)).clamp(min=1e-3)
        vae.register_to_config(latents_mean=[round(v, 6) for v in mean.tolist()],
                               latents_std=[round(v, 6) for v in std.tolist()])
        mean_t = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std_t = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        latents = (raw - mean_t) / std_t
        vae.save_pretrained(out_dir / "vae")  # early, so the VAE can be inspected while the DiT trains
        log(f"latents {tuple(latents.shape[1:])}: raw std {raw.std().item():.3f}, per-channel std "
            f"{std.min().item():.3f}..{std.max().item():.3f} ({time.monotonic() - started:.0f} s)")

        torch.manual_seed(seed + 1)
        tokenizer = tiny.build_tokenizer()
        transformer, text_encoder = train_dit(
            tiny.build_transformer(seed), tiny.build_text_encoder(seed), tokenizer, latents, combos,
            dit_steps, torch.Generator().manual_seed(seed + 1), batch=dit_batch, lr=dit_lr,
            partial_captions=partial_captions, log=log)

    save_folder(out_dir, tokenizer, text_encoder, vae, transformer)
    elapsed = time.monotonic() - started
    info = dict(seed=seed, num_clips=num_clips, vae_steps=None if vae_from else vae_steps,
                vae_from=str(vae_from) if vae_from else None, dit_steps=dit_steps, dit_batch=dit_batch, dit_lr=dit_lr,
                partial_captions=partial_captions, transformer=tiny.TRANSFORMER_CONFIG,
                threads=torch.get_num_threads(), wall_seconds=round(elapsed), torch=torch.__version__,
                held_out=[list(c) for c in synthetic.HELD_OUT])
    (out_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"wrote {out_dir} in {elapsed:.0f} s")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """`python -m serving.models.train_tiny ARGS` is `ditserve train-tiny ARGS` (one parser)."""
    from serving.cli import main as cli_main

    return cli_main(["train-tiny", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())

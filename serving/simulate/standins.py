"""Stand-ins for the three model stages: the same interface as the real modules, but each
call waits the time its cost profile gives (divided by the time scale) and returns tensors of
the right shapes, cheaply, without using CPU while it waits.

The engine and the stage deployments call them exactly as they call the diffusers modules
(`transformer(hidden_states=..., timestep=..., encoder_hidden_states=...)`, `vae.decode(z)`,
`text_encoder(ids, mask).last_hidden_state`), always from a worker thread, so `time.sleep`
is the wait: the thread sleeps, the event loop and other replicas run.

Shapes are faithful where they carry cost and cheap where they do not: latents keep their
frames, height and width (which set the latent tokens, the batch key and the decode size) but
have `LATENT_CHANNELS` channels instead of 16, and text embeddings keep their token count but
have `EMBEDDING_DIM` features instead of 4096. At real sizes a 480p latent is 8 MB and an
embedding 8 MB per prompt: with 16+ replicas on 2 cores, the scheduler arithmetic, Ray
transfers and checkpoints of those bytes would be the bottleneck the simulation measures.
"""

from __future__ import annotations

import time
from functools import lru_cache
from types import SimpleNamespace

import torch

from serving.cost_model import CostModel
from serving.models.presets import Geometry
from serving.parallel.layout import choose_layout, rows_work

LATENT_CHANNELS = 1
EMBEDDING_DIM = 8
# The simulated video: at most this wide, one frame per latent frame, saying what it is.
PREVIEW_WIDTH = 128


class _Simulated(torch.nn.Module):
    """One parameter, so `next(module.parameters())` finds the device and dtype (the CPU)."""

    simulated = True

    def __init__(self, cost: CostModel, time_scale: float):
        super().__init__()
        self.cost, self.time_scale = cost, time_scale
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def wait(self, seconds: float) -> None:
        time.sleep(seconds / self.time_scale)


class SimulatedTextEncoder(_Simulated):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        prompts, tokens = input_ids.shape
        self.wait(self.cost.text_encode_seconds(prompts, tokens))
        return SimpleNamespace(last_hidden_state=torch.zeros(prompts, tokens, EMBEDDING_DIM))


class SimulatedTransformer(_Simulated):
    def __init__(self, cost: CostModel, time_scale: float, geometry: Geometry):
        super().__init__(cost, time_scale)
        patch = geometry.spatial_multiple // geometry.vae_spatial_factor
        self.patch = patch
        self.config = SimpleNamespace(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                                      patch_size=(1, patch, patch), text_dim=EMBEDDING_DIM)

    # A replica spread over a gang of devices (stages.denoiser.parallel): its size, how it lays
    # out each forward (serving/parallel/layout.py), and the forwards run per layout.
    ulysses, cfg, policy, split_efficiency = 1, 1, "split", 1.0
    speedup = 1.0  # a forward split over the whole gang runs this much faster (the profile's figure)
    forwards: dict | None = None

    def spread_over(self, ulysses: int, cfg: int = 1, policy: str = "split", split_efficiency: float = 0.8) -> None:
        """This replica holds ulysses x cfg devices: a forward split across them takes the
        profile's time on that many (its parallel.speedup); one laid out as whole rows per
        device (policy "by_load", when the rows make it pay) takes one device's time for its
        share of the rows."""
        self.speedup = self.cost.parallel_speedup(ulysses * cfg)
        self.ulysses, self.cfg, self.policy, self.split_efficiency = ulysses, cfg, policy, split_efficiency
        self.forwards = {"split": 0, "rows": 0}

    def forward(self, hidden_states: torch.Tensor, timestep=None, encoder_hidden_states=None, return_dict=False, **_):
        rows, _, frames, height, width = hidden_states.shape
        self.wait(self._seconds(rows, hidden_states, encoder_hidden_states))
        return (torch.zeros_like(hidden_states),)

    def forward_with_caches(self, hidden_states: torch.Tensor, timestep, encoder_hidden_states, owners: list[int],
                            caches: list, positions: list[tuple[int, int]]) -> tuple[torch.Tensor, list[bool]]:
        """The step-caching forward (serving/pipeline/step_cache.py): each caching request
        runs its steps as the profile's measured skip rate plans; the wait is the rows that run."""
        step_cache = getattr(self.cost, "step_cache", None)
        compute = []
        for cache, (step, total) in zip(caches, positions):
            if cache is None or step_cache is None:
                compute.append(True)
            else:
                compute.append(cache.decide_planned(step, total, step_cache.fraction(cache.threshold)))
        running = sum(1 for owner in owners if compute[owner])
        if running:
            self.wait(self._seconds(running, hidden_states, encoder_hidden_states))
        return torch.zeros_like(hidden_states), compute

    def _seconds(self, rows: int, hidden_states: torch.Tensor, encoder_hidden_states) -> float:
        _, _, frames, height, width = hidden_states.shape
        tokens = frames * (height // self.patch) * (width // self.patch)
        text_tokens = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        degree = self.ulysses * self.cfg
        if degree == 1:
            return self.cost.dit_forward_seconds(rows, tokens, text_tokens)
        # The same choice a real gang's leader makes (the policy is config; the costs are the profile's).
        layout = choose_layout(rows, self.ulysses, self.cfg, self.policy, self.split_efficiency)
        self.forwards[layout] += 1
        if layout == "rows":
            return self.cost.dit_forward_seconds(rows_work(rows, degree), tokens, text_tokens)
        return self.cost.dit_forward_seconds(rows, tokens, text_tokens) / self.speedup


class SimulatedVAE(_Simulated):
    def __init__(self, cost: CostModel, time_scale: float, geometry: Geometry):
        super().__init__(cost, time_scale)
        self.geometry = geometry
        self.config = SimpleNamespace(
            z_dim=LATENT_CHANNELS, latents_mean=[0.0] * LATENT_CHANNELS, latents_std=[1.0] * LATENT_CHANNELS,
            scale_factor_spatial=geometry.vae_spatial_factor, scale_factor_temporal=geometry.temporal_factor)

    def decode(self, z: torch.Tensor, return_dict: bool = False):
        _, _, latent_frames, latent_height, latent_width = z.shape
        frames = (latent_frames - 1) * self.geometry.temporal_factor + 1
        width, height = latent_width * self.geometry.vae_spatial_factor, latent_height * self.geometry.vae_spatial_factor
        self.wait(self.cost.vae_decode_seconds(frames, width, height))
        return (preview_clip(latent_frames, width, height),)


def preview_size(width: int, height: int) -> tuple[int, int]:
    """The requested aspect ratio at most PREVIEW_WIDTH wide, even sides (H.264 with yuv420p needs them)."""
    scale = min(1.0, PREVIEW_WIDTH / width)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def preview_clip(frames: int, width: int, height: int) -> torch.Tensor:
    """(1, 3, frames, h, w) in [-1, 1]: 'SIMULATED' on grey, a bar showing the frame's place."""
    w, h = preview_size(width, height)
    card = _card(w, h)
    clip = card.unsqueeze(1).repeat(1, frames, 1, 1)
    for index in range(frames):
        clip[:, index, h - 3:, : max(1, w * (index + 1) // frames)] = 1.0
    return clip.unsqueeze(0)


@lru_cache(maxsize=8)
def _card(width: int, height: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (64, 64, 64))
    ImageDraw.Draw(image).text((4, max(0, height // 2 - 6)), "SIMULATED", fill=(255, 200, 0))
    array = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()
    return array / 127.5 - 1.0

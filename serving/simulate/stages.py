"""Build a stage's simulated compute object, paying the replica's start-up time first.

Called by serving/models/loading.py when `config.simulation` is set, so the choice between the
real model and its stand-in is made once, at load, and nowhere else.
"""

from __future__ import annotations

import time

from serving.config import ModelConfig, SimulationConfig
from serving.models.presets import PRESETS
from serving.simulate.profile import CostProfile, load_profile
from serving.simulate.standins import SimulatedTextEncoder, SimulatedTransformer, SimulatedVAE


def _start(simulation: SimulationConfig, stage: str) -> CostProfile:
    """A new replica pays its cold start before it serves. The profile's figure is the whole of
    it, counted from when the replica's constructor began: process work (imports, CUDA context)
    and weights load. This machine's own imports already took part of it, so the stand-in waits
    only the rest; on a busy CPU they can take longer than the profile, and the replica's
    measured `startup_seconds` (which the reports show) says so."""
    from serving.deployments.stage_load import replica_age_seconds

    profile = load_profile(simulation.profile)
    time.sleep(max(0.0, profile.startup_seconds(stage) / simulation.time_scale - replica_age_seconds()))
    return profile


def text_encoder(cfg: ModelConfig, simulation: SimulationConfig):
    from serving.models import tiny
    from serving.models.loading import TextEncoderParts

    profile = _start(simulation, "text_encoder")
    # A byte-level tokenizer: no vocabulary to ship, and it pads to max_sequence_length like UMT5's.
    return TextEncoderParts(tokenizer=tiny.build_tokenizer(),
                            model=SimulatedTextEncoder(profile, simulation.time_scale))


def transformer(cfg: ModelConfig, simulation: SimulationConfig) -> SimulatedTransformer:
    profile = _start(simulation, "denoiser")
    return SimulatedTransformer(profile, simulation.time_scale, PRESETS[cfg.preset].geometry)


def vae(cfg: ModelConfig, simulation: SimulationConfig) -> SimulatedVAE:
    profile = _start(simulation, "vae_decoder")
    return SimulatedVAE(profile, simulation.time_scale, PRESETS[cfg.preset].geometry)

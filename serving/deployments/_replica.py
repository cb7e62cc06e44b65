"""Set-up every model-stage replica shares."""

from __future__ import annotations

import logging
import os

from serving.config import StageConfig


def prepare_replica(stage: StageConfig) -> None:
    from serving.deployments.stage_load import mark_replica_start

    mark_replica_start()  # the start of this replica's start-up (see stage_load.startup_seconds)
    # One Ray CPU share means one torch thread: oversubscribed cores slow every replica.
    import torch

    torch.set_num_threads(stage.torch_threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # we never download at run time
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)

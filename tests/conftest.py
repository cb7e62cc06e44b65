"""Shared fixtures: one tiny-preset pipeline per test session (building it costs seconds)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must pass with no network at all
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_config():
    from serving.config import load_config

    return load_config(None, environ={})


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_config):
    from serving.pipeline.local import LocalPipeline

    return LocalPipeline(tiny_config)

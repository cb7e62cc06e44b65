"""`ditserve train-tiny` (serving/models/train_tiny.py) at smoke size: a few steps on a few
clips write a folder the service loads, the same seed gives the same weights, and a DiT
trained on an earlier run's VAE (--vae-from) is the DiT of the full run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from serving.cli import main as cli_main
from serving.models import synthetic
from serving.models.train_tiny import caption_table

SMOKE = ["--num-clips", "6", "--vae-steps", "2", "--dit-steps", "3", "--dit-batch", "4", "--threads", "1"]


def weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted((folder / component).glob("*.safetensors")) for k, v in load_file(f).items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from serving.models.train_tiny import main as module_main  # python -m serving.models.train_tiny

    root = tmp_path_factory.mktemp("train-tiny")
    for name, seed in (("a", "0"), ("b", "0")):
        assert cli_main(["train-tiny", "--out", str(root / name), "--seed", seed, *SMOKE]) == 0
    assert module_main(["--out", str(root / "c"), "--seed", "1", *SMOKE]) == 0
    assert cli_main(["train-tiny", "--out", str(root / "dit-only"), "--seed", "0", "--vae-from", str(root / "a"),
                     *SMOKE]) == 0
    return {name: root / name for name in ("a", "b", "c", "dit-only")}


def test_a_run_writes_a_folder_the_service_serves(runs):
    from serving.config import load_config
    from serving.pipeline.local import LocalPipeline

    config = load_config(None, environ={"DITSERVE_MODEL__PRESET": "tiny", "DITSERVE_MODEL__PATH": str(runs["a"]),
                                        "DITSERVE_MODEL__DEVICE": "cpu"})
    pipeline = LocalPipeline(config)
    video = pipeline.generate(pipeline.spec("a red circle moving right", seed=0, num_inference_steps=2))
    assert video.frames.shape == (synthetic.NUM_FRAMES, 64, 64, 3)
    assert (runs["a"] / "training.json").is_file()


def test_the_same_seed_gives_the_same_weights_and_another_seed_does_not(runs):
    for component in ("vae", "transformer", "text_encoder"):
        assert same(weights(runs["a"], component), weights(runs["b"], component)), component
        assert not same(weights(runs["a"], component), weights(runs["c"], component)), component


def test_a_dit_trained_on_an_earlier_vae_is_the_full_runs_dit(runs):
    for component in ("vae", "transformer", "text_encoder"):
        assert same(weights(runs["a"], component), weights(runs["dit-only"], component)), component


def test_caption_table_labels_only_what_each_caption_says():
    prompts, labels = caption_table([("red", "circle", "right")])
    assert prompts[-1] == "" and labels[-1].tolist() == [-100, -100, -100]
    said = dict(zip(prompts, labels.tolist()))
    assert said["a red circle moving right"] == [0, 0, 1]
    assert said["a red shape"] == [0, -100, -100]
    assert said["a circle moving right"] == [-100, 0, 1]


def test_cli_rejects_a_step_count_under_one(capsys):
    assert cli_main(["train-tiny", "--out", "unused", "--dit-steps", "0"]) == 2
    assert "--dit-steps" in capsys.readouterr().err


def test_cli_names_a_vae_folder_that_is_not_one(tmp_path, capsys):
    assert cli_main(["train-tiny", "--out", str(tmp_path / "out"), "--vae-from", str(tmp_path)]) == 2
    assert "--vae-from" in capsys.readouterr().err and not (tmp_path / "out").exists()

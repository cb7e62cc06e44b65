"""The shipped `tiny-i2v` model (issue 20 item 4): given a first frame with a coloured shape
and a prompt naming a direction, the clip starts from that frame and moves that way, for
(colour, shape, direction) combinations held out of training (serving/models/semantic_i2v.py).
Also `ditserve train-tiny --task i2v` at smoke size, and the recipe's starting point.

The HTTP measurement is in tests/test_image_to_video.py (the live I2V app serves tiny-i2v)."""

from __future__ import annotations

import pytest
import torch

from serving.cli import main as cli_main
from serving.models import semantic_i2v, tiny

ISSUE_GOAL = 0.8


def _pipeline(path: str | None = None):
    from serving.config import load_config
    from serving.pipeline.local import LocalPipeline

    environ = {"DITSERVE_MODEL__PRESET": "tiny-i2v", "DITSERVE_MODEL__DEVICE": "cpu"}
    if path is not None:
        environ["DITSERVE_MODEL__PATH"] = path
    return LocalPipeline(load_config(None, environ=environ))


@pytest.fixture(scope="module")
def shipped():
    return _pipeline()


@pytest.mark.parametrize("direction_only", [False, True], ids=["full-caption", "direction-only"])
def test_shipped_tiny_i2v_on_held_out_first_frames(shipped, direction_only):
    score = semantic_i2v.score_pipeline(shipped, semantic_i2v.held_out_cases((0, 1, 2), direction_only=direction_only))
    print("\n" + semantic_i2v.report(f"tiny-i2v, held-out first frames, {'direction only' if direction_only else 'full captions'}",
                                     score))
    assert score.total == 3 * len(semantic_i2v.synthetic.HELD_OUT)
    assert score.fraction >= ISSUE_GOAL


def test_the_first_frame_is_what_the_clip_follows(shipped):
    """The same prompt and seed from two different first frames: each clip starts where its
    own frame has the object (the image, not the caption, decides where)."""
    left, right = [c for c in semantic_i2v.held_out_cases((0, 1)) if c.prompt == "a white circle moving left"]
    for case in (left, right):
        frames = shipped.generate(shipped.spec(case.prompt, seed=0), image=case.image()).frames
        assert semantic_i2v.judge(frames, case).first_frame_ok, case


def test_the_recipe_starts_from_tiny_exactly():
    """At step 0 the I2V DiT is the shipped T2V one: with the image inputs' new weights at
    zero, any first frame leaves its output equal to tiny's (given the same 512 text rows)."""
    from serving.models.presets import I2V_TEXT_TOKENS
    from serving.models.train_tiny_i2v import load_tiny_parts, transformer_from_t2v

    *_, t2v = load_tiny_parts()
    i2v = transformer_from_t2v(t2v, seed=0)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, tiny.LATENT_CHANNELS, 2, 8, 8, generator=generator)
    condition = torch.randn(1, tiny.LATENT_CHANNELS + 4, 2, 8, 8, generator=generator)
    text = torch.randn(1, I2V_TEXT_TOKENS, tiny.TEXT_DIM, generator=generator)
    image = torch.randn(1, 65, tiny.IMAGE_ENCODER_CONFIG["hidden_size"], generator=generator)
    timestep = torch.tensor([500.0])
    with torch.no_grad():
        expected = t2v(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
        got = i2v(hidden_states=torch.cat([latents, condition], 1), timestep=timestep, encoder_hidden_states=text,
                  encoder_hidden_states_image=image, return_dict=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_image_models_keep_wans_text_length_and_are_not_simulated():
    """Wan's I2V DiT splits [image, text] tokens by counting 512 text tokens from the end, so
    every I2V preset encodes prompts to 512 tokens and a config that changes it is refused."""
    from serving.config import ConfigError, load_config
    from serving.models.presets import I2V_TEXT_TOKENS, PRESETS, image_presets

    assert "tiny-i2v" in image_presets()
    assert {PRESETS[name].defaults.max_sequence_length for name in image_presets()} == {I2V_TEXT_TOKENS}
    with pytest.raises(ConfigError, match="generation.max_sequence_length must be 512"):
        load_config(None, environ={"DITSERVE_MODEL__PRESET": "tiny-i2v", "DITSERVE_GENERATION__MAX_SEQUENCE_LENGTH": "128"})
    load_config(None, environ={"DITSERVE_MODEL__PRESET": "tiny", "DITSERVE_GENERATION__MAX_SEQUENCE_LENGTH": "128"})
    # Simulated accelerators have no stand-ins for the image encoder: refused at start, not per job.
    with pytest.raises(ConfigError, match="cannot be simulated"):
        load_config(None, environ={"DITSERVE_MODEL__PRESET": "tiny-i2v", "DITSERVE_SIMULATION__PROFILE": "tiny-cpu"})


def test_train_tiny_i2v_smoke_writes_a_folder_the_service_serves_and_it_is_no_i2v_model_yet(tmp_path):
    """A few steps write a WanImageToVideoPipeline folder that loads as tiny-i2v; a model that
    has not learned the image inputs fails the first-frame check (the check can fail)."""
    out = tmp_path / "smoke"
    assert cli_main(["train-tiny", "--task", "i2v", "--out", str(out), "--num-clips", "8", "--dit-steps", "2",
                     "--dit-batch", "4", "--threads", "1"]) == 0
    assert {p.name for p in out.iterdir()} >= {"image_encoder", "image_processor", "transformer", "vae", "text_encoder",
                                                "tokenizer", "scheduler", "model_index.json", "training.json"}
    pipeline = _pipeline(str(out))
    score = semantic_i2v.score_pipeline(pipeline, semantic_i2v.held_out_cases((0,)))
    print("\n" + semantic_i2v.report("train-tiny --task i2v, 2 steps", score))
    assert score.first_frame_correct <= 0.2 * score.total


def test_cli_refuses_t2v_only_settings_for_i2v(tmp_path, capsys):
    assert cli_main(["train-tiny", "--task", "i2v", "--out", str(tmp_path / "out"), "--vae-steps", "5"]) == 2
    assert "--vae-steps is for --task t2v" in capsys.readouterr().err and not (tmp_path / "out").exists()

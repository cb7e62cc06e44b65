"""The one config model: YAML + env loading, and errors a person can act on."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from serving.config import ConfigError, ServiceConfig, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ditserve.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def problems(path, environ=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={} if environ is None else environ)
    return info.value.problems


def test_defaults_without_a_file():
    config = load_config(None, environ={})
    assert config == ServiceConfig()
    assert config.model.preset == "tiny"


def test_yaml_values_are_loaded(tmp_path):
    path = write(tmp_path, """
        model:
          preset: tiny
          seed: 3
        generation:
          fps: 24
          size: 128x64
    """)
    config = load_config(path, environ={})
    assert (config.model.seed, config.generation.fps, config.generation.size) == (3, 24, "128x64")


def test_environment_overrides_the_file(tmp_path):
    path = write(tmp_path, "generation:\n  fps: 24\n")
    config = load_config(path, environ={"DITSERVE_GENERATION__FPS": "8", "DITSERVE_MODEL__SEED": "5", "OTHER": "x"})
    assert config.generation.fps == 8
    assert config.model.seed == 5


def test_unknown_key_names_line_and_suggests(tmp_path):
    path = write(tmp_path, """
        model:
          preset: tiny
        generation:
          num_inference_stesp: 4
    """)
    [problem] = problems(path)
    assert problem == f"{path}:4: generation.num_inference_stesp: unknown key (did you mean 'num_inference_steps'?)"


def test_string_where_a_number_belongs(tmp_path):
    path = write(tmp_path, """
        generation:
          guidance_scale: strong
    """)
    [problem] = problems(path)
    assert problem == f"{path}:2: generation.guidance_scale: expected a number, found 'strong'"


def test_mis_indented_block_that_does_not_parse(tmp_path):
    path = write(tmp_path, """
        model:
          preset: tiny
         seed: 3
    """)
    [problem] = problems(path)
    assert problem.startswith(f"{path}:3:")
    assert "not valid YAML" in problem and "indentation" in problem


def test_mis_indented_block_that_parses_says_where_the_key_belongs(tmp_path):
    path = write(tmp_path, """
        model:
        preset: tiny
    """)
    found = problems(path)
    assert f"{path}:1: model: expected a mapping (an indented block of key: value lines), found nothing (an empty value)" in found
    assert any(p.startswith(f"{path}:2: preset: unknown key") and "model.preset" in p for p in found)


def test_wrong_choice_lists_the_choices(tmp_path):
    path = write(tmp_path, "model:\n  preset: wan3\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:2: model.preset: expected one of 'tiny', 'tiny-random', 'tiny-i2v', "
                              "'wan2.1-t2v-1.3b', 'wan2.1-t2v-14b', 'wan2.1-i2v-14b-480p' or 'wan2.1-i2v-14b-720p'")
    assert "found 'wan3'" in problem


def test_duplicate_key_is_refused(tmp_path):
    path = write(tmp_path, "model:\n  seed: 1\n  seed: 2\n")
    assert problems(path) == [f"{path}:3: model.seed: duplicate key (first set on line 2)"]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert problems(path) == [f"{path}: config file not found (check the --config path)"]


def test_bad_environment_value_names_the_variable():
    [problem] = problems(None, {"DITSERVE_GENERATION__SECONDS": "long"})
    assert problem == "environment DITSERVE_GENERATION__SECONDS: generation.seconds: expected a number, found 'long'"


def test_bad_size_in_config(tmp_path):
    path = write(tmp_path, "generation:\n  size: 64by64\n")
    assert problems(path) == [f"{path}:2: generation.size: expected WIDTHxHEIGHT such as 832x480, found '64by64'"]


def test_cli_config_error_is_one_line_exit_2_no_traceback(tmp_path):
    path = write(tmp_path, "generation:\n  fps: fast\n")
    result = subprocess.run([sys.executable, "-m", "serving.cli", "config", "--config", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"ditserve: config error: {path}:2: generation.fps: expected an integer, found 'fast'"
    ]


def test_cli_config_prints_resolved_settings(tmp_path):
    path = write(tmp_path, "generation:\n  fps: 24\n")
    result = subprocess.run([sys.executable, "-m", "serving.cli", "config", "--config", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "fps: 24" in result.stdout and "preset: tiny" in result.stdout


def test_a_sequence_parallel_degree_must_divide_the_heads(tmp_path):
    path = write(tmp_path, "stages:\n  denoiser:\n    parallel: {ulysses: 3}\n")
    [problem] = problems(path)
    assert "stages.denoiser.parallel.ulysses (3) must divide the tiny model's 4 attention heads" in problem
    assert "[1, 2, 4]" in problem
    path = write(tmp_path, "stages:\n  text_encoder:\n    parallel: {ulysses: 2}\n")
    assert "stages.text_encoder.parallel" in problems(path)[0]  # only the Denoiser has a gang


def test_a_gang_replica_asks_serve_for_one_bundle_per_rank():
    from serving.app import _stage_options

    config = load_config(None, environ={"DITSERVE_STAGES__DENOISER": "{num_cpus: 2, num_gpus: 1, parallel: {ulysses: 2, cfg: 2}}",
                                        "DITSERVE_MODEL__PRESET": "wan2.1-t2v-1.3b"})
    options = _stage_options("denoiser", config.stages.denoiser)
    assert options["placement_group_bundles"] == [{"CPU": 2, "GPU": 1}] * 4
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"]["num_gpus"] == 1  # the replica itself is rank 0, in bundle 0
    assert "placement_group_bundles" not in _stage_options("text_encoder", config.stages.text_encoder)


def test_a_stopping_denoiser_drains_the_jobs_it_holds():
    """Serve stops whichever replica it likes on a scale-down; a Denoiser may then finish every
    job it holds (a batch at once, the rest behind it) at the preset's typical speed, with
    headroom, instead of being killed after Serve's 20 s. Other stages keep Serve's 20 s."""
    from serving.app import DRAIN_HEADROOM, SERVE_GRACEFUL_SHUTDOWN_S, _stage_options, graceful_shutdown_seconds
    from serving.config import SimulationConfig
    from serving.models.presets import PRESETS

    config = load_config(None, environ={"DITSERVE_MODEL__PRESET": "wan2.1-t2v-14b",
                                        "DITSERVE_STAGES__DENOISER": "{max_ongoing_requests: 8}",
                                        "DITSERVE_ENGINE__MAX_BATCH": "4"})
    preset = PRESETS["wan2.1-t2v-14b"]
    job = preset.defaults.num_inference_steps * preset.typical_step_seconds  # 50 steps x 8 s
    assert graceful_shutdown_seconds(config, "denoiser") == pytest.approx(2 * job * DRAIN_HEADROOM)  # 2 batches
    assert graceful_shutdown_seconds(config, "vae_decoder") == SERVE_GRACEFUL_SHUTDOWN_S
    # The tiny model's jobs are short: never below Serve's own default.
    assert graceful_shutdown_seconds(load_config(None, environ={}), "denoiser") == SERVE_GRACEFUL_SHUTDOWN_S
    # An operator's figure wins; a simulated run compresses the derived one like every period.
    given = load_config(None, environ={"DITSERVE_STAGES__DENOISER": "{graceful_shutdown_timeout_s: 90}"})
    assert graceful_shutdown_seconds(given, "denoiser") == 90
    simulated = config.model_copy(update={"simulation": SimulationConfig(profile="h100-wan2.1-14b", time_scale=10)})
    assert graceful_shutdown_seconds(simulated, "denoiser") == pytest.approx(2 * job * DRAIN_HEADROOM / 10)
    assert _stage_options("denoiser", config.stages.denoiser, drain_s=600.0)["graceful_shutdown_timeout_s"] == 600.0


def test_serve_pushes_autoscaling_metrics_at_the_clusters_period_within_the_look_back(monkeypatch):
    """Ray 2.60's replicas and handles push autoscaling metrics at the deployment's
    `metrics_interval_s` (the environment variables that will replace it are not read yet),
    and Serve warns, and says it will refuse, a look-back no longer than that period."""
    from serving.app import _stage_options
    from serving.cluster_env import SERVE_METRICS_PUSH_ENV

    auto = "{autoscaling: {look_back_period_s: 4}}"
    config = load_config(None, environ={"DITSERVE_STAGES__VAE_DECODER": auto})
    monkeypatch.delenv(SERVE_METRICS_PUSH_ENV, raising=False)
    # Serve's own 10 s push: the default look-back holds two pushes; 4 s would hold none.
    default = load_config(None, environ={"DITSERVE_STAGES__VAE_DECODER": "{autoscaling: {}}"})
    scaling = _stage_options("vae_decoder", default.stages.vae_decoder)["autoscaling_config"]
    assert (scaling["metrics_interval_s"], scaling["look_back_period_s"]) == (10.0, 20.0)
    with pytest.raises(ConfigError, match=r"stages\.vae_decoder\.autoscaling\.look_back_period_s \(4 s\).*10 s"):
        _stage_options("vae_decoder", config.stages.vae_decoder)
    # A cluster that pushes faster (a simulated run compresses the period) is told so.
    monkeypatch.setenv(SERVE_METRICS_PUSH_ENV, "2")
    assert _stage_options("vae_decoder", config.stages.vae_decoder)["autoscaling_config"]["metrics_interval_s"] == 2.0

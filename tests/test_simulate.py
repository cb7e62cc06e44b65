"""Simulated accelerators (serving/simulate/): profiles that reproduce their published figures
and cite every number, stand-ins that wait without using CPU and return the model's shapes,
output that always says SIMULATED, the time scale, `bench profile`, and one live
`ditserve serve --simulate` on a 2-node simulated GPU cluster through the real API."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from serving.config import ServiceConfig, SimulationConfig, load_config
from serving.cost_model import job_seconds
from serving.models.presets import PRESETS
from serving.simulate.profile import CostProfile, ProfileError, load_profile, packaged_profiles

PUBLISHED = ("h100-wan2.1-1.3b", "h100-wan2.1-14b")


def sim(profile: str = "h100-wan2.1-1.3b", time_scale: float = 1.0) -> SimulationConfig:
    return SimulationConfig(profile=profile, time_scale=time_scale)


# ---- profiles ----------------------------------------------------------------------------------


def test_packaged_profiles_validate_and_every_number_has_a_source():
    assert set(PUBLISHED) | {"tiny-cpu"} <= set(packaged_profiles())
    for name in packaged_profiles():
        profile = load_profile(name)
        assert profile.unsourced() == [], f"{name}: numbers without a source"
        assert profile.model in PRESETS
        assert profile.anchors, f"{name}: no figure to reproduce"
        for source in profile.sources:
            assert source.figure and source.where and source.how
    # Published profiles never pass off a guess as measured.
    for name in PUBLISHED:
        kinds = {s.kind for s in load_profile(name).sources}
        assert "measured" not in kinds and {"published", "estimate"} <= kinds


@pytest.mark.parametrize("name", packaged_profiles())
def test_profiles_reproduce_their_anchor_figures(name):
    profile = load_profile(name)
    for anchor in profile.anchors:
        predicted = profile.predict(anchor)
        assert abs(predicted - anchor.seconds) <= anchor.tolerance * anchor.seconds, (anchor.name, predicted)


def test_the_13b_profile_gives_sglangs_h100_figure_end_to_end():
    # SGLang: Wan2.1-T2V-1.3B, 832x480, 81 frames, 50 steps, one H100: 47.8 s (within 3 %).
    profile = load_profile("h100-wan2.1-1.3b")
    seconds = job_seconds(profile, PRESETS["wan2.1-t2v-1.3b"].geometry, width=832, height=480, num_frames=81,
                          steps=50, guidance_scale=5.0, text_tokens=512)
    assert seconds.total == pytest.approx(47.8, rel=0.03)
    assert seconds.denoiser > 0.85 * seconds.total  # the DiT dominates, as published breakdowns show


def test_the_dit_time_model_is_physical():
    profile = load_profile("h100-wan2.1-14b")
    small, large = 21 * 30 * 52, 21 * 45 * 80  # 480p and 720p latent tokens
    one, two = profile.dit_forward_seconds(1, large, 512), profile.dit_forward_seconds(2, large, 512)
    assert two == pytest.approx(2 * one - profile.denoiser.overhead_s)  # rows add linearly
    # Attention is quadratic: 2.3x the tokens costs more than 2.3x the time.
    assert profile.dit_forward_seconds(1, large, 512) / profile.dit_forward_seconds(1, small, 512) > large / small


def test_a_bad_profile_is_refused_by_name(tmp_path):
    with pytest.raises(ProfileError, match="not a packaged one"):
        load_profile("h100-nonexistent")
    broken = json.loads((Path(__file__).parent.parent / "serving/simulate/profiles/h100-wan2.1-1.3b.json").read_text())
    broken["denoiser"]["per_token_s"] = -1
    (tmp_path / "bad.json").write_text(json.dumps(broken))
    with pytest.raises(ProfileError, match="per_token_s"):
        load_profile(tmp_path / "bad.json")


# ---- stand-ins ---------------------------------------------------------------------------------


def _cpu_and_wall(call):
    cpu, wall = time.process_time(), time.perf_counter()
    result = call()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def test_simulated_dit_waits_the_scaled_profile_time_without_cpu(monkeypatch):
    from serving.deployments import stage_load
    from serving.models.loading import load_transformer

    config = ServiceConfig(simulation=sim(time_scale=2.0)).model_copy()
    model_cfg = config.model.model_copy(update={"preset": "wan2.1-t2v-1.3b"})
    profile = load_profile("h100-wan2.1-1.3b")
    cold_start = profile.startup_seconds("denoiser") / 2  # 11.2 s at 2x
    # A replica that began to start 2 s ago (its imports took them) waits the rest of its cold start.
    monkeypatch.setattr(stage_load, "_started_at", time.monotonic() - 2.0)
    started = time.perf_counter()
    transformer = load_transformer(model_cfg, config.simulation)
    assert time.perf_counter() - started == pytest.approx(cold_start - 2.0, abs=0.5)
    # One whose own start-up already took longer than the profile's waits no more.
    monkeypatch.setattr(stage_load, "_started_at", time.monotonic() - 2 * cold_start)
    started = time.perf_counter()
    load_transformer(model_cfg, config.simulation)
    assert time.perf_counter() - started < 0.5
    assert transformer.simulated
    latents = torch.zeros(2, transformer.config.in_channels, 21, 60, 104)
    out, cpu, wall = _cpu_and_wall(lambda: transformer(
        hidden_states=latents, timestep=torch.tensor([500, 500]), encoder_hidden_states=torch.zeros(2, 512, 8),
        return_dict=False)[0])
    expected = profile.dit_forward_seconds(2, 21 * 30 * 52, 512) / 2
    assert out.shape == latents.shape
    assert wall == pytest.approx(expected, rel=0.15, abs=0.03)
    assert cpu < 0.1 * wall  # slept, never spun
    # Spread over a gang of 4 GPUs (stages.denoiser.parallel), a forward takes the profile's
    # time on 4; a gang size the profile has no figure for is refused, naming the ones it has.
    transformer.spread_over(4)
    _, _, wall = _cpu_and_wall(lambda: transformer(
        hidden_states=latents, timestep=torch.tensor([500, 500]), encoder_hidden_states=torch.zeros(2, 512, 8),
        return_dict=False)[0])
    assert wall == pytest.approx(expected / profile.parallel.speedup["4"], rel=0.15, abs=0.03)
    # Laid out by load, 8 rows (four guided requests) on 4 devices run as 2 whole rows on each:
    # one device's time for 2 rows, where split they would take 8 rows' time / 3.14.
    transformer.spread_over(4, policy="by_load", split_efficiency=0.8)
    eight = torch.zeros(8, transformer.config.in_channels, 21, 60, 104)
    _, _, wall = _cpu_and_wall(lambda: transformer(
        hidden_states=eight, timestep=torch.full((8,), 500), encoder_hidden_states=torch.zeros(8, 512, 8),
        return_dict=False)[0])
    assert wall == pytest.approx(expected, rel=0.15, abs=0.03)
    assert profile.dit_forward_seconds(8, 21 * 30 * 52, 512) / 2 / profile.parallel.speedup["4"] > 1.2 * expected
    assert transformer.forwards == {"split": 0, "rows": 1}
    with pytest.raises(ValueError, match=r"no figure for 3 devices \(it has 2, 4, 8\)"):
        transformer.spread_over(3)


def test_simulated_stages_keep_the_models_interface_and_shapes():
    from serving.models.loading import load_scheduler_config, load_text_encoder, load_vae
    from serving.pipeline.decode import decode
    from serving.pipeline.encode import encode_text
    from serving.pipeline.denoise import denoise_batch_step, start_denoise
    from serving.pipeline.spec import build_spec
    from serving.config import GenerationConfig
    from serving.models.loading import load_transformer

    simulation = sim(time_scale=1000.0)
    model_cfg = ServiceConfig().model.model_copy(update={"preset": "wan2.1-t2v-1.3b"})
    text = load_text_encoder(model_cfg, simulation)
    transformer = load_transformer(model_cfg, simulation)
    vae = load_vae(model_cfg, simulation)
    embeds = encode_text(text.tokenizer, text.model, ["a cat", "blurry"], 512)
    assert embeds.shape[:2] == (2, 512)
    preset = PRESETS["wan2.1-t2v-1.3b"]
    spec = build_spec(preset, GenerationConfig(), "a cat", seed=1)
    state = start_denoise(spec, load_scheduler_config(model_cfg, simulation), transformer.config.in_channels,
                          preset.geometry)
    assert tuple(state.latents.shape[2:]) == (21, 60, 104)  # real frames, height, width: real cost and batch key
    denoise_batch_step(transformer, [state], [embeds[:1]], [embeds[1:]])  # the engine's own call
    assert state.step == 1
    frames, cpu, wall = _cpu_and_wall(lambda: decode(vae, state.latents))
    assert frames.dtype == torch.uint8 and frames.shape[0] == 21 and frames.shape[-1] == 3
    assert frames.shape[2] <= 128  # a small preview, not 832 pixels wide
    assert cpu < 0.5


def test_simulated_mp4_is_valid_and_says_simulated():
    import av

    from serving.pipeline.mp4 import encode_mp4
    from serving.simulate.standins import preview_clip

    clip = preview_clip(21, 832, 480)
    frames = ((clip[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    data = encode_mp4(frames, 16, simulated_by="h100-wan2.1-1.3b")
    with av.open(io.BytesIO(data)) as container:
        assert "SIMULATED" in container.metadata["title"]
        assert "h100-wan2.1-1.3b" in container.metadata["comment"]
        decoded = list(container.decode(video=0))
    assert len(decoded) == 21 and decoded[0].width == 128
    with av.open(io.BytesIO(encode_mp4(frames, 16))) as container:  # real output carries no such claim
        assert "SIMULATED" not in container.metadata.get("title", "")


def test_video_object_and_readyz_carry_the_flag(tmp_path):
    from fastapi.testclient import TestClient

    from serving.api.app import create_api
    from serving.jobs.videos import VideoJobs

    env = {"DITSERVE_STORAGE__JOB_STORE_URL": f"sqlite:///{tmp_path}/jobs.db",
           "DITSERVE_STORAGE__ARTIFACTS_URL": str(tmp_path / "artifacts"),
           "DITSERVE_ADMISSION__MAX_QUEUE_WAIT_SECONDS": "null"}
    real = load_config(None, environ=env)
    simulated = load_config(None, environ={**env, "DITSERVE_SIMULATION__PROFILE": "h100-wan2.1-1.3b",
                                           "DITSERVE_SIMULATION__TIME_SCALE": "50"})
    answers = {}
    for label, config in (("real", real), ("simulated", simulated)):
        with TestClient(create_api(config, VideoJobs(config))) as client:
            video = client.post("/v1/videos", json={"prompt": "a cat", "size": "64x64", "seconds": "1"}).json()
            answers[label] = (video, client.get(f"/v1/videos/{video['id']}").json(),
                              client.get("/v1/videos").json()["data"][0], client.get("/readyz").json())
    created, fetched, listed, ready = answers["simulated"]
    assert created["simulated"] is fetched["simulated"] is listed["simulated"] is True
    assert ready["simulated"]["profile"] == "h100-wan2.1-1.3b" and ready["simulated"]["time_scale"] == 50
    created, fetched, listed, ready = answers["real"]
    assert created["simulated"] is fetched["simulated"] is listed["simulated"] is False
    assert ready["simulated"] is False


# ---- time scale and the simulated config ------------------------------------------------------


def test_time_scale_compresses_every_period_and_target_alike():
    from serving.simulate.cluster import simulated_config

    config = load_config(None, environ={
        "DITSERVE_SIMULATION__PROFILE": "h100-wan2.1-1.3b", "DITSERVE_SIMULATION__TIME_SCALE": "20",
        "DITSERVE_STAGES__DENOISER__AUTOSCALING__MAX_REPLICAS": "16",
        "DITSERVE_SERVER__MAX_RUNNING_JOBS": "80",  # enough to feed 16 Denoisers' batches (a config rule)
        "DITSERVE_STAGES__VAE_DECODER__TIMEOUT_SECONDS": "200"})
    scaled, scale = simulated_config(config, load_profile("h100-wan2.1-1.3b"))
    auto = scaled.stages.denoiser.autoscaling
    assert (auto.target_queue_wait_seconds, auto.upscale_delay_s, auto.downscale_delay_s, auto.look_back_period_s) \
        == (30 / 20, 5 / 20, 60 / 20, 20 / 20)
    assert scaled.stages.vae_decoder.timeout_seconds == 10
    assert scaled.admission.max_queue_wait_seconds == 30
    assert scaled.auth.requests_per_minute == 600 * 20
    assert scaled.server.lease_seconds == 3.0 and any(c.floored for c in scale.changes)  # floors are reported
    assert scaled.generation.max_seconds == config.generation.max_seconds  # video length is not time of the service
    assert scale.ray_env["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] == "0.5"
    assert scale.uncompressed(1.5) == 30
    # Stages ask for GPUs as the prod overlay does, and for almost no CPU.
    assert (scaled.stages.denoiser.num_gpus, scaled.stages.text_encoder.num_gpus) == (1.0, 0.5)
    assert scaled.stages.denoiser.num_cpus <= 0.01
    assert scaled.model.preset == "wan2.1-t2v-1.3b" and "simulated" in scaled.storage.artifacts_url


def test_simulation_config_and_flags_refuse_nonsense():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="time_scale"):
        SimulationConfig(profile="h100-wan2.1-1.3b", time_scale=0.5)
    with pytest.raises(ValidationError, match="every node needs a GPU"):
        SimulationConfig(profile="h100-wan2.1-1.3b", gpus=2, nodes=3)
    bad = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--gpus", "4"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--gpus needs --simulate" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--simulate", "nope"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "no cost profile 'nope'" in bad.stderr


def test_bench_profile_on_tiny_writes_a_loadable_profile(tmp_path):
    from serving.bench.profile import measure

    profile = measure(ServiceConfig(), repeats=1, name="tiny-test", log=lambda _: None, size_factors=(1,),
                      frame_factors=(1, 2), prompt_counts=(1, 2))
    path = tmp_path / "tiny-test.json"
    path.write_text(profile.model_dump_json(indent=2))
    loaded = load_profile(path)
    assert loaded.name == "tiny-test" and loaded.model == "tiny" and loaded.unsourced() == []
    assert all(s.kind == "measured" and "measured by ditserve bench profile on" in s.where for s in loaded.sources)
    assert loaded.dit_forward_seconds(2, 80, 128) > 0 and loaded.startup_seconds("denoiser") > 0


# ---- live: the real service on a simulated 2-node, 6-GPU cluster --------------------------------


def test_serve_simulate_runs_a_job_through_the_real_api(tmp_path):
    """The Denoiser replica is a simulated gang of 2 GPUs (stages.denoiser.parallel): Ray holds
    both for it (a placement group), and its denoise takes the profile's time on 2. (One-GPU
    replicas go through the same command in tests/test_experiment.py's and
    tests/test_node_autoscaling.py's live runs; one cluster start here covers both the API's
    view and the gang's.)"""
    import requests

    from serving.cluster_env import SERVE_CLUSTER_ENV
    from tests.conftest import _free_port, wait_ready

    gang = 2
    port = _free_port()
    gpus = 6  # 3 per node: a gang of 2 fits beside the encoder and decoder
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(DITSERVE_STORAGE__JOB_STORE_URL=f"sqlite:///{tmp_path}/jobs.db",
               DITSERVE_STORAGE__ARTIFACTS_URL=str(tmp_path / "artifacts"))
    env["DITSERVE_STAGES__DENOISER__PARALLEL"] = f"{{ulysses: {gang}}}"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    # Its own process group: nothing it starts (raylets, workers) outlives the test.
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--simulate", "h100-wan2.1-1.3b", "--gpus", str(gpus), "--nodes",
         "2", "--time-scale", "50", "--port", str(port), "--metrics-port", str(_free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=300, process=process)
        ready = requests.get(f"{url}/readyz", timeout=10).json()
        assert ready["simulated"] == {"profile": "h100-wan2.1-1.3b", "time_scale": 50.0, "gpus": gpus, "nodes": 2,
                                      "node_autoscaling": False, "node_startup_seconds": None,
                                      "node_idle_timeout_seconds": 60 / 50}  # compressed, as every time is
        [denoiser] = ready["denoisers"]
        assert denoiser["parallel"] == {"ulysses": gang, "cfg": 1, "ranks": gang, "simulated": True,
                                        "layout": "by_load", "forwards": {"split": 0, "rows": 0}}
        video = requests.post(f"{url}/v1/videos", json={"prompt": "a red circle", "seed": 3}, timeout=30).json()
        assert video["simulated"] is True and video["size"] == "832x480"
        deadline = time.monotonic() + 120
        while video["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, video
            time.sleep(0.5)
            video = requests.get(f"{url}/v1/videos/{video['id']}", timeout=10).json()
        assert video["status"] == "completed" and video["simulated"] is True
        stamps = video["timestamps"]
        # 50 steps at 0.86 s each / 50: the denoise took at least the profile's compressed time.
        # On a gang of 2 laid out by load, the guided job's two rows run one per GPU: half the
        # rows per device, so at most twice as fast.
        assert stamps["denoiser_finished_at"] - stamps["denoiser_started_at"] >= 0.9 * 50 * 0.862 / gang / 50
        content = requests.get(f"{url}/v1/videos/{video['id']}/content", timeout=30)
        assert content.status_code == 200
        import av

        with av.open(io.BytesIO(content.content)) as container:
            assert "SIMULATED" in container.metadata["title"]
        # Ray's view of the cluster, from outside (its address is in the banner): the declared
        # GPUs, and the replicas holding theirs (the Denoiser x 1 GPU per rank + encoder and decoder x 0.5).
        banner = _read_banner(process)
        address = next(line.split("Ray address: ")[1].split()[0] for line in banner if "Ray address: " in line)
        probe = subprocess.run([sys.executable, "-c", (
            "import json, os, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
            "env = ray.get(ray.remote(num_cpus=0)(lambda: dict(os.environ)).remote()); "
            "print(json.dumps([ray.cluster_resources().get('GPU'), ray.available_resources().get('GPU', 0.0), "
            "len([n for n in ray.nodes() if n['Alive']]), env]))") % address],
            capture_output=True, text=True, timeout=120, env={**env, "RAY_TMPDIR": str(tmp_path / "probe")})
        total, available, nodes, env_there = json.loads(probe.stdout.strip().splitlines()[-1])
        assert (total, nodes) == (float(gpus), 3)  # 2 GPU nodes + the head
        assert available == pytest.approx(gpus - gang - 1.0)
        # The cluster's processes (Serve's controller among them) kill an unhealthy replica at once.
        assert SERVE_CLUSTER_ENV.items() <= env_there.items()
    finally:
        process.send_signal(signal.SIGINT)  # the clean path: Serve, then the simulated cluster, shut down
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        try:  # whatever of its process group is left (a raylet that ignored the shutdown)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _read_banner(process) -> list[str]:
    """The lines `ditserve serve` printed up to its banner's end."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "Ctrl-C stops the service." in line:
            return lines
    return lines


def test_estimates_under_simulation_start_from_the_profile_the_stages_wait():
    """Admission and wait estimates price a simulated job at what its stand-ins will sleep:
    the profile's seconds, compressed by the time scale, not the preset's CPU prior."""
    from serving.config import SimulationConfig
    from serving.cost_model import job_seconds
    from serving.measured_cost import base_cost_model
    from serving.models.presets import PRESETS
    from serving.simulate.profile import load_profile

    preset = PRESETS["wan2.1-t2v-1.3b"]
    shape = dict(width=832, height=480, num_frames=81, steps=50, guidance_scale=5.0, text_tokens=512)
    profile = job_seconds(load_profile("h100-wan2.1-1.3b"), preset.geometry, **shape)
    simulated = job_seconds(base_cost_model(preset, SimulationConfig(profile="h100-wan2.1-1.3b", time_scale=50)),
                            preset.geometry, **shape)
    assert abs(simulated.total * 50 - profile.total) < 1e-6 * profile.total
    assert abs(simulated.denoiser * 50 - profile.denoiser) < 1e-6 * profile.denoiser
    prior = job_seconds(base_cost_model(preset), preset.geometry, **shape)
    assert prior.total != simulated.total


def test_a_gang_job_is_priced_at_the_gangs_device_seconds():
    """With stages.denoiser.parallel a step holds every device of the gang for 1/speedup of
    one device's time: estimates start from degree / speedup times the one-device seconds
    (the profile's speed-up when simulated, degree x split_efficiency without one); encoding
    and decoding are unchanged."""
    from serving.config import ParallelConfig, SimulationConfig
    from serving.cost_model import job_seconds
    from serving.measured_cost import base_cost_model
    from serving.models.presets import PRESETS
    from serving.simulate.profile import load_profile

    preset = PRESETS["wan2.1-t2v-1.3b"]
    shape = dict(width=832, height=480, num_frames=81, steps=50, guidance_scale=5.0, text_tokens=512)
    simulation = SimulationConfig(profile="h100-wan2.1-1.3b", time_scale=1)
    one = job_seconds(base_cost_model(preset, simulation), preset.geometry, **shape)
    four = ParallelConfig(ulysses=4)
    gang = job_seconds(base_cost_model(preset, simulation, four), preset.geometry, **shape)
    speedup = load_profile("h100-wan2.1-1.3b").parallel_speedup(4)
    assert abs(gang.denoiser - one.denoiser * 4 / speedup) < 1e-9 * one.denoiser
    assert (gang.text_encoder, gang.vae_decoder) == (one.text_encoder, one.vae_decoder)
    prior_one = job_seconds(base_cost_model(preset), preset.geometry, **shape)
    prior_gang = job_seconds(base_cost_model(preset, None, ParallelConfig(ulysses=2, split_efficiency=0.5)),
                             preset.geometry, **shape)
    assert abs(prior_gang.denoiser - prior_one.denoiser * 2 / (2 * 0.5)) < 1e-9 * prior_one.denoiser
    assert job_seconds(base_cost_model(preset, None, ParallelConfig()), preset.geometry, **shape) == prior_one


def test_simulated_step_caching_runs_the_profiles_measured_share_of_steps():
    """A caching request on simulated accelerators skips the share of steps its profile says
    (warm-up and last step always run), and waits only for the rows that run."""
    from serving.config import GenerationConfig
    from serving.pipeline.denoise import denoise_batch_step, start_denoise
    from serving.pipeline.spec import build_spec
    from serving.simulate.standins import SimulatedTransformer

    profile = load_profile("h100-wan2.1-1.3b")
    assert profile.step_cache.fraction(0.0) == 1.0
    assert profile.step_cache.fraction(0.15) == profile.step_cache.computed_fraction["0.15"]
    assert profile.step_cache.fraction(0.11) == pytest.approx((0.613 + 0.582) / 2)
    preset = PRESETS["wan2.1-t2v-1.3b"]
    transformer = SimulatedTransformer(profile, 1e6, preset.geometry)
    waits = []
    transformer.wait = waits.append
    scheduler = {"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000,
                 "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}
    computed = {}
    for cache in ("off", "balanced"):
        state = start_denoise(build_spec(preset, GenerationConfig(), "x", cache=cache), scheduler, 1, preset.geometry)
        embeds = torch.zeros(1, 512, 8)
        ran = [denoise_batch_step(transformer, [state], [embeds], [embeds])[0] for _ in range(50)]
        computed[cache] = sum(ran)
        assert ran[:5] == [True] * 5 and ran[-1]  # warm-up (a tenth) and the last step
    # 50 steps: 5 warm-up, the last, and 0.471 of the other 44 (the tiny model's measured share).
    assert computed == {"off": 50, "balanced": 26}
    assert len(waits) == 50 + 26  # a skipped step waits for nothing

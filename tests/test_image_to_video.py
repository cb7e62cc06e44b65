"""Image-to-video (issue 20): a Wan2.1-I2V preset from a local diffusers folder, its first
frame's conditioning, and the staged pipeline against diffusers' WanImageToVideoPipeline."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
from PIL import Image

from serving.config import ModelConfig, ServiceConfig
from serving.models import tiny
from serving.models.loading import ModelFolderError, check_model_folder, load_image_encoder
from serving.jobs.reference import Upload
from serving.models.presets import PRESETS, image_presets

PRESET = "wan2.1-i2v-14b-480p"
FIDELITY_ATOL = 1e-4  # as tests/test_pipeline.py: fp32, only the summation order differs
CLIP_SIZE = 32  # the toy CLIP's input: (32 / 8)^2 patches + 1 class token = 17 image tokens


def _toy_clip():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(5)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=CLIP_SIZE, patch_size=8)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE})
    return processor, encoder


def _toy_i2v_transformer() -> WanTransformer3DModel:
    torch.manual_seed(6)
    heads, head_dim = 2, 16
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=2 * tiny.LATENT_CHANNELS + 4, out_channels=tiny.LATENT_CHANNELS, text_dim=tiny.TEXT_DIM,
        freq_dim=64, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        image_dim=24, added_kv_proj_dim=heads * head_dim, rope_max_seq_len=1024).eval()


@pytest.fixture(scope="module")
def i2v_folder(tmp_path_factory, tiny_pipeline):
    """A toy Wan2.1-I2V checkpoint in the diffusers layout, written here with save_pretrained
    (the tiny preset's text encoder and VAE, a toy CLIP and an I2V-shaped DiT)."""
    folder = tmp_path_factory.mktemp("wan-i2v")
    processor, encoder = _toy_clip()
    WanImageToVideoPipeline(
        tokenizer=tiny_pipeline.text.tokenizer, text_encoder=tiny_pipeline.text.model, vae=tiny_pipeline.vae,
        scheduler=UniPCMultistepScheduler.from_config(tiny.scheduler_config()), image_processor=processor,
        image_encoder=encoder, transformer=_toy_i2v_transformer(),
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def i2v_pipeline(i2v_folder):
    from serving.pipeline.local import LocalPipeline

    return LocalPipeline(ServiceConfig(model=ModelConfig(preset=PRESET, path=str(i2v_folder), device="cpu",
                                                         dtype="float32")))


def _frame(width: int = 64, height: int = 64) -> Image.Image:
    """A first frame: a red disc on a blue-grey ground."""
    from PIL import ImageDraw

    image = Image.new("RGB", (width, height), (70, 80, 110))
    ImageDraw.Draw(image).ellipse((20, 18, 40, 38), fill=(220, 40, 30))
    return image


def test_the_i2v_presets_take_an_image_and_need_its_encoder(tmp_path, i2v_folder):
    assert image_presets() == ["tiny-i2v", "wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p"]
    assert not PRESETS["wan2.1-t2v-14b"].takes_image
    assert (PRESETS["wan2.1-i2v-14b-480p"].defaults.shift, PRESETS["wan2.1-i2v-14b-720p"].defaults.shift) == (3.0, 5.0)
    assert load_image_encoder(ModelConfig()) is None  # tiny: text only
    # A text-to-video folder is not enough for an I2V preset: the error lists what is missing.
    import shutil

    t2v = tmp_path / "t2v-only"
    shutil.copytree(i2v_folder, t2v, ignore=shutil.ignore_patterns("image_encoder", "image_processor"))
    with pytest.raises(ModelFolderError, match="image encoder config.*image encoder weights.*image processor config"):
        check_model_folder(ModelConfig(preset=PRESET, path=str(t2v)))


def test_the_first_frame_mask_marks_the_given_frame():
    from serving.models.presets import Geometry
    from serving.pipeline.image import first_frame_mask

    spec = PRESETS[PRESET]
    from serving.config import GenerationConfig
    from serving.pipeline.spec import build_spec

    spec = build_spec(PRESETS[PRESET], GenerationConfig(), "x", size="64x64", num_frames=9)
    mask = first_frame_mask(spec, Geometry())
    assert mask.shape == (1, 4, 3, 8, 8)  # 4 pixel frames per latent frame, 3 latent frames
    assert mask[:, :, 0].eq(1).all() and mask[:, :, 1:].eq(0).all()


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_final_latents_equal_diffusers_wan_image_to_video_pipeline(i2v_pipeline, guidance_scale):
    spec = i2v_pipeline.spec("the red disc rolls to the right", seed=13, guidance_scale=guidance_scale,
                             negative_prompt="blurry", num_inference_steps=5, size="64x64", num_frames=9)
    assert spec.max_sequence_length == 512  # diffusers' Wan attention splits image from text tokens at 512
    image = _frame()
    ours = i2v_pipeline.latents(spec, image=image)

    peer = WanImageToVideoPipeline(
        tokenizer=i2v_pipeline.text.tokenizer, text_encoder=i2v_pipeline.text.model, vae=i2v_pipeline.vae,
        scheduler=UniPCMultistepScheduler.from_config(i2v_pipeline.scheduler_config, flow_shift=spec.shift),
        image_processor=i2v_pipeline.image_encoder.processor, image_encoder=i2v_pipeline.image_encoder.model,
        transformer=i2v_pipeline.transformer)
    peer.set_progress_bar_config(disable=True)
    theirs = peer(
        image=image, prompt=spec.prompt, negative_prompt=spec.negative_prompt, height=spec.height, width=spec.width,
        num_frames=spec.num_frames, num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(spec.seed), output_type="latent",
        max_sequence_length=spec.max_sequence_length,
    ).frames
    assert ours.shape == theirs.shape == (1, 16, 3, 8, 8)
    assert (ours - theirs).abs().max().item() <= FIDELITY_ATOL
    # The image matters: another first frame, another video.
    other = i2v_pipeline.latents(spec, image=Image.new("RGB", (64, 64), (10, 200, 60)))
    assert (other - ours).abs().max().item() > 1e-2


def test_an_i2v_preset_needs_an_image_and_a_t2v_one_refuses_it(i2v_pipeline, tiny_pipeline):
    spec = i2v_pipeline.spec("a disc", size="64x64", num_frames=9, num_inference_steps=1)
    with pytest.raises(ValueError, match="give an image"):
        i2v_pipeline.latents(spec)
    with pytest.raises(ValueError, match="takes no image"):
        tiny_pipeline.latents(tiny_pipeline.spec("a disc"), image=_frame())


def test_step_caching_and_a_gang_carry_the_image_tokens(i2v_folder, i2v_pipeline):
    """The split forward (step caching's, and a gang's blocks) embeds the image tokens as the
    model does: uncached through it equals the model's own forward, a gang of two equals one
    device, and caching skips steps."""
    from serving.parallel.processes import run_gang

    spec = i2v_pipeline.spec("a disc", seed=8, size="64x64", num_frames=9, num_inference_steps=12)
    cached = i2v_pipeline.spec("a disc", seed=8, size="64x64", num_frames=9, num_inference_steps=12, cache="fast")
    image = _frame()
    plain = i2v_pipeline.latents(spec, image=image)
    steps = []
    skipped = i2v_pipeline.latents(cached, image=image, on_computed=steps.append)
    assert 0 < sum(steps) < len(steps)  # some steps reused their residual
    assert (skipped - plain).abs().max().item() < 0.5  # close, not equal: caching trades fidelity
    config = ServiceConfig(model=ModelConfig(preset=PRESET, path=str(i2v_folder), device="cpu", dtype="float32",
                                             attention_backend="sdpa"))
    for ulysses, cfg in ((2, 1), (1, 2)):
        found = run_gang(config, ulysses, cfg, partial(_i2v_with_blocks, spec), timeout_s=300)
        assert (found - plain).abs().max().item() <= FIDELITY_ATOL, (ulysses, cfg)


def _i2v_with_blocks(spec, pipeline, blocks):
    """Work for run_gang: the I2V job denoised with the gang's blocks."""
    from serving.pipeline.denoise import denoise

    cond, neg = pipeline.encode(spec)
    return denoise(pipeline.transformer, pipeline.scheduler_config, spec, cond, neg, pipeline.preset.geometry,
                   blocks=blocks, image=pipeline.encode_image(spec, _frame()))


def test_checkpoints_carry_the_image_conditioning(i2v_pipeline):
    from serving.pipeline.denoise import denoise_batch_step, load_state, save_state, start_denoise

    spec = i2v_pipeline.spec("a disc", seed=2, size="64x64", num_frames=9, num_inference_steps=4)
    image = i2v_pipeline.encode_image(spec, _frame())
    cond, neg = i2v_pipeline.encode(spec)
    geometry, channels = i2v_pipeline.preset.geometry, i2v_pipeline.transformer.config.out_channels
    straight = start_denoise(spec, i2v_pipeline.scheduler_config, channels, geometry, image=image)
    resumed = start_denoise(spec, i2v_pipeline.scheduler_config, channels, geometry, image=image)
    for _ in range(2):
        denoise_batch_step(i2v_pipeline.transformer, [resumed], [cond], [neg])
    resumed = load_state(save_state(resumed), spec)
    assert torch.equal(resumed.image.condition, image.condition)
    while not resumed.done:
        denoise_batch_step(i2v_pipeline.transformer, [resumed], [cond], [neg])
    while not straight.done:
        denoise_batch_step(i2v_pipeline.transformer, [straight], [cond], [neg])
    assert torch.equal(resumed.latents, straight.latents)


def test_our_attention_kernel_runs_the_image_cross_attention(i2v_folder, i2v_pipeline):
    """Our processor takes Wan2.1-I2V's cross-attention (image tokens with their own keys and
    values, added to the text's): the Triton kernel (interpreted on a CPU) gives SDPA's latents."""
    from serving.kernels.wan import KernelAttnProcessor
    from serving.pipeline.local import LocalPipeline

    kernel = LocalPipeline(ServiceConfig(model=ModelConfig(preset=PRESET, path=str(i2v_folder), device="cpu",
                                                           dtype="float32", attention_backend="triton")))
    assert {type(p) for p in kernel.transformer.attn_processors.values()} == {KernelAttnProcessor}
    spec = kernel.spec("a disc", seed=4, size="64x64", num_frames=9, num_inference_steps=2)
    found = kernel.latents(spec, image=_frame())
    expected = i2v_pipeline.latents(spec, image=_frame())
    assert (found - expected).abs().max().item() <= FIDELITY_ATOL


# ---- the first frame as a request sends it (serving/jobs/reference.py) --------------------------


def _png(image: Image.Image, **options) -> bytes:
    import io

    out = io.BytesIO()
    image.save(out, format=options.pop("format", "PNG"), **options)
    return out.getvalue()


def _refused(data: bytes, match: str, max_pixels: int = 4096 * 4096) -> None:
    from serving.jobs.reference import read_reference
    from serving.pipeline.spec import SpecError

    with pytest.raises(SpecError, match=match) as refused:
        read_reference(data, max_pixels)
    assert refused.value.field == "input_reference"


def test_a_first_frame_is_checked_and_stored_as_rgb_png():
    import base64
    import io

    from serving.jobs.reference import Upload, read_reference, reference_bytes

    frame = _frame(48, 32)
    for sent in (Upload(_png(frame, format="JPEG", quality=95)), Upload(_png(frame.convert("P"))),
                 {"image_url": "data:image/webp;base64," + base64.b64encode(_png(frame, format="WEBP")).decode()},
                 {"image_url": {"url": "data:image/png;base64," + base64.b64encode(_png(frame)).decode()}}):
        image = read_reference(reference_bytes(sent, 1 << 20), 4096 * 4096)
        assert (image.width, image.height) == (48, 32)
        with Image.open(io.BytesIO(image.png)) as stored:
            assert (stored.format, stored.mode) == ("PNG", "RGB")
    # A greyscale-with-alpha frame becomes RGB as well; EXIF rotation is applied.
    assert read_reference(_png(frame.convert("LA")), 4096 * 4096).width == 48


def test_bad_first_frames_are_refused_naming_the_field():
    from serving.jobs.reference import reference_bytes
    from serving.pipeline.spec import SpecError

    _refused(b"GIF89a not really", "is not a PNG, JPEG or WebP image")
    _refused(b"%PDF-1.7 a document", "is not a PNG, JPEG or WebP image")
    # Other formats never reach a decoder: only PNG, JPEG and WebP are tried.
    _refused(_png(Image.new("P", (8, 8)), format="GIF"), "is not a PNG, JPEG or WebP image")
    _refused(_png(Image.new("RGB", (8, 8)), format="TIFF"), "is not a PNG, JPEG or WebP image")
    _refused(_png(Image.new("I;16", (8, 8))), "pixel mode I;16")
    _refused(_png(_frame())[:200], "truncated or corrupt")
    # A decompression bomb: a small file whose header claims 5000 x 5000 pixels, refused from the
    # header before anything is decoded.
    bomb = _png(Image.new("L", (5000, 5000)))
    assert len(bomb) < 100_000
    _refused(bomb, r"5000x5000 pixels; the limit is 16777216")
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    animated = _png(frames[0], format="WEBP", save_all=True, append_images=frames[1:])
    _refused(animated, "animated")
    for sent, match in ((Upload(b"x" * 2048), "2048 bytes; the limit is 1024"),
                        ({"image_url": "https://example.com/cat.png"}, "remote image URLs are not fetched"),
                        ({"image_url": "data:image/png;base64,@@@"}, "not valid base64"),
                        ({"image_url": "data:image/png,rawbytes"}, "must be a base64 data: URL"),
                        ({"file_id": "file_123"}, "expected an image file"),
                        (Upload(b""), "empty")):
        with pytest.raises(SpecError, match=match) as refused:
            reference_bytes(sent, 1024)
        assert refused.value.field == "input_reference"


# ---- live: the service with an image-to-video preset, on the session's Ray cluster ---------------

I2V_APP = "i2v"


@pytest.fixture(scope="module")
def i2v_service(service, tmp_path_factory):
    """The service's app again at /i2v, serving the shipped tiny-i2v model."""
    from ray import serve

    from conftest import Service, wait_ready
    from serving.app import build_app
    from serving.config import load_config

    data = tmp_path_factory.mktemp("i2v-data")
    small = "{num_cpus: 0.05}"
    config = load_config(None, environ={
        "DITSERVE_MODEL__PRESET": "tiny-i2v", "DITSERVE_MODEL__DEVICE": "cpu",
        "DITSERVE_STORAGE__JOB_STORE_URL": f"sqlite:///{data}/jobs.db",
        "DITSERVE_STORAGE__ARTIFACTS_URL": str(data / "artifacts"),
        "DITSERVE_SERVER__DIRECTOR_POLL_SECONDS": "0.2",
        "DITSERVE_SERVER__GATEWAY_NUM_CPUS": "0.05", "DITSERVE_SERVER__DIRECTOR_NUM_CPUS": "0.05",
        "DITSERVE_STAGES__TEXT_ENCODER": small, "DITSERVE_STAGES__VAE_DECODER": small,
        "DITSERVE_STAGES__DENOISER": small, "DITSERVE_ENGINE__CHECKPOINT_EVERY": "5",
    })
    serve.run(build_app(config), name=I2V_APP, route_prefix=f"/{I2V_APP}")
    url = f"{service.url}/{I2V_APP}"
    wait_ready(url)
    yield Service(url, config, 0)
    serve.delete(I2V_APP)


@pytest.fixture(scope="module")
def tiny_i2v_pipeline(i2v_service):
    from serving.pipeline.local import LocalPipeline

    return LocalPipeline(i2v_service.config)


def _served_frames(mp4: bytes) -> torch.Tensor:
    import io

    import av
    import numpy as np

    with av.open(io.BytesIO(mp4)) as container:
        return torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])).float()


def test_the_sdk_uploads_a_first_frame_and_gets_its_video(i2v_service, tiny_i2v_pipeline):
    """The OpenAI SDK's multipart upload, through every stage: the served clip is the one the
    in-process pipeline makes from the same frame, prompt and seed."""
    client = i2v_service.client()
    frame = _frame()
    body = dict(prompt="the red disc rolls to the right", seconds="1", size="64x64",
                extra_body={"seed": 17, "num_inference_steps": 3})
    video = client.videos.create_and_poll(input_reference=("frame.png", _png(frame), "image/png"), **body,
                                          poll_interval_ms=200)
    assert video.status == "completed", video.error
    served = _served_frames(client.videos.download_content(video.id).read())
    spec = tiny_i2v_pipeline.spec(body["prompt"], seed=17, num_inference_steps=3, seconds=1, size="64x64")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the stage replicas run: float sums then agree, not only to rounding
    try:
        reference = _served_frames(tiny_i2v_pipeline.generate(spec, image=frame).mp4)
        other = _served_frames(tiny_i2v_pipeline.generate(spec, image=Image.new("RGB", (64, 64), (70, 80, 110))).mp4)
    finally:
        torch.set_num_threads(threads)
    assert served.shape == reference.shape
    # At most a level here and there through uint8 frames and H.264 (another thread count alone
    # moves the trained model's frames by ~0.7 on average); another first frame moves them by tens.
    assert (served - reference).abs().mean().item() < 0.5
    assert (served - other).abs().mean().item() > 10
    # The frame was the job's while it ran, and went with its other working files when it finished.
    from serving.storage import ArtifactStore

    store = ArtifactStore(i2v_service.config.storage.artifacts_url)
    assert store.keys(video.id) == sorted([f"{video.id}/video.mp4", f"{video.id}/thumbnail.webp"])


def test_held_out_first_frames_over_http_meet_the_goal(i2v_service, tiny_i2v_pipeline):
    """Issue 20 item 4 through the live API: the held-out cases' first frames uploaded with
    the SDK, the MP4s judged as the same model's frames are in process
    (tests/test_tiny_i2v.py), at least 80 % right. One seed's 12 cases, for CI's time; the
    recorded run of seeds 0-2 (35/36) is in docs/tiny-model.md."""
    from serving.models import semantic_i2v

    client = i2v_service.client()
    cases = semantic_i2v.held_out_cases((0,))
    jobs = [(client.videos.create(prompt=case.prompt, input_reference=("frame.png", _png(case.image()), "image/png"),
                                  extra_body={"seed": case.seed}), case) for case in cases]
    over_http = []
    for video, case in jobs:
        done = client.videos.poll(video.id, poll_interval_ms=200)
        assert done.status == "completed", done.error
        over_http.append((case, semantic_i2v.judge(_served_frames(client.videos.download_content(video.id).read())
                                                   .to(torch.uint8), case)))
    served = semantic_i2v.score(over_http)
    in_process = semantic_i2v.score_pipeline(tiny_i2v_pipeline, cases)
    print("\n" + semantic_i2v.report("tiny-i2v over HTTP, seed 0", served))
    print(f"in process: {in_process.correct}/{in_process.total}")
    agree = sum(a["ok"] == b["ok"] for a, b in zip(served.results, in_process.results))
    assert agree >= len(cases) - 2  # H.264 may tip a borderline clip
    assert served.fraction >= 0.8


def test_a_killed_denoiser_resumes_an_i2v_job_with_its_frame(i2v_service):
    """The conditioning survives a lost replica: the job resumes from its checkpoint and comes
    out byte for byte as an uninterrupted one."""
    import ray

    from conftest import wait_for

    client = i2v_service.client()
    every = i2v_service.config.engine.checkpoint_every
    body = dict(prompt="a disc that survives", seconds="1", size="256x256",
                input_reference=("frame.png", _png(_frame(256, 256)), "image/png"),
                extra_body={"num_inference_steps": 100, "seed": 9})
    video = client.videos.create(**body)
    wait_for(lambda: client.videos.retrieve(video.id).progress >= 5 + 85 * (2 * every + 1) // 100, timeout=180)
    [replica] = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{I2V_APP}#Denoiser#" in a["name"]]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    final = client.videos.poll(video.id, poll_interval_ms=200)
    assert final.status == "completed", final.error
    assert final.model_extra["resumed_from_step"] >= every
    again = client.videos.create_and_poll(**body, poll_interval_ms=200)
    assert again.model_extra["resumed_from_step"] is None
    assert client.videos.download_content(video.id).read() == client.videos.download_content(again.id).read()


def test_a_json_data_url_works_too_and_bad_frames_are_400s(i2v_service):
    import base64

    import requests

    url = f"{i2v_service.url}/v1/videos"
    inline = "data:image/png;base64," + base64.b64encode(_png(_frame())).decode()
    created = requests.post(url, json={"prompt": "a disc", "size": "64x64", "seconds": "1", "num_inference_steps": 1,
                                       "input_reference": {"image_url": inline}}, timeout=30)
    assert created.status_code == 200, created.text
    from serving.storage import ArtifactStore

    store = ArtifactStore(i2v_service.config.storage.artifacts_url)
    job_id = created.json()["id"]
    # Stored with the job (a queued or resumed job reads it), and deleted with it.
    assert f"{job_id}/input_reference.png" in store.keys(job_id) or created.json()["status"] != "queued"
    assert requests.delete(f"{url}/{job_id}", timeout=30).status_code == 200
    assert store.keys(job_id) == []

    for sent, match in (
        (None, "makes video from a first frame"),
        ({"image_url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}, "is not a PNG, JPEG or WebP image"),
        ({"image_url": "http://127.0.0.1:9/frame.png"}, "remote image URLs are not fetched"),
    ):
        answer = requests.post(url, json={"prompt": "a disc", "size": "64x64", "input_reference": sent}, timeout=30)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == "input_reference" and match in error["message"], error
    # Multipart as the SDK sends it, a decompression bomb: refused from its header.
    bomb = _png(Image.new("L", (5000, 5000)))
    answer = requests.post(url, data={"prompt": "a disc"}, files={"input_reference": ("bomb.png", bomb, "image/png")},
                           timeout=30)
    assert answer.status_code == 400 and "5000x5000 pixels" in answer.json()["error"]["message"]


def test_the_task_route_takes_a_first_frame_the_same_way(i2v_service):
    import requests

    from conftest import wait_for

    answer = requests.post(f"{i2v_service.url}/v1/videos/generations", data={"prompt": "a disc", "resolution": "64x64",
                                                                             "duration": "1"},
                           files={"input_reference": ("frame.jpg", _png(_frame(), format="JPEG"), "image/jpeg")},
                           timeout=30)
    assert answer.status_code == 200, answer.text
    task_id = answer.json()["task_id"]
    done = wait_for(lambda: (t := requests.get(f"{i2v_service.url}/v1/tasks/{task_id}", timeout=10).json())["status"]
                    in ("completed", "failed") and t, timeout=120, interval=0.2)
    assert done["status"] == "completed", done
    missing = requests.post(f"{i2v_service.url}/v1/videos/generations", json={"prompt": "a disc"}, timeout=30)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "input_reference"


def test_ditserve_generate_takes_an_image(tmp_path):
    import os
    import subprocess
    import sys

    frame = tmp_path / "frame.png"
    frame.write_bytes(_png(_frame()))
    env = {**os.environ, "DITSERVE_MODEL__PRESET": "tiny-i2v", "DITSERVE_MODEL__DEVICE": "cpu"}
    out = tmp_path / "clip.mp4"
    run = subprocess.run([sys.executable, "-m", "serving.cli", "generate", "a disc", "--image", str(frame),
                          "--size", "64x64", "--seconds", "1", "--steps", "2", "-o", str(out)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert _served_frames(out.read_bytes()).shape == (17, 64, 64, 3)
    missing = subprocess.run([sys.executable, "-m", "serving.cli", "generate", "a disc", "--size", "64x64"],
                             capture_output=True, text=True, timeout=300, env=env)
    assert missing.returncode == 2 and "--image: model 'tiny-i2v' makes video from a first frame" in missing.stderr


# ---- remote image_url: off unless the operator allows it, and then only where egress allows ------


def _server(**overrides):
    from serving.config import ServerConfig

    return ServerConfig(**{"fetch_image_urls": True, **overrides})


def test_every_form_of_a_remote_image_url_is_recognised():
    """The forms reference_bytes reads for data: URLs are the forms a remote URL may take,
    so an operator's fetch_image_urls covers each (and none escapes to the data: path)."""
    from serving.api.image_fetch import remote_url
    from serving.jobs.reference import Upload

    url = "https://images.example/frame.png"
    for value in ({"image_url": url}, {"image_url": {"url": url}}, url, "HTTPS://images.example/frame.png"):
        assert remote_url(value) is not None, value
    for value in ({"image_url": "data:image/png;base64,AAAA"}, "data:image/png;base64,AAAA", None, 7,
                  Upload(b"png", content_type="image/png")):
        assert remote_url(value) is None, value


def test_image_url_hosts_are_checked_before_any_connection():
    from serving.api.image_fetch import check_image_url
    from serving.pipeline.spec import SpecError

    with pytest.raises(SpecError, match="not fetched by this server"):
        check_image_url("https://images.example/frame.png", _server(fetch_image_urls=False))
    for url, kind in (("http://127.0.0.1:9/f.png", "loopback"), ("http://2130706433:9/f.png", "loopback"),
                      ("http://0x7f.1:9/f.png", "loopback"), ("http://localhost:9/f.png", "loopback"),
                      ("http://[::ffff:127.0.0.1]:9/f.png", "loopback"), ("http://169.254.169.254/latest", "link-local"),
                      ("http://10.1.2.3/f.png", "private"), ("http://[fd00::1]/f.png", "unique-local")):
        with pytest.raises(SpecError, match=kind) as refused:
            check_image_url(url, _server())
        assert refused.value.field == "input_reference"
    with pytest.raises(SpecError, match="without credentials"):
        check_image_url("http://user:pw@images.example/f.png", _server())
    for bad_name in ("http://a..b.example/f.png", f"http://{'x' * 64}.example/f.png"):
        with pytest.raises(SpecError, match="is not a valid name"):  # a 400 here, not the resolver's UnicodeError
            check_image_url(bad_name, _server())
    # A public address passes the check (nothing is fetched here), and so does a trusted network.
    assert check_image_url("https://93.184.216.34/f.png", _server()).host == "93.184.216.34"
    assert check_image_url("http://127.0.0.1:9/f.png", _server(image_url_allowed_networks=["127.0.0.0/8"]))
    # On a public host (or a name) only the listed ports: 80 and 443 unless configured.
    for other_port in ("https://93.184.216.34:8080/f.png", "http://images.example:22/f.png"):
        with pytest.raises(SpecError, match="port .* is not one this server fetches from"):
            check_image_url(other_port, _server())
    assert check_image_url("http://93.184.216.34:8080/f.png", _server(image_url_ports=[8080]))


@pytest.fixture()
def image_host():
    """A real HTTP server on loopback: /frame.png, /redirect (to a loopback port) and /huge;
    yields its base URL, the frame's bytes and the paths it was asked for."""
    import http.server
    import threading

    frame, asked = _png(_frame()), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            asked.append(self.path)
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://127.0.0.1:9/secret")
                self.end_headers()
                return
            body = frame if self.path == "/frame.png" else b"\0" * 5000
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", frame, asked
    server.shutdown()


def test_an_allowed_image_url_is_fetched_within_the_limits(image_host):
    import asyncio

    from serving.api.image_fetch import fetch_image
    from serving.pipeline.spec import SpecError

    base, frame, _ = image_host
    trusted = _server(image_url_allowed_networks=["127.0.0.1/32"], max_image_bytes=4096)
    assert asyncio.run(fetch_image(f"{base}/frame.png", trusted)).data == frame
    for path, match in (("/redirect", "HTTP 302"), ("/huge", "passed 4096 bytes")):
        with pytest.raises(SpecError, match=match):
            asyncio.run(fetch_image(f"{base}{path}", trusted))
    with pytest.raises(SpecError, match="could not be fetched"):
        asyncio.run(fetch_image("http://127.0.0.1:9/closed.png", trusted))
    # Untrusted, the same server is refused before any connection, by address.
    with pytest.raises(SpecError, match="loopback"):
        asyncio.run(fetch_image(f"{base}/frame.png", _server()))


def test_a_name_that_resolves_inside_is_refused_when_connecting(image_host):
    """DNS rebinding: a public-looking name whose answer is loopback is refused by the resolver
    the connection uses (the URL check could not know)."""
    import asyncio

    from aiohttp.abc import AbstractResolver

    from serving.api.image_fetch import fetch_image
    from serving.pipeline.spec import SpecError

    base, _, _ = image_host
    port = int(base.rsplit(":", 1)[1])

    class Rebinding(AbstractResolver):  # DNS's answer, as an attacker's name server would give it
        async def resolve(self, host, port=0, family=0):
            return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": 2, "proto": 0, "flags": 0}]

        async def close(self):
            pass

    with pytest.raises(SpecError, match="resolves only to addresses this server does not call.*loopback"):
        asyncio.run(fetch_image(f"http://images.example:{port}/frame.png", _server(image_url_ports=[port]),
                                dns=Rebinding()))


def test_a_retry_with_its_idempotency_key_does_not_fetch_the_frame_again(tmp_path, image_host):
    """The frame's URL is fetched once, when the job is made: a retry with the same
    Idempotency-Key and body gets that job even after the URL stopped answering (a presigned
    URL expires), and the key with another URL is a 409, both without a connection."""
    from fastapi.testclient import TestClient

    from serving.api.app import create_api
    from serving.config import load_config
    from serving.jobs.videos import VideoJobs

    base, _, asked = image_host
    config = load_config(None, environ={
        "DITSERVE_MODEL__PRESET": "tiny-i2v", "DITSERVE_STORAGE__JOB_STORE_URL": f"sqlite:///{tmp_path}/jobs.db",
        "DITSERVE_STORAGE__ARTIFACTS_URL": str(tmp_path / "artifacts"), "DITSERVE_SERVER__FETCH_IMAGE_URLS": "true",
        "DITSERVE_SERVER__IMAGE_URL_ALLOWED_NETWORKS": '["127.0.0.1/32"]'})
    body = {"prompt": "a disc", "input_reference": {"image_url": f"{base}/frame.png"}}
    key = {"Idempotency-Key": "retry-me"}
    with TestClient(create_api(config, VideoJobs(config)), raise_server_exceptions=False) as client:
        first = client.post("/v1/videos", json=body, headers=key)
        assert first.status_code == 200, first.text
        assert asked == ["/frame.png"]
        again = client.post("/v1/videos", json=body, headers=key)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        other = client.post("/v1/videos", json={**body, "input_reference": {"image_url": f"{base}/frame.png?v=2"}},
                            headers=key)
        assert other.status_code == 409 and other.json()["error"]["param"] == "Idempotency-Key"
        assert asked == ["/frame.png"]  # neither the retry nor the conflict connected
        # A new key fetches, and a URL that no longer answers is that request's 400.
        gone = client.post("/v1/videos", json={**body, "input_reference": {"image_url": "http://127.0.0.1:9/f.png"}},
                           headers={"Idempotency-Key": "new"})
        assert gone.status_code == 400 and "could not be fetched" in gone.json()["error"]["message"]


# ---- the frame's file, without a Director: a queued cancel, and storage that is down ------------


def test_a_cancelled_queued_job_leaves_no_frame_and_storage_down_is_a_503(tmp_path):
    """No Director here, so the job stays queued: cancelling it removes its stored frame at
    once (no driver will ever tidy it). With the file storage gone, a create that must store a
    frame is a 503 with Retry-After, not a 500."""
    import shutil

    from fastapi.testclient import TestClient

    from serving.api.app import create_api
    from serving.config import load_config
    from serving.jobs.videos import VideoJobs
    from serving.storage import ArtifactStore

    artifacts = tmp_path / "artifacts"
    config = load_config(None, environ={
        "DITSERVE_MODEL__PRESET": "tiny-i2v", "DITSERVE_STORAGE__JOB_STORE_URL": f"sqlite:///{tmp_path}/jobs.db",
        "DITSERVE_STORAGE__ARTIFACTS_URL": str(artifacts)})
    upload = {"input_reference": ("frame.png", _png(_frame()), "image/png")}
    # As a client sees it: the server's error handlers answer (no exception re-raised here).
    with TestClient(create_api(config, VideoJobs(config)), raise_server_exceptions=False) as client:
        created = client.post("/v1/videos", data={"prompt": "a disc"}, files=upload)
        assert created.status_code == 200, created.text
        job_id = created.json()["id"]
        store = ArtifactStore(str(artifacts))
        assert store.keys(job_id) == [f"{job_id}/input_reference.png"]
        cancelled = client.post(f"/v1/videos/{job_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["error"]["code"] == "cancelled"
        assert store.keys(job_id) == []

        shutil.rmtree(artifacts)
        artifacts.write_text("not a folder")  # every write under it now fails
        down = client.post("/v1/videos", data={"prompt": "a disc"}, files=upload)
        assert down.status_code == 503, down.text
        assert down.headers["Retry-After"].isdigit() and down.json()["error"]["code"] == "service_unavailable"

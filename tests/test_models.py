"""Model presets: `tiny` loads the trained weights shipped in the package, `tiny-random` is
built locally and deterministically from a seed; the wan2.1 ones load from a local
diffusers folder, with one clear error for a missing or incomplete folder."""

from __future__ import annotations

import torch
import pytest
from diffusers import UniPCMultistepScheduler, WanPipeline

from serving.config import ModelConfig, load_config
from serving.models import tiny
from serving.models.loading import (
    ModelFolderError, check_model_folder, load_scheduler_config, load_text_encoder, load_transformer, load_vae,
)
from serving.pipeline.local import LocalPipeline


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_is_built_from_diffusers_and_transformers_wan_classes(tiny_pipeline):
    assert type(tiny_pipeline.transformer).__name__ == "WanTransformer3DModel"
    assert type(tiny_pipeline.vae).__name__ == "AutoencoderKLWan"
    assert type(tiny_pipeline.text.model).__name__ == "UMT5EncoderModel"
    assert type(tiny_pipeline.text.tokenizer).__name__ == "ByT5Tokenizer"


def test_tiny_random_components_are_deterministic_and_built_alone():
    config = ModelConfig(preset="tiny-random")
    assert same_weights(load_transformer(config), load_transformer(config))
    assert same_weights(load_vae(config), load_vae(config))
    assert same_weights(load_text_encoder(config).model, load_text_encoder(config).model)
    assert not same_weights(load_transformer(config), load_transformer(ModelConfig(preset="tiny-random", seed=1)))


def test_tiny_loads_the_weights_shipped_in_the_package():
    from pathlib import Path

    import serving.models

    folder = check_model_folder(ModelConfig())
    assert folder == Path(serving.models.__file__).parent / "weights" / "tiny"
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    assert {f.suffix for f in folder.rglob("*diffusion_pytorch_model*")} == {".safetensors"}
    # Same architecture as the random variant, other weights.
    trained, random = load_transformer(ModelConfig()), load_transformer(ModelConfig(preset="tiny-random"))
    assert trained.state_dict().keys() == random.state_dict().keys()
    assert not same_weights(trained, random)


def test_building_tiny_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_vae(0)
    assert torch.equal(torch.rand(3), expected)


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory, tiny_pipeline):
    """A diffusers-format checkpoint written by the test itself with save_pretrained."""
    folder = tmp_path_factory.mktemp("wan-checkpoint")
    scheduler = UniPCMultistepScheduler.from_config(tiny.SCHEDULER_CONFIG)
    WanPipeline(tokenizer=tiny_pipeline.text.tokenizer, text_encoder=tiny_pipeline.text.model,
                vae=tiny_pipeline.vae, scheduler=scheduler, transformer=tiny_pipeline.transformer).save_pretrained(folder)
    return folder


def test_loads_a_local_diffusers_folder(saved_folder, tiny_pipeline):
    environ = {"DITSERVE_MODEL__PRESET": "wan2.1-t2v-1.3b", "DITSERVE_MODEL__PATH": str(saved_folder),
               "DITSERVE_MODEL__DTYPE": "float32"}
    config = load_config(None, environ=environ)
    loaded = LocalPipeline(config)
    assert same_weights(loaded.transformer, tiny_pipeline.transformer)
    assert same_weights(loaded.vae, tiny_pipeline.vae)
    assert same_weights(loaded.text.model, tiny_pipeline.text.model)
    assert load_scheduler_config(config.model)["_class_name"] == "UniPCMultistepScheduler"
    # The same weights give the same latents, whichever way they were loaded.
    spec = tiny_pipeline.spec("a red fox running through snow", seed=3, size="64x64", seconds=1,
                              num_inference_steps=4, negative_prompt="", fps=16)
    assert torch.allclose(loaded.latents(spec), tiny_pipeline.latents(spec), atol=1e-5)


def test_wan_preset_without_a_folder_is_a_clear_error():
    with pytest.raises(ModelFolderError, match="model.path is not set"):
        check_model_folder(ModelConfig(preset="wan2.1-t2v-14b"))


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(ModelFolderError, match=str(tmp_path / "absent")):
        check_model_folder(ModelConfig(preset="wan2.1-t2v-1.3b", path=tmp_path / "absent"))


def test_incomplete_folder_lists_everything_missing(saved_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved_folder, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(ModelFolderError) as info:
        load_transformer(ModelConfig(preset="wan2.1-t2v-1.3b", path=broken))
    message = str(info.value)
    assert "VAE weights (vae/diffusion_pytorch_model.safetensors)" in message
    assert "tokenizer (" in message
    assert "transformer" not in message.split("missing:")[1]

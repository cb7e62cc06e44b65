"""The self-check a kernel passes before it serves (serving/kernels/selfcheck.py, serving/kernels/dispatch.py):
our Triton kernel under TRITON_INTERPRET=1 passes it; a head dim or dtype the kernel refuses,
a wrong result or a non-finite one fails it, is logged once, and the next backend serves."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from serving.kernels.attention import attention
from serving.kernels.dispatch import _run, attend, choices, choose, forget_choices
from serving.kernels.selfcheck import self_check


@pytest.fixture(autouse=True)
def fresh_choices():
    forget_choices()
    yield
    forget_choices()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_our_kernel_and_sdpa_pass_at_the_wan_head_dim(dtype):
    for backend in ("triton", "sdpa"):
        assert self_check(functools.partial(_run, backend, scale=None), "cpu", dtype, 128) is None, backend


def test_a_kernel_that_ignores_padded_keys_fails():
    unmasked = lambda q, k, v, key_lengths: attention(q, k, v)  # noqa: E731  (drops key_lengths)
    reason = self_check(unmasked, "cpu", torch.float32, 64)
    assert reason is not None and "max error" in reason and "150 keys" in reason


def test_a_kernel_off_by_a_rounding_the_dtype_allows_passes_but_a_lost_rescale_fails():
    def scaled(factor):
        return lambda q, k, v, key_lengths: _run("sdpa", q, k, v, key_lengths, scale=factor / math.sqrt(q.shape[-1]))

    assert self_check(scaled(1.0), "cpu", torch.float32, 64) is None
    assert "exceeds the torch.float32 tolerance" in self_check(scaled(1.1), "cpu", torch.float32, 64)


def test_non_finite_output_and_a_wrong_shape_fail():
    nan = lambda q, k, v, key_lengths: torch.full_like(q, float("nan"))  # noqa: E731
    assert "non-finite" in self_check(nan, "cpu", torch.float32, 64)
    short = lambda q, k, v, key_lengths: q[:, :-1]  # noqa: E731
    assert "returned shape" in self_check(short, "cpu", torch.float32, 64)


def test_a_head_dim_the_kernel_refuses_falls_back_to_sdpa_logged_once(caplog):
    q = torch.randn(1, 9, 2, 512)
    k, v = torch.randn(1, 11, 2, 512), torch.randn(1, 11, 2, 512)
    with caplog.at_level("INFO", logger="ditserve.attention"):
        first = attend(q, k, v, backend="triton")
        second = attend(q, k, v, backend="triton")
    expected = _run("sdpa", q, k, v, None, None)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    refusals = [r for r in caplog.records if r.levelname == "WARNING" and "triton not used" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in caplog.records]
    assert "head_dim 512 is over 256" in refusals[0].getMessage()
    [choice] = choices()
    assert (choice.backend, choice.requested, choice.head_dim) == ("sdpa", "triton", 512)
    assert choice.passed_over[0][0] == "triton" and "self-check failed" in choice.passed_over[0][1]


def test_a_dtype_the_kernel_refuses_is_passed_over_with_the_reason():
    choice = choose("triton", "cpu", torch.float64, 64)
    assert choice.backend == "sdpa"
    assert "must share one of" in choice.passed_over[0][1]
    assert choice.to_dict()["passed_over"] == [{"backend": "triton", "reason": choice.passed_over[0][1]}]


def test_auto_on_the_cpu_passes_over_the_gpu_backends_without_running_them():
    choice = choose("auto", "cpu", torch.float32, 64)
    assert choice.backend == "sdpa"
    assert [name for name, _ in choice.passed_over] == ["triton", "xformers"]
    assert all("self-check" not in reason for _, reason in choice.passed_over)


def _tiny_dit(head_dim: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=head_dim,
                                 in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1,
                                 rope_max_seq_len=64).eval()


def test_a_dit_whose_kernel_fails_its_check_runs_on_sdpa_and_reports_why():
    """The fallback run: a DiT with a head dim our kernel refuses, asked to use it, reports
    the fallback before its first forward and then computes what diffusers' own attention does."""
    from serving.kernels.wan import attention_in_use, use_kernel_attention

    stock, ours = _tiny_dit(384), _tiny_dit(384)
    use_kernel_attention(ours, "triton")
    report = attention_in_use(ours, "triton")
    assert report["backend"] == "sdpa" and report["requested"] == "triton" and report["head_dim"] == 384
    assert "head_dim 384 is over 256" in report["passed_over"][0]["reason"]
    latents, text = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 5, 16)
    with torch.inference_mode():
        expected = stock(latents, torch.tensor([500.0]), text, return_dict=False)[0]
        actual = ours(latents, torch.tensor([500.0]), text, return_dict=False)[0]
    assert (actual - expected).abs().max().item() <= 1e-4


def test_the_tiny_dit_reports_the_backend_it_runs():
    from serving.config import ModelConfig
    from serving.models.loading import load_transformer
    from serving.kernels.wan import attention_in_use

    default = attention_in_use(load_transformer(ModelConfig()), "auto")
    assert (default["backend"], default["via"], default["head_dim"]) == ("sdpa", "diffusers' attention processor", 32)
    routed = attention_in_use(load_transformer(ModelConfig(attention_backend="triton")), "triton")
    assert (routed["backend"], routed["dtype"], routed["passed_over"]) == ("triton", "float32", [])

"""Our Triton attention kernel against the definition (CPU, TRITON_INTERPRET=1), the backend
dispatch, and the tiny Wan DiT with the kernel installed. GPU-only checks skip without CUDA."""

from __future__ import annotations

import pytest
import torch

# conftest.py sets TRITON_INTERPRET=1 before triton is first imported when there is no GPU.
from serving.kernels.attention import attention, reference_attention
from serving.kernels.dispatch import attend, choose_backend, forget_choices

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# fp32 accumulates in fp32 (IEEE dots); the half types round p to the input dtype before p@v.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (batch, seq_q, seq_k, heads, head_dim): odd lengths, lengths under one block (32 here),
# exact blocks, D = 32 / 64 / 128, batch > 1, several heads, cross-attention shapes.
SHAPES = [
    (1, 1, 1, 1, 64),
    (2, 17, 33, 3, 64),
    (1, 64, 64, 2, 128),
    (2, 31, 77, 4, 32),
    (1, 5, 130, 1, 128),
    (3, 45, 19, 2, 64),
]


def inputs(shape, dtype, seed=0):
    batch, seq_q, seq_k, heads, dim = shape
    generator = torch.Generator().manual_seed(seed)
    make = lambda seq: torch.randn(batch, seq, heads, dim, generator=generator).to(DEVICE, dtype)  # noqa: E731
    return make(seq_q), make(seq_k), make(seq_k)


def close(actual, expected, dtype):
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= TOLERANCE[dtype], f"max error {error} > {TOLERANCE[dtype]}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_reference_fp32(shape):
    q, k, v = inputs(shape, torch.float32)
    out = attention(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    close(out, reference_attention(q, k, v), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2]], ids=lambda s: "x".join(map(str, s)))
def test_equals_reference_half_types(shape, dtype):
    q, k, v = inputs(shape, dtype)
    close(attention(q, k, v), reference_attention(q, k, v), dtype)


def test_key_lengths_mask_padded_keys_and_never_read_them():
    q, k, v = inputs((3, 20, 40, 2, 64), torch.float32, seed=1)
    lengths = torch.tensor([40, 7, 33])
    for row, length in enumerate(lengths.tolist()):
        k[row, length:] = float("nan")  # a masked key must not even be looked at
        v[row, length:] = float("nan")
    out = attention(q, k, v, key_lengths=lengths)
    assert torch.isfinite(out).all()
    clean_k, clean_v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    close(out, reference_attention(q, clean_k, clean_v, key_lengths=lengths), torch.float32)


def test_tails_are_not_read_past_the_sequence():
    # k and v are views into larger buffers full of NaN past the sequence end.
    q, k, v = inputs((2, 9, 23, 3, 64), torch.float32, seed=2)
    k_big = torch.full((2, 40, 3, 64), float("nan"), device=DEVICE)
    v_big = torch.full((2, 40, 3, 64), float("nan"), device=DEVICE)
    k_big[:, :23], v_big[:, :23] = k, v
    out = attention(q, k_big[:, :23], v_big[:, :23])
    assert torch.isfinite(out).all()
    close(out, reference_attention(q, k, v), torch.float32)


def test_custom_scale():
    q, k, v = inputs((1, 12, 12, 2, 64), torch.float32, seed=3)
    close(attention(q, k, v, scale=0.3), reference_attention(q, k, v, scale=0.3), torch.float32)


@pytest.mark.parametrize("bad", [
    lambda q, k, v: (q[0], k, v, None),
    lambda q, k, v: (q, k[:, :, :1], v, None),
    lambda q, k, v: (q.double(), k.double(), v.double(), None),
    lambda q, k, v: (q, k, v, torch.tensor([0, 5])),
    lambda q, k, v: (q, k, v, torch.tensor([5])),
])
def test_bad_inputs_are_refused(bad):
    q, k, v = inputs((2, 4, 6, 2, 64), torch.float32)
    with pytest.raises(ValueError):
        attention(*bad(q, k, v))


def test_dispatch_prefers_sdpa_on_cpu_and_falls_back_with_a_reason(caplog):
    assert choose_backend("auto", "cpu", torch.float32, 64) == "sdpa"  # the interpreter is never "auto"
    assert choose_backend("triton", "cpu", torch.float32, 64) == "triton"  # asked for, under TRITON_INTERPRET
    forget_choices()
    with caplog.at_level("INFO", logger="ditserve.attention"):
        assert choose_backend("xformers", "cpu", torch.float16, 64) == "sdpa"
    assert "xformers has no CPU kernels" in caplog.text
    with pytest.raises(ValueError):
        choose_backend("flash", "cpu", torch.float32, 64)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_attend_backends_agree(backend):
    q, k, v = inputs((2, 10, 14, 2, 64), torch.float32, seed=4)
    lengths = torch.tensor([14, 3])
    close(attend(q, k, v, backend=backend, key_lengths=lengths),
          reference_attention(q, k, v, key_lengths=lengths), torch.float32)


def test_tiny_wan_dit_on_the_triton_kernel_equals_sdpa(tiny_pipeline):
    from serving.models import tiny
    from serving.kernels.wan import use_kernel_attention

    stock = tiny.build_transformer(0)
    ours = tiny.build_transformer(0)
    assert use_kernel_attention(ours, "triton") == 2 * 2  # self + cross attention in each of 2 blocks
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 16, 3, 8, 8, generator=generator)
    text = torch.randn(2, 24, tiny.TEXT_DIM, generator=generator)
    timestep = torch.tensor([900.0, 250.0])
    with torch.inference_mode():
        expected = stock(latents, timestep, text, return_dict=False)[0]
        actual = ours(latents, timestep, text, return_dict=False)[0]
    assert (actual - expected).abs().max().item() <= 1e-4


def test_model_config_installs_the_kernel_when_asked():
    from serving.kernels.wan import KernelAttnProcessor
    from serving.config import ModelConfig
    from serving.models.loading import load_transformer

    default = load_transformer(ModelConfig())  # CPU + auto: diffusers' own processor
    assert not any(isinstance(p, KernelAttnProcessor) for p in default.attn_processors.values())
    routed = load_transformer(ModelConfig(attention_backend="triton"))
    assert all(isinstance(p, KernelAttnProcessor) for p in routed.attn_processors.values())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_kernel_matches_sdpa_at_wan_shapes(dtype):
    import torch.nn.functional as F

    q, k, v = inputs((1, 4096, 4096, 12, 128), dtype, seed=6)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    close(attention(q, k, v), expected, dtype)
    q, k, v = inputs((2, 4096, 512, 12, 128), dtype, seed=7)
    lengths = torch.tensor([512, 60], device=DEVICE)
    close(attention(q, k, v, key_lengths=lengths), reference_attention(q, k, v, key_lengths=lengths), dtype)

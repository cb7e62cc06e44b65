"""Flash-attention forward in Triton, for the Wan DiT's self- and cross-attention.

The algorithm (FlashAttention: Dao et al., 2022; the structure of Triton's own fused-attention
tutorial): each program owns BLOCK_M query rows of one (batch, head). It walks the keys in
blocks of BLOCK_N, keeping for every row a running maximum `m`, a running softmax
denominator `l` and an unnormalised output `acc`. When a new block raises the maximum, the
old `l` and `acc` are rescaled by exp(m_old - m_new), so the full score matrix never
exists and the result equals softmax(q k^T * scale) v exactly (up to rounding).

Details that matter here:
- Layout is (batch, seq, heads, head_dim), the diffusers/xformers layout: strides are passed
  as they are, so no transpose copies are made.
- Any sequence length: the query tail and key tail are masked on load (`other=0`) and tail
  scores are set to -inf, so nothing is read past a sequence (or from the next head).
- `key_lengths` (one per batch row) masks padded text tokens in cross-attention: the key loop
  simply stops at that row's length.
- exp2 with the softmax scale folded into log2(e): one multiply per score, and exp2 is the
  native instruction.
- Accumulation is fp32 whatever the input dtype; fp32 inputs use IEEE (not TF32) dot products.

`attention()` is the public entry point; `reference_attention()` is the plain-torch
definition the tests compare against.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # FlashAttention's own limit; Wan uses 128


@triton.jit
def _attention_forward(
    Q, K, V, Out, KeyLengths,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    heads, seq_q, seq_k, head_dim,
    HAS_KEY_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
    WIDEN_DOT: tl.constexpr,  # interpreter only: see _interpreter_widens
):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // heads
    head = batch_head % heads

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < seq_q
    dim_ok = dims < head_dim

    q = tl.load(Q + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qs + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if WIDEN_DOT:
        q = q.to(tl.float32)

    keys = seq_k
    if HAS_KEY_LENGTHS:
        keys = tl.load(KeyLengths + batch)

    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start in range(0, keys, BLOCK_N):
        key_idx = start + cols
        key_ok = key_idx < keys
        # K is loaded transposed (BLOCK_D x BLOCK_N) so q @ k is a plain dot.
        k = tl.load(k_base + key_idx[None, :] * stride_ks + dims[:, None] * stride_kd,
                    mask=key_ok[None, :] & dim_ok[:, None], other=0.0)
        if WIDEN_DOT:
            k = k.to(tl.float32)
        if IEEE:
            scores = tl.dot(q, k, input_precision="ieee")
        else:
            scores = tl.dot(q, k)
        scores = tl.where(key_ok[None, :], scores * qk_scale, float("-inf"))

        # Online softmax: rescale what we have by how much the running maximum moved.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.math.exp2(scores - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]

        v = tl.load(v_base + key_idx[:, None] * stride_vs + dims[None, :] * stride_vd,
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        p = p.to(v.dtype)  # p @ v runs in the input dtype, as on the GPU's tensor cores
        if WIDEN_DOT:
            p, v = p.to(tl.float32), v.to(tl.float32)
        if IEEE:
            acc += tl.dot(p, v, input_precision="ieee")
        else:
            acc += tl.dot(p, v)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(Out + batch * stride_ob + head * stride_oh + rows[:, None] * stride_os + dims[None, :] * stride_od,
             acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


# Autotune configs. Hopper (H100/H200: 228 KB shared memory, 4 warpgroups) prefers 128-row
# tiles with deeper pipelines; Ampere (A100: 164 KB) the same tiles with fewer stages, and
# smaller key blocks at head dim 128. The tuner keeps whichever is fastest on the device.
_CONFIGS = [
    # Hopper-leaning
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    # Ampere-leaning
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=2),
]

_attention_forward_tuned = triton.autotune(configs=_CONFIGS, key=["seq_q", "seq_k", "BLOCK_D", "IEEE", "WIDEN_DOT"])(
    _attention_forward)

# Under TRITON_INTERPRET=1 (CPU tests) every tuning run is slow numpy: one small config.
_INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_widens(dtype: torch.dtype) -> bool:
    # Triton's CPU interpreter multiplies bf16 dot operands as raw integers (seen with triton
    # 3.9: errors of 1e10), so under TRITON_INTERPRET=1 bf16 values, already rounded to bf16,
    # are widened to fp32 for the dot alone. Compiled GPU code never takes this path.
    return interpreting() and dtype == torch.bfloat16


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over (batch, seq, heads, head_dim) tensors.

    q: (B, Sq, H, D); k, v: (B, Sk, H, D); key_lengths: optional (B,) ints in [1, Sk]; keys at
    or past a row's length are ignored. scale defaults to 1/sqrt(D). Returns (B, Sq, H, D).
    """
    _check(q, k, v, key_lengths)
    batch, seq_q, heads, head_dim = q.shape
    seq_k = k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty_like(q)
    lengths = key_lengths.to(device=q.device, dtype=torch.int32).contiguous() if key_lengths is not None else q
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs >= 16; padded dims are masked
    args = (q, k, v, out, lengths, scale * LOG2E, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            heads, seq_q, seq_k, head_dim)
    flags = dict(HAS_KEY_LENGTHS=key_lengths is not None, BLOCK_D=block_d, IEEE=q.dtype == torch.float32,
                 WIDEN_DOT=_interpreter_widens(q.dtype))
    if interpreting():
        grid = (triton.cdiv(seq_q, _INTERPRET_BLOCKS["BLOCK_M"]), batch * heads)
        _attention_forward[grid](*args, **flags, **_INTERPRET_BLOCKS)
    else:
        grid = lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _attention_forward_tuned[grid](*args, **flags)
    return out


def _check(q, k, v, key_lengths) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected (batch, seq, heads, head_dim) tensors, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share batch, heads "
                         "and head_dim, and k and v their shape")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q, k, v must share one of {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[-1]} is over {MAX_HEAD_DIM}: a query tile and its accumulator would "
                         "not fit in a streaming multiprocessor's registers and shared memory")
    if k.shape[1] == 0:
        raise ValueError("there must be at least one key")
    if key_lengths is not None:
        if key_lengths.shape != (q.shape[0],):
            raise ValueError(f"key_lengths must have shape ({q.shape[0]},), got {tuple(key_lengths.shape)}")
        if int(key_lengths.min()) < 1 or int(key_lengths.max()) > k.shape[1]:
            raise ValueError(f"key_lengths must lie in [1, {k.shape[1]}]")


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor | None = None,
                        scale: float | None = None) -> torch.Tensor:
    """The definition (serving/kernels/selfcheck.py, float64), in q's dtype: what `attention` must equal."""
    from serving.kernels.selfcheck import definition

    return definition(q, k, v, key_lengths, scale).to(q.dtype)

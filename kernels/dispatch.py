"""Which attention runs: our Triton kernel, xformers, or torch SDPA.

One function, `attend`, for every caller. The backend comes from the config
(`model.attention_backend`: auto | triton | xformers | sdpa) and from what this machine can
do: Triton needs CUDA (or TRITON_INTERPRET=1, for the CPU tests); xformers must import and
actually run this dtype and head size. A choice is logged once per (request, device, dtype,
head size); a fallback is logged with its reason. SDPA always works and is the last resort.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Literal

import torch
import torch.nn.functional as F

logger = logging.getLogger("ditserve.attention")

Backend = Literal["auto", "triton", "xformers", "sdpa"]
BACKENDS = ("auto", "triton", "xformers", "sdpa")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Backend = "auto",
           key_lengths: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention over (batch, seq, heads, head_dim) tensors with the chosen backend."""
    chosen = choose_backend(backend, q.device.type, q.dtype, q.shape[-1])
    if chosen == "triton":
        from kernels.attention import attention

        return attention(q, k, v, key_lengths=key_lengths, scale=scale)
    if chosen == "xformers":
        return _xformers(q, k, v, key_lengths, scale)
    return _sdpa(q, k, v, key_lengths, scale)


@functools.lru_cache(maxsize=None)
def choose_backend(requested: Backend, device: str, dtype: torch.dtype, head_dim: int) -> str:
    if requested not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {requested!r}")
    wanted = ["triton", "xformers", "sdpa"] if requested == "auto" else [requested, "sdpa"]
    for name in wanted:
        reason = _unavailable(name, device, dtype, head_dim, explicit=name == requested)
        if reason is None:
            logger.info("attention backend: %s (asked for %s; %s, %s, head_dim %d)", name, requested, device,
                        dtype, head_dim)
            return name
        log = logger.warning if name == requested else logger.info
        log("attention backend %s not used: %s", name, reason)
    raise AssertionError("sdpa is always available")


def _unavailable(name: str, device: str, dtype: torch.dtype, head_dim: int, explicit: bool) -> str | None:
    """None if `name` can run here, else why not."""
    if name == "sdpa":
        return None
    if name == "triton":
        # The interpreter is for tests: only an explicit request gets it, never "auto".
        interpreting = explicit and os.environ.get("TRITON_INTERPRET") == "1"
        if device != "cuda" and not interpreting:
            return f"needs a CUDA device (this is {device}; TRITON_INTERPRET=1 runs it on the CPU, slowly)"
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return f"triton is not importable ({exc})"
        from kernels.attention import SUPPORTED_DTYPES

        if dtype not in SUPPORTED_DTYPES:
            return f"dtype {dtype} is not supported"
        return None
    if name == "xformers":
        if device != "cuda":
            return "xformers has no CPU kernels"
        try:
            import xformers.ops  # noqa: F401
        except Exception as exc:  # ImportError, or a build for another torch/CUDA
            return f"xformers is not importable ({type(exc).__name__}: {exc})"
        try:  # capability tables lie less than a real call does
            probe = torch.zeros(1, 16, 1, head_dim, device=device, dtype=dtype)
            _xformers(probe, probe, probe, None, None)
        except Exception as exc:
            return f"xformers cannot run {dtype} with head_dim {head_dim} here ({type(exc).__name__}: {exc})"
        return None
    return f"unknown backend {name!r}"


def _sdpa(q, k, v, key_lengths, scale) -> torch.Tensor:
    mask = None
    if key_lengths is not None:
        keep = torch.arange(k.shape[1], device=k.device)[None, :] < key_lengths.to(k.device)[:, None]
        mask = keep[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def _xformers(q, k, v, key_lengths, scale) -> torch.Tensor:
    import xformers.ops as xops

    bias = None
    if key_lengths is not None:
        from xformers.ops.fmha.attn_bias import BlockDiagonalPaddedKeysMask

        batch, seq_q, seq_k = q.shape[0], q.shape[1], k.shape[1]
        bias = BlockDiagonalPaddedKeysMask.from_seqlens(q_seqlen=[seq_q] * batch, kv_padding=seq_k,
                                                        kv_seqlen=key_lengths.tolist())
        q = q.reshape(1, batch * seq_q, *q.shape[2:])
        out = xops.memory_efficient_attention(q, k.reshape(1, batch * seq_k, *k.shape[2:]),
                                              v.reshape(1, batch * seq_k, *v.shape[2:]), attn_bias=bias, scale=scale)
        return out.reshape(batch, seq_q, *out.shape[2:])
    return xops.memory_efficient_attention(q, k, v, scale=scale)

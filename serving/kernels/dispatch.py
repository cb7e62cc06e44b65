"""Which attention runs: our Triton kernel, xformers, or torch SDPA.

One function, `attend`, for every caller. The backend comes from the config
(`model.attention_backend`: auto | triton | xformers | sdpa) and from what this machine can
do: Triton needs CUDA (or TRITON_INTERPRET=1, for the CPU tests); xformers must import. A
backend that can run here must then pass its self-check (serving/kernels/selfcheck.py: probe shapes
against the float64 definition) before any request's attention runs on it, once per
(device, dtype, head dim). The choice is logged once, a fallback with its reason, and kept
in `choices()` for the Denoiser's /readyz report and metrics. SDPA is the last resort and
is not checked: it is the reference every other backend is measured against.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from serving.kernels.selfcheck import self_check

logger = logging.getLogger("ditserve.attention")

Backend = Literal["auto", "triton", "xformers", "sdpa"]
BACKENDS = ("auto", "triton", "xformers", "sdpa")


@dataclass(frozen=True)
class Choice:
    """The backend serving one (device, dtype, head dim), and why the ones before it did not."""

    requested: str
    backend: str
    device: str
    dtype: str
    head_dim: int
    passed_over: tuple[tuple[str, str], ...] = field(default=())  # (backend, reason), in the order tried

    def to_dict(self) -> dict:
        return {"backend": self.backend, "requested": self.requested, "device": self.device, "dtype": self.dtype,
                "head_dim": self.head_dim, "passed_over": [{"backend": b, "reason": r} for b, r in self.passed_over]}


_chosen: dict[tuple, Choice] = {}


def choices() -> list[Choice]:
    """Every choice this process has made, oldest first."""
    return list(_chosen.values())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Backend = "auto",
           key_lengths: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention over (batch, seq, heads, head_dim) tensors with the chosen backend."""
    chosen = choose_backend(backend, str(q.device), q.dtype, q.shape[-1])
    return _run(chosen, q, k, v, key_lengths, scale)


def choose_backend(requested: Backend, device: str, dtype: torch.dtype, head_dim: int) -> str:
    return choose(requested, device, dtype, head_dim).backend


@functools.lru_cache(maxsize=None)
def choose(requested: Backend, device: str, dtype: torch.dtype, head_dim: int) -> Choice:
    """The first backend, in order of preference, that can run here and passes its self-check."""
    if requested not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {requested!r}")
    wanted = ["triton", "xformers", "sdpa"] if requested == "auto" else [requested, "sdpa"]
    passed_over: list[tuple[str, str]] = []
    for name in dict.fromkeys(wanted):
        reason = _unavailable(name, device, dtype, head_dim, explicit=name == requested)
        if reason is None and name != "sdpa":
            failure = self_check(functools.partial(_run, name, scale=None), device, dtype, head_dim)
            reason = None if failure is None else f"self-check failed: {failure}"
        if reason is None:
            choice = Choice(requested, name, device, str(dtype).removeprefix("torch."), head_dim, tuple(passed_over))
            _chosen[(device, dtype, head_dim, requested)] = choice
            logger.info("attention backend: %s (asked for %s; %s, %s, head_dim %d)", name, requested, device,
                        dtype, head_dim)
            return choice
        passed_over.append((name, reason))
        log = logger.warning if name == requested else logger.info
        log("attention backend %s not used for %s, %s, head_dim %d: %s", name, device, dtype, head_dim, reason)
    raise AssertionError("sdpa is always available")


def forget_choices() -> None:
    """Choose afresh at the next use (tests; a process serves one model on one device)."""
    choose.cache_clear()
    _chosen.clear()


def _run(name: str, q, k, v, key_lengths, scale) -> torch.Tensor:
    if name == "triton":
        from serving.kernels.attention import attention

        return attention(q, k, v, key_lengths=key_lengths, scale=scale)
    if name == "xformers":
        return _xformers(q, k, v, key_lengths, scale)
    return _sdpa(q, k, v, key_lengths, scale)


def _unavailable(name: str, device: str, dtype: torch.dtype, head_dim: int, explicit: bool) -> str | None:
    """None if `name` can be tried here, else why not. Whether it computes correctly is the
    self-check's question, not this one's."""
    kind = device.split(":")[0]
    if name == "sdpa":
        return None
    if name == "triton":
        # The interpreter is for tests: only an explicit request gets it, never "auto".
        interpreting = explicit and os.environ.get("TRITON_INTERPRET") == "1"
        if kind != "cuda" and not interpreting:
            return f"needs a CUDA device (this is {device}; TRITON_INTERPRET=1 runs it on the CPU, slowly)"
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return f"triton is not importable ({exc})"
        return None
    if name == "xformers":
        if kind != "cuda":
            return "xformers has no CPU kernels"
        try:
            import xformers.ops  # noqa: F401
        except Exception as exc:  # ImportError, or a build for another torch/CUDA
            return f"xformers is not importable ({type(exc).__name__}: {exc})"
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

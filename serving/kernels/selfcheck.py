"""A backend proves itself before it serves: the self-check `kernels.dispatch` runs once per
(device, dtype, head dim) before any request's attention runs on that backend.

It runs the backend on a few probe shapes chosen to hit the places a flash-attention kernel
goes wrong — lengths that are not a multiple of any block size, a query tail longer than the
keys, padded keys masked per batch row, several heads, the model's own head dim — and
compares each output with the definition computed in float64 on the same inputs. A compile
error, a launch failure, a wrong shape, a non-finite value or an error beyond the dtype's
tolerance is a failed check, returned as a one-line reason; the dispatcher logs it once and
serves with the next backend.

Tolerances are max absolute errors on unit-normal inputs: what a correct fp32-accumulating
kernel stays well inside (the half types round the softmax weights to the input dtype before
p @ v, as tensor-core kernels do; tests/test_kernels.py holds our kernel to tighter bounds),
and what a wrong mask, a wrong tail or a lost rescale exceeds by orders of magnitude.
"""

from __future__ import annotations

from typing import Callable

import torch

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}

# (batch, query tokens, key tokens, heads, key lengths per row or None)
PROBES = (
    (1, 37, 37, 2, None),          # self-attention, odd length under and over one block
    (2, 45, 150, 2, (150, 19)),    # cross-attention shape with padded keys masked per row
    (1, 129, 7, 1, None),          # many queries over a few keys: the tails differ
)

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def definition(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor | None = None,
               scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v in float64 over (batch, seq, heads, head_dim): what every
    backend must equal. Keys at or past a row's `key_lengths` are ignored; scale defaults to
    1/sqrt(head_dim). Lives here, not beside the Triton kernel, so checking xformers needs no triton."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = qd @ kd.transpose(-1, -2) * scale
    if key_lengths is not None:
        keep = torch.arange(k.shape[1], device=k.device)[None, :] < key_lengths.to(k.device)[:, None]
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ vd).transpose(1, 2)


def self_check(run: Attention, device: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when `run` computes attention correctly here, else why not (one line)."""
    generator = torch.Generator().manual_seed(0)
    for batch, seq_q, seq_k, heads, lengths in PROBES:
        shape = f"(batch {batch}, {seq_q} queries, {seq_k} keys, {heads} heads, head_dim {head_dim})"

        def make(seq: int) -> torch.Tensor:
            return torch.randn(batch, seq, heads, head_dim, generator=generator).to(device=device, dtype=dtype)

        q, k, v = make(seq_q), make(seq_k), make(seq_k)
        key_lengths = torch.tensor(lengths, device=device) if lengths is not None else None
        try:
            out = run(q, k, v, key_lengths)
            if str(device).startswith("cuda"):
                torch.cuda.synchronize(device)  # a launch failure surfaces here, not at the call
        except Exception as exc:  # compile errors, launch failures, refused shapes or dtypes
            return f"failed to run at {shape}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if tuple(out.shape) != tuple(q.shape):
            return f"returned shape {tuple(out.shape)} for queries of shape {tuple(q.shape)} at {shape}"
        if not torch.isfinite(out).all():
            return f"returned non-finite values at {shape}"
        tolerance = TOLERANCE.get(dtype)
        if tolerance is None:
            return f"no tolerance is defined for {dtype} (only for {', '.join(map(str, TOLERANCE))})"
        error = (out.double() - definition(q, k, v, key_lengths)).abs().max().item()
        if error > tolerance:
            return f"max error {error:.3g} exceeds the {dtype} tolerance {tolerance:g} at {shape}"
    return None

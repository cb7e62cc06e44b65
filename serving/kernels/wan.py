"""Glue that makes the diffusers Wan DiT run its attention through `kernels.dispatch.attend`.

`KernelAttnProcessor` is an attention processor for diffusers' `WanAttention` (text-to-video
Wan2.1: self-attention with rotary embeddings, and cross-attention to the text). It does what
diffusers' own processor does around the attention call: q/k/v projections, the q/k RMS
norms across heads, splitting heads, rotary embedding on q and k, and the output projection.
Only the attention itself changes. `use_kernel_attention(transformer, backend)` installs it
on every attention module.

Text padding: Wan2.1 attends over all 512 text positions (padded ones are zero vectors), so
this processor passes no key lengths, to stay the same model. `kernels.attention` supports
masking for models that want it.
"""

from __future__ import annotations

from functools import partial

import torch

from serving.kernels.dispatch import Backend, attend
from serving.models.presets import I2V_TEXT_TOKENS


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs (x0, x1), (x2, x3), ... of the last dim, the
    convention Wan's rotary table (cos/sin repeated per pair) is built for."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KernelAttnProcessor:
    """`sequence`: this replica's Ulysses group (serving/parallel/ulysses.py), when its tokens
    are split across a gang of devices; self-attention then runs over the whole sequence
    for a share of the heads. Cross-attention needs no exchange (every rank holds the text)."""

    def __init__(self, backend: Backend = "auto", sequence=None):
        self.backend = backend
        self.sequence = sequence

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("Wan2.1 passes no attention mask")
        from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections

        image = None
        if attn.add_k_proj is not None and encoder_hidden_states is not None:
            # Wan2.1-I2V's cross-attention: the image tokens come before the text's (whose length
            # Wan fixes at 512, as diffusers' own processor assumes).
            split = encoder_hidden_states.shape[1] - I2V_TEXT_TOKENS
            image, encoder_hidden_states = encoder_hidden_states[:, :split], encoder_hidden_states[:, split:]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = _get_qkv_projections(attn, hidden_states, context)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
        if self.sequence is not None and encoder_hidden_states is None:
            out = self.sequence.attend(partial(attend, backend=self.backend), query, key, value)
        else:
            out = attend(query, key, value, backend=self.backend)
        out = out.flatten(2, 3).type_as(query)
        if image is not None:  # and to the image tokens, with their own keys and values, added
            key_image, value_image = _get_added_kv_projections(attn, image)
            key_image = attn.norm_added_k(key_image).unflatten(2, (attn.heads, -1))
            value_image = value_image.unflatten(2, (attn.heads, -1))
            out = out + attend(query, key_image, value_image, backend=self.backend).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def use_kernel_attention(transformer: torch.nn.Module, backend: Backend = "auto", sequence=None) -> int:
    """Route every Wan attention module of `transformer` through `attend` (split across
    `sequence`'s ranks when given); returns how many."""
    from diffusers.models.transformers.transformer_wan import WanAttention

    processor = KernelAttnProcessor(backend, sequence)
    modules = [m for m in transformer.modules() if isinstance(m, WanAttention)]
    for module in modules:
        module.set_processor(processor)
    return len(modules)


def attention_in_use(transformer: torch.nn.Module, requested: Backend) -> dict:
    """Which attention `transformer` runs, as reported by a Denoiser replica. When its
    attention goes through `attend`, the backend is chosen now, self-check included (see
    serving/kernels/dispatch.py), so the replica knows it before its first request."""
    from serving.kernels.dispatch import choose

    param = next(transformer.parameters())
    device, dtype, head_dim = str(param.device), param.dtype, int(transformer.config.attention_head_dim)
    routed = [p for p in transformer.attn_processors.values() if isinstance(p, KernelAttnProcessor)]
    if routed:
        return choose(routed[0].backend, device, dtype, head_dim).to_dict()
    # Not routed (sdpa asked for, or "auto" off CUDA): diffusers' own processor, which calls SDPA.
    return {"backend": "sdpa", "requested": requested, "device": device, "dtype": str(dtype).removeprefix("torch."),
            "head_dim": head_dim, "passed_over": [], "via": "diffusers' attention processor"}

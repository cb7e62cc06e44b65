"""Text encoding: prompts -> UMT5 embeddings, exactly as Wan2.1 prepares them.

Each prompt is cleaned the way diffusers' WanPipeline cleans it, tokenized to
`max_sequence_length`, encoded, and the positions past its real tokens are zeroed (Wan
attends over the zero rows rather than masking them, so the zeros are part of the model).
"""

from __future__ import annotations

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean


@torch.inference_mode()
def encode_text(tokenizer, text_encoder: torch.nn.Module, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
    """Return embeddings of shape (len(prompts), max_sequence_length, d_model) on the encoder's device."""
    cleaned = [prompt_clean(p) for p in prompts]
    tokens = tokenizer(
        cleaned, padding="max_length", max_length=max_sequence_length, truncation=True,
        add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    mask = tokens.attention_mask.to(device)
    hidden = text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


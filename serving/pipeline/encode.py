"""Text encoding: prompts -> UMT5 embeddings, exactly as Wan2.1 prepares them.

Each prompt is cleaned the way diffusers' WanPipeline cleans it, tokenized to
`max_sequence_length`, encoded, and the positions past its real tokens are zeroed (Wan
attends over the zero rows rather than masking them, so the zeros are part of the model).
"""

from __future__ import annotations

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean


def tokenize(tokenizer, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), each (len(prompts), max_sequence_length), of the cleaned prompts."""
    tokens = tokenizer(
        [prompt_clean(p) for p in prompts], padding="max_length", max_length=max_sequence_length, truncation=True,
        add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )
    return tokens.input_ids, tokens.attention_mask


def zero_padding(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows past each prompt's real tokens set to zero."""
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


@torch.inference_mode()
def encode_text(tokenizer, text_encoder: torch.nn.Module, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
    """Return embeddings of shape (len(prompts), max_sequence_length, d_model) on the encoder's device."""
    ids, mask = tokenize(tokenizer, prompts, max_sequence_length)
    device = next(text_encoder.parameters()).device
    mask = mask.to(device)
    return zero_padding(text_encoder(ids.to(device), mask).last_hidden_state, mask)

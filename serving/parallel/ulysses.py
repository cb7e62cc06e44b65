"""Ulysses sequence parallelism around attention (DeepSpeed-Ulysses, Jacobs et al. 2023).

Between attentions every rank of a sequence group holds a contiguous slice of the tokens
with all heads. Self-attention needs every token, so around it one all-to-all trades the
split: each rank sends head group j of its tokens to rank j and receives its own head group
for every token; attention then runs on (all tokens, H/U heads), which is exactly the model's
attention for those heads; a second all-to-all trades back. Everything else in a DiT block
(norms, projections, MLP, cross-attention to the text, whose keys every rank holds) works
token by token and needs no communication.

Slices may be uneven: a sequence of S tokens over U ranks gives the first S mod U ranks one
token more, and the all-to-alls carry per-rank split sizes. So any frame count and
resolution runs; only the head count must divide by U (checked where the gang is formed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def shard_sizes(length: int, parts: int) -> list[int]:
    """Contiguous, near-equal slices: the first `length % parts` get one more."""
    base, extra = divmod(length, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def shard_bounds(length: int, parts: int, index: int) -> tuple[int, int]:
    sizes = shard_sizes(length, parts)
    start = sum(sizes[:index])
    return start, start + sizes[index]


@dataclass
class SequenceGroup:
    """The ranks that split one forward's tokens between them."""

    group: dist.ProcessGroup
    rank: int  # this rank's place in the group
    size: int
    length: int = 0  # tokens of the whole sequence in the forward now running (set per forward)
    active: bool = True  # False while a forward runs whole rows per rank (serving/parallel/layout.py)

    @property
    def sizes(self) -> list[int]:
        return shard_sizes(self.length, self.size)

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, my tokens, H, D) -> (B, all tokens, my H/U heads, D)."""
        batch, mine, heads, dim = x.shape
        per = heads // self.size
        send = x.reshape(batch, mine, self.size, per, dim).permute(2, 1, 0, 3, 4).reshape(self.size * mine, batch, per, dim)
        received = send.new_empty(self.length, batch, per, dim)
        dist.all_to_all_single(received, send.contiguous(), output_split_sizes=self.sizes,
                               input_split_sizes=[mine] * self.size, group=self.group)
        return received.permute(1, 0, 2, 3)

    def to_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """(B, all tokens, my H/U heads, D) -> (B, my tokens, H, D): the inverse of `to_heads`."""
        batch, _, per, dim = y.shape
        mine = self.sizes[self.rank]
        received = y.new_empty(self.size * mine, batch, per, dim)
        dist.all_to_all_single(received, y.permute(1, 0, 2, 3).contiguous(), output_split_sizes=[mine] * self.size,
                               input_split_sizes=self.sizes, group=self.group)
        return received.reshape(self.size, mine, batch, per, dim).permute(2, 1, 0, 3, 4).reshape(batch, mine, -1, dim)

    def attend(self, attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`attention(q, k, v)` over the whole sequence, from this rank's slice of it (which
        is the whole sequence when the group is not active)."""
        if not self.active:
            return attention(q, k, v)
        return self.to_tokens(attention(self.to_heads(q), self.to_heads(k), self.to_heads(v)))

"""A gang: the devices one Denoiser replica owns, and how one DiT forward splits over them.

The gang is a (cfg x ulysses) device mesh (torch.distributed's `init_device_mesh`; gloo on
CPUs, NCCL on GPUs). Every rank holds the whole model. For one forward:

- every rank embeds the batch (patch embedding, timestep and text embedding, rotary table):
  cheap, and it saves shipping activations between ranks;
- CFG parallel: the batch's rows are split between the `cfg` groups (a guided request's
  conditional and unconditional rows land on different groups when it runs alone; a batch of
  many requests splits evenly whatever its mix). A group with no rows waits for the gather;
- Ulysses: inside a group, the tokens are split between its ranks and attention trades
  tokens for heads (serving/parallel/ulysses.py);
- after the last block the slices are gathered (tokens within a group, then rows across
  groups), so every rank ends with the blocks' whole output.

That is the "split" layout. With many rows at hand (a batch of several requests, at peak)
the gang runs the "rows" layout instead: each rank takes whole rows of its own, no exchange
inside the blocks, one gather of rows at the end. The leader picks per forward
(serving/parallel/layout.py) and sends the choice with the inputs.

Only the blocks are split. Whatever runs around them (step caching's decisions and residuals,
the output projection, guidance, the scheduler step) runs on the leader, unchanged: so a
gang computes the same latents as one device, up to float rounding (tests/test_parallel.py).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from serving.parallel.layout import Layout, choose_layout
from serving.parallel.ulysses import SequenceGroup, shard_bounds, shard_sizes


class GangError(RuntimeError):
    """A member of the gang failed or is gone: the replica cannot run a forward any more."""


@dataclass
class Gang:
    ulysses: int
    cfg: int
    rank: int  # in the whole gang: cfg_rank * ulysses + sequence rank
    sequence: SequenceGroup  # the ranks splitting tokens with this one
    rows_group: dist.ProcessGroup | None  # the ranks holding the same token slice of other rows
    device: torch.device
    policy: str = "by_load"  # stages.denoiser.parallel.layout
    split_efficiency: float = 0.8
    forwards: dict = field(default_factory=lambda: {"split": 0, "rows": 0})  # per layout, the leader's count

    @property
    def degree(self) -> int:
        return self.ulysses * self.cfg

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.ulysses

    @classmethod
    def form(cls, ulysses: int, cfg: int, rank: int, address: str, port: int, device: torch.device,
             timeout_s: float = 120.0, policy: str = "by_load", split_efficiency: float = 0.8) -> "Gang":
        """Join the gang's process group (every member calls this, rank 0 listening on
        `address:port`) and build its (cfg, ulysses) mesh."""
        from torch.distributed.device_mesh import init_device_mesh

        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank,
                                world_size=ulysses * cfg, timeout=datetime.timedelta(seconds=timeout_s))
        mesh = init_device_mesh(device.type, (cfg, ulysses), mesh_dim_names=("cfg", "ulysses"))
        sequence = SequenceGroup(group=mesh["ulysses"].get_group(), rank=rank % ulysses, size=ulysses)
        return cls(ulysses=ulysses, cfg=cfg, rank=rank, sequence=sequence,
                   rows_group=mesh["cfg"].get_group() if cfg > 1 else None, device=device,
                   policy=policy, split_efficiency=split_efficiency)

    def install(self, transformer: torch.nn.Module, backend: str) -> None:
        """Route the DiT's attention through our processor with this gang's all-to-all."""
        heads = int(transformer.config.num_attention_heads)
        if heads % self.ulysses:
            raise GangError(f"parallel.ulysses={self.ulysses} must divide the model's {heads} attention heads")
        from serving.kernels.wan import use_kernel_attention

        # As serving/models/loading.py: "auto" means our kernels on CUDA, SDPA elsewhere.
        if backend == "auto" and self.device.type != "cuda":
            backend = "sdpa"
        use_kernel_attention(transformer, backend, sequence=self.sequence if self.ulysses > 1 else None)

    @torch.inference_mode()
    def blocks(self, transformer: torch.nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor,
               encoder_hidden_states: torch.Tensor, image_embeds: torch.Tensor | None = None,
               layout: Layout = "split") -> torch.Tensor:
        """The output of the DiT's blocks for these rows, (rows, tokens, dim), computed by the
        whole gang in `layout`: every member calls this with the same inputs."""
        t = transformer
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = t.config.patch_size
        length = (frames // p_t) * (height // p_h) * (width // p_w)
        if layout == "rows":  # whole rows per rank, gathered over the gang
            first, last = shard_bounds(batch, self.degree, self.rank)
            self.sequence.length, self.sequence.active = length, False
            try:
                y = self._run(t, hidden_states, timestep, encoder_hidden_states, image_embeds, first, last, 0, length)
            finally:
                self.sequence.active = True
            return _gather(y, 0, shard_sizes(batch, self.degree), dist.group.WORLD)
        self.sequence.length = length
        first, last = shard_bounds(batch, self.cfg, self.cfg_rank)
        start, end = shard_bounds(length, self.ulysses, self.sequence.rank)
        y = self._run(t, hidden_states, timestep, encoder_hidden_states, image_embeds, first, last, start, end)
        if last > first:
            y = _gather(y, 1, shard_sizes(length, self.ulysses), self.sequence.group if self.ulysses > 1 else None)
        return _gather(y, 0, shard_sizes(batch, self.cfg), self.rows_group)

    @staticmethod
    def _run(t: torch.nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor,
             encoder_hidden_states: torch.Tensor, image_embeds: torch.Tensor | None, first: int, last: int,
             start: int, end: int) -> torch.Tensor:
        """Rows first..last, tokens start..end, through the blocks: (rows, end - start, dim);
        empty when this rank has no rows (it only joins the gathers)."""
        from serving.pipeline.step_cache import embed

        if last <= first:
            dim = int(t.config.num_attention_heads * t.config.attention_head_dim)
            return hidden_states.new_empty(0, end - start, dim, dtype=next(t.parameters()).dtype)
        # Every rank embeds its rows whole (cheap) and keeps its slice of the tokens.
        x, _, projection, text, rotary = embed(t, hidden_states[first:last], timestep[first:last],
                                               encoder_hidden_states[first:last],
                                               None if image_embeds is None else image_embeds[first:last])
        cos, sin = rotary
        y, rotary = x[:, start:end], (cos[:, start:end], sin[:, start:end])
        for block in t.blocks:
            y = block(y, text, projection, rotary)
        return y

    # The leader (rank 0, the Denoiser replica itself) hands each forward's inputs to the
    # other ranks over the gang's own process group: the latents and text embeddings of the
    # rows to run (megabytes), never activations. A member that died shows up here as a
    # failed collective.

    def lead(self, transformer: torch.nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor,
             encoder_hidden_states: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Rank 0: run the blocks for these rows across the gang (the others in `follow`)."""
        inputs = [hidden_states, timestep, encoder_hidden_states] + ([] if image_embeds is None else [image_embeds])
        layout = choose_layout(hidden_states.shape[0], self.ulysses, self.cfg, self.policy, self.split_efficiency)
        try:
            dist.broadcast_object_list([(layout, [(tuple(v.shape), v.dtype) for v in inputs])], src=0,
                                       device=self.device)
            for v in inputs:
                dist.broadcast(v.to(self.device).contiguous(), src=0)
            y = self.blocks(transformer, *inputs, layout=layout)
            self.forwards[layout] += 1
            return y
        except (RuntimeError, dist.DistBackendError) as exc:
            raise GangError(f"the gang's forward failed: {exc}") from exc

    def follow(self, transformer: torch.nn.Module) -> bool:
        """Ranks 1..n: take part in the leader's next forward; False when it dismissed the gang."""
        header = [None]
        dist.broadcast_object_list(header, src=0, device=self.device)
        if header[0] is None:
            return False
        layout, shapes = header[0]
        inputs = []
        for shape, dtype in shapes:
            v = torch.empty(shape, dtype=dtype, device=self.device)
            dist.broadcast(v, src=0)
            inputs.append(v)
        self.blocks(transformer, *inputs, layout=layout)
        return True

    def dismiss(self) -> None:
        """Rank 0: tell the others there are no more forwards."""
        dist.broadcast_object_list([None], src=0, device=self.device)

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _gather(part: torch.Tensor, dim: int, sizes: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every member's `part` along `dim` (uneven sizes padded for the collective)."""
    if group is None or len(sizes) == 1:
        return part
    biggest = max(sizes)
    if part.shape[dim] < biggest:
        padding = list(part.shape)
        padding[dim] = biggest - part.shape[dim]
        part = torch.cat([part, part.new_zeros(padding)], dim)
    parts = [torch.empty_like(part) for _ in sizes]
    dist.all_gather(parts, part.contiguous(), group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)

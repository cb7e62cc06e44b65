"""Step caching per request inside a batched DiT forward (TeaCache's rule).

Between neighbouring denoise steps the DiT's blocks change their input by nearly the same
residual, and how much the input to the first block changes predicts how much that residual
changes (TeaCache, Liu et al. 2024). So each request keeps, as part of its own state:

- the first block's *modulated* input at its last step (normed latents, shifted and scaled
  by the timestep: the cheapest signal that moves with both the latents and the timestep),
- the relative change of that input accumulated since its last full forward,
- the residual the blocks added at its last full forward, one per row (conditional, and
  unconditional under guidance: both rows share latents and timestep, so one decision).

At each step a request whose accumulated change stays under its threshold skips the blocks
and reuses its residual; otherwise it runs them and the accumulator restarts. The first
`warmup` steps and the last step always run (where the image forms and where it settles).

Why TeaCache's rule rather than First-Block Cache's: the decision needs no block to run, so a
skipped step costs only the patch embedding and the output projection, on any depth of model
(the tiny model has two blocks; a first-block test would spend half a forward to decide).

The state lives with the request (`DenoiseState.cache`), is checkpointed with it, and is
never shared: in one batch some requests run the blocks on a sub-batch while others reuse
their own residuals. The model's own (uncalibrated) change is used, so thresholds are per
preset, measured (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepCache:
    threshold: float  # accumulated relative change of the modulated input that forces a full forward
    warmup: int = 1  # first steps always computed
    previous: torch.Tensor | None = None  # modulated first-block input at the last step (1, tokens, dim), float32
    accumulated: float = 0.0
    residuals: torch.Tensor | None = None  # (rows, tokens, dim): what the blocks added at the last full forward
    computed: int = 0  # full forwards run (the others of its steps so far reused `residuals`)

    def decide(self, modulated: torch.Tensor, step: int, total: int, rows: int) -> bool:
        """Whether this step runs the blocks (and updates the state for the next step)."""
        if self.previous is not None and self.previous.device != modulated.device:  # resumed on another device
            self.previous = self.previous.to(modulated.device)
        must = (self.previous is None or step < self.warmup or step >= total - 1 or self.residuals is None
                or self.residuals.shape[0] != rows or self.previous.shape != modulated.shape)
        if not must:
            change = ((modulated - self.previous).abs().mean() / self.previous.abs().mean().clamp_min(1e-12)).item()
            self.accumulated += change
        self.previous = modulated
        compute = must or self.accumulated >= self.threshold
        if compute:
            self.accumulated = 0.0
            self.computed += 1
        return compute


    def decide_planned(self, step: int, total: int, computed_fraction: float) -> bool:
        """The decision without a model (simulated accelerators): the steps `decide` must run,
        and of the others an even `computed_fraction`, as the cost profile measured."""
        skippable = max(0, step - self.warmup)
        compute = (step < self.warmup or step >= total - 1
                   or int((skippable + 1) * computed_fraction) > int(skippable * computed_fraction))
        self.computed += compute
        return compute


def warmup_steps(total: int) -> int:
    """Steps always computed at the start: a tenth of them, at least one."""
    return max(1, total // 10)


def embed(transformer: torch.nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor,
          encoder_hidden_states: torch.Tensor, image_embeds: torch.Tensor | None = None):
    """What a Wan DiT computes before its blocks: (tokens, time embedding, per-block
    modulation, context, rotary table). The context is the text, preceded by the image's
    tokens for an image-to-video DiT (its attention tells them apart by the text's length)."""
    t = transformer
    rotary = t.rope(hidden_states)
    x = t.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
    temb, projection, text, image = t.condition_embedder(timestep, encoder_hidden_states, image_embeds,
                                                         timestep_seq_len=None)
    if image is not None:
        text = torch.concat([image, text], dim=1)
    return x, temb, projection.unflatten(1, (6, -1)), text, rotary


@torch.inference_mode()
def forward_with_caches(transformer: torch.nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor,
                        encoder_hidden_states: torch.Tensor, owners: list[int], caches: list[StepCache | None],
                        positions: list[tuple[int, int]], blocks=None,
                        image_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, list[bool]]:
    """A Wan DiT forward (diffusers' `WanTransformer3DModel`; `image_embeds` for image-to-video) over a batch
    whose rows belong to requests `owners[row]`; request i skips the blocks when its
    `caches[i]` says so at `positions[i]` = (step, total). Returns (noise prediction, whether
    each request ran the blocks). With no cache at all it is the model's own forward, op for op.

    `blocks(hidden_states, timestep, encoder_hidden_states, image_embeds)` -> the blocks' output
    for those rows, when someone else runs them (a gang of devices: serving/parallel/gang.py)."""
    t = transformer
    batch, _, frames, height, width = hidden_states.shape
    p_t, p_h, p_w = t.config.patch_size
    x, temb, projection, text, rotary = embed(t, hidden_states, timestep, encoder_hidden_states, image_embeds)

    first = t.blocks[0]
    rows_of = [[r for r, owner in enumerate(owners) if owner == i] for i in range(len(caches))]
    compute = []
    for i, cache in enumerate(caches):
        if cache is None:
            compute.append(True)
            continue
        r = rows_of[i][0]  # the conditional row: its latents and timestep are the request's
        shift, scale = (first.scale_shift_table + projection[r:r + 1].float()).chunk(6, dim=1)[:2]
        modulated = first.norm1(x[r:r + 1].float()) * (1 + scale) + shift
        compute.append(cache.decide(modulated, *positions[i], rows=len(rows_of[i])))

    running = [r for r, owner in enumerate(owners) if compute[owner]]
    hidden = x
    if running:
        whole = len(running) == batch
        index = torch.tensor(running, device=x.device)
        if blocks is not None:
            y = blocks(*(v if whole or v is None else v.index_select(0, index)
                         for v in (hidden_states, timestep, encoder_hidden_states, image_embeds)))
        else:
            y = x if whole else x.index_select(0, index)
            text_rows = text if whole else text.index_select(0, index)
            projection_rows = projection if whole else projection.index_select(0, index)
            for block in t.blocks:
                y = block(y, text_rows, projection_rows, rotary)
        hidden = y if whole else x.clone().index_copy_(0, index, y)
        position = {r: k for k, r in enumerate(running)}
        for i, cache in enumerate(caches):
            if cache is not None and compute[i]:
                mine = torch.tensor([position[r] for r in rows_of[i]], device=x.device)
                cache.residuals = y.index_select(0, mine) - x.index_select(0, torch.tensor(rows_of[i], device=x.device))
    if not all(compute):
        hidden = hidden.clone() if hidden is x else hidden
        for i, cache in enumerate(caches):
            if not compute[i]:
                for k, r in enumerate(rows_of[i]):
                    hidden[r] = x[r] + cache.residuals[k].to(x.device, x.dtype)

    shift, scale = (t.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    shift, scale = shift.to(hidden.device), scale.to(hidden.device)
    hidden = (t.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
    hidden = t.proj_out(hidden)
    hidden = hidden.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
    hidden = hidden.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3), compute

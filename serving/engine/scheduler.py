"""`DenoiseEngine`: iteration-level batching of denoise requests, one DiT forward per step.

At every step boundary the engine picks, among its active requests, the most urgent one
(highest priority, then first come) and every other request whose latent shape and text
length match it, up to `max_batch`, and advances all of them by one step in one forward,
each at its own timestep and guidance scale. New requests join at the next boundary,
finished ones leave, cancelled ones stop before the next forward.

It knows nothing of HTTP, Ray or SQL: requests come in through `add`, and what happens to
them goes out as `EngineEvent`s that the owner (the Denoiser deployment) passes on.
`AsyncDenoiseEngine` runs the loop on an asyncio event loop, with forwards in a thread.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from serving.pipeline.denoise import DenoiseState, batch_key, denoise_batch_step, save_state


@dataclass
class EngineRequest:
    id: str
    state: DenoiseState  # fresh (step 0) or restored from a checkpoint
    prompt_embeds: torch.Tensor  # (1, L, D)
    negative_embeds: torch.Tensor | None  # (1, L, D), or None without guidance
    priority: int = 0
    seq: int = 0  # arrival order, set by the engine
    started: bool = False


@dataclass
class EngineEvent:
    request_id: str
    kind: str  # "started" | "step" | "checkpoint" | "finished" | "failed"
    step: int = 0
    total_steps: int = 0
    batch_size: int = 0
    latents: torch.Tensor | None = None
    checkpoint: bytes | None = None
    error: BaseException | None = None


@dataclass
class DenoiseEngine:
    transformer: torch.nn.Module
    max_batch: int = 4
    checkpoint_every: int = 0  # steps; 0 turns checkpoints off
    active: dict[str, EngineRequest] = field(default_factory=dict)
    _arrivals: itertools.count = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, request: EngineRequest) -> None:
        with self._lock:
            request.seq = next(self._arrivals)
            self.active[request.id] = request

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self.active.pop(request_id, None)

    @property
    def idle(self) -> bool:
        return not self.active

    def select_batch(self) -> list[EngineRequest]:
        """The most urgent request, plus every compatible one in urgency order, up to max_batch."""
        with self._lock:
            queue = sorted(self.active.values(), key=lambda r: (-r.priority, r.seq))
        if not queue:
            return []
        key = batch_key(queue[0].state)
        return [r for r in queue if batch_key(r.state) == key][: self.max_batch]

    def step_batch(self) -> list[EngineEvent]:
        """Run one step boundary: one forward for the selected batch. Returns what happened."""
        batch = self.select_batch()
        if not batch:
            return []
        events = [EngineEvent(r.id, "started", step=r.state.step, total_steps=r.state.total_steps)
                  for r in batch if not r.started]
        for request in batch:
            request.started = True
        try:
            denoise_batch_step(self.transformer, [r.state for r in batch], [r.prompt_embeds for r in batch],
                               [r.negative_embeds for r in batch])
        except Exception as exc:  # a failed forward fails its batch, not the engine
            for request in batch:
                self.cancel(request.id)
            return events + [EngineEvent(r.id, "failed", error=exc) for r in batch]
        for request in batch:
            state = request.state
            events.append(EngineEvent(request.id, "step", step=state.step, total_steps=state.total_steps,
                                      batch_size=len(batch)))
            if state.done:
                self.cancel(request.id)
                events.append(EngineEvent(request.id, "finished", step=state.step, total_steps=state.total_steps,
                                          latents=state.latents.cpu()))
            elif self.checkpoint_every and state.step % self.checkpoint_every == 0:
                events.append(EngineEvent(request.id, "checkpoint", step=state.step, total_steps=state.total_steps,
                                          checkpoint=save_state(state)))
        return events


class AsyncDenoiseEngine:
    """Drives a `DenoiseEngine` from asyncio: `submit` returns the request's own event stream."""

    def __init__(self, engine: DenoiseEngine):
        self.engine = engine
        self.streams: dict[str, asyncio.Queue[EngineEvent]] = {}
        self.work = asyncio.Event()
        self.loop_task: asyncio.Task | None = None

    async def submit(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        """Events of one request until it finishes or fails; closing the iterator cancels it."""
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.get_running_loop().create_task(self._run())
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self.streams[request.id] = queue
        self.engine.add(request)
        self.work.set()
        try:
            while True:
                event = await queue.get()
                yield event
                if event.kind in ("finished", "failed"):
                    return
        finally:
            self.engine.cancel(request.id)
            self.streams.pop(request.id, None)

    async def _run(self) -> None:
        while True:
            if self.engine.idle:
                self.work.clear()
                await self.work.wait()
            for event in await asyncio.to_thread(self.engine.step_batch):
                queue = self.streams.get(event.request_id)
                if queue is not None:
                    queue.put_nowait(event)

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
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

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
    added_at: float = 0.0  # monotonic time it joined the engine
    device_seconds: float = 0.0  # its share of every forward it rode in


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
    device_seconds: float = 0.0  # on "finished": the request's share of all its forwards


@dataclass
class DenoiseEngine:
    transformer: torch.nn.Module
    max_batch: int = 4
    checkpoint_every: int = 0  # steps; 0 turns checkpoints off
    on_forward: Callable[[int, float], None] | None = None  # (batch size, seconds) after each forward
    active: dict[str, EngineRequest] = field(default_factory=dict)
    _arrivals: itertools.count = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, request: EngineRequest) -> None:
        with self._lock:
            request.seq = next(self._arrivals)
            request.added_at = time.monotonic()
            self.active[request.id] = request

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self.active.pop(request_id, None)

    @property
    def idle(self) -> bool:
        return not self.active

    def load(self) -> dict[str, float]:
        """What the autoscaler needs: the work held here and how long the oldest waiter waited."""
        with self._lock:
            requests = list(self.active.values())
        now = time.monotonic()
        waiting = [r for r in requests if not r.started]
        return {
            "requests": float(len(requests)),
            "waiting": float(len(waiting)),
            "oldest_wait_s": max((now - r.added_at for r in waiting), default=0.0),
            "remaining_steps": float(sum(r.state.total_steps - r.state.step for r in requests)),
        }

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
        started = time.perf_counter()
        try:
            denoise_batch_step(self.transformer, [r.state for r in batch], [r.prompt_embeds for r in batch],
                               [r.negative_embeds for r in batch])
        except Exception as exc:  # a failed forward fails its batch, not the engine
            for request in batch:
                self.cancel(request.id)
            return events + [EngineEvent(r.id, "failed", error=exc) for r in batch]
        seconds = time.perf_counter() - started
        rows = [2 if r.negative_embeds is not None and r.state.spec.guidance_scale > 1.0 else 1 for r in batch]
        for request, share in zip(batch, rows):
            request.device_seconds += seconds * share / sum(rows)
        if self.on_forward is not None:
            self.on_forward(len(batch), seconds)
        for request in batch:
            state = request.state
            events.append(EngineEvent(request.id, "step", step=state.step, total_steps=state.total_steps,
                                      batch_size=len(batch)))
            if state.done:
                self.cancel(request.id)
                events.append(EngineEvent(request.id, "finished", step=state.step, total_steps=state.total_steps,
                                          latents=state.latents.cpu(), device_seconds=request.device_seconds))
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

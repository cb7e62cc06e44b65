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
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch

from serving.pipeline.denoise import DenoiseState, batch_key, denoise_batch_step, save_state

logger = logging.getLogger("ray.serve")

# A request left out of the running batch (not started yet, or put aside for a more urgent
# one) hears from a live engine this often, so its caller can tell "queued behind others"
# from "the engine is stuck".
WAITING_EVENT_SECONDS = 2.0


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
    told_waiting_at: float = 0.0  # monotonic time of its last "waiting" event


@dataclass
class EngineEvent:
    request_id: str
    kind: str  # "waiting" | "started" | "step" | "checkpoint" | "finished" | "failed"
    step: int = 0
    total_steps: int = 0
    batch_size: int = 0
    latents: torch.Tensor | None = None
    checkpoint: bytes | None = None
    error: BaseException | None = None
    device_seconds: float = 0.0  # the request's share of this step's forward ("step"), of all of them ("finished")
    computed_steps: int = 0  # ("finished") steps that ran the DiT in full; the rest were step-cached
    cached: bool = False  # ("step") this step reused the request's cached residual


@dataclass
class DenoiseEngine:
    transformer: torch.nn.Module
    max_batch: int = 4
    checkpoint_every: int = 0  # steps; 0 turns checkpoints off
    on_forward: Callable[[int, float], None] | None = None  # (batch size, seconds) after each forward
    blocks: Callable | None = None  # who runs the DiT's blocks: a gang of devices (serving/parallel/gang.py)
    active: dict[str, EngineRequest] = field(default_factory=dict)
    _arrivals: itertools.count = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    waiting_event_seconds: float = WAITING_EVENT_SECONDS
    forward_started_at: float | None = None  # monotonic; set while a forward runs (the hang watchdog reads it)

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

    def step_batch(self, before_forward: Callable[[list[EngineEvent]], None] | None = None) -> list[EngineEvent]:
        """Run one step boundary: one forward for the selected batch. Returns what happened;
        what is known before the forward ("started", "waiting") goes to `before_forward` when
        given, so a job's denoising start is reported when it starts, not a step later.
        Whatever goes wrong fails only the requests it concerns: a failed forward its batch,
        a failed hand-back (checkpoint, latents) its own request; the engine goes on."""
        batch = self.select_batch()
        if not batch:
            return []
        events = [EngineEvent(r.id, "started", step=r.state.step, total_steps=r.state.total_steps)
                  for r in batch if not r.started]
        for request in batch:
            request.started = True
        events += self._waiting_events(batch)
        if before_forward is not None:
            before_forward(events)
            events = []
        started = time.perf_counter()
        self.forward_started_at = time.monotonic()
        try:
            computed = denoise_batch_step(self.transformer, [r.state for r in batch],
                                          [r.prompt_embeds for r in batch], [r.negative_embeds for r in batch],
                                          blocks=self.blocks)
        except Exception as exc:  # a failed forward fails its batch, not the engine
            return events + [self._fail(r, exc) for r in batch]
        finally:
            self.forward_started_at = None
        seconds = time.perf_counter() - started
        # The forward's time is shared by the rows that ran the blocks; a step-cached request's
        # rows cost only the embedding and projection, counted as nothing (all cached: equal).
        rows = [(2 if r.negative_embeds is not None and r.state.spec.guidance_scale > 1.0 else 1) * ran
                for r, ran in zip(batch, computed)]
        if not sum(rows):
            rows = [1] * len(batch)
        shares = {r.id: seconds * n / sum(rows) for r, n in zip(batch, rows)}
        for request in batch:
            request.device_seconds += shares[request.id]
        if self.on_forward is not None:
            try:
                self.on_forward(len(batch), seconds)
            except Exception:  # bookkeeping (metrics) must never cost a request its video
                logger.exception("on_forward callback failed")
        for request, ran in zip(batch, computed):
            try:
                events += self._after_step(request, len(batch), shares[request.id], cached=not ran)
            except Exception as exc:
                events.append(self._fail(request, exc))
        return events

    def _after_step(self, request: EngineRequest, batch_size: int, share: float, cached: bool = False
                    ) -> list[EngineEvent]:
        state = request.state
        events = [EngineEvent(request.id, "step", step=state.step, total_steps=state.total_steps,
                              batch_size=batch_size, device_seconds=share, cached=cached)]
        if state.done:
            computed = state.cache.computed if state.cache is not None else state.total_steps
            events.append(EngineEvent(request.id, "finished", step=state.step, total_steps=state.total_steps,
                                      latents=state.latents.cpu(), device_seconds=request.device_seconds,
                                      computed_steps=computed))
            self.cancel(request.id)
        elif self.checkpoint_every and state.step % self.checkpoint_every == 0:
            events.append(EngineEvent(request.id, "checkpoint", step=state.step, total_steps=state.total_steps,
                                      checkpoint=save_state(state)))
        return events

    def _fail(self, request: EngineRequest, error: BaseException) -> EngineEvent:
        self.cancel(request.id)
        return EngineEvent(request.id, "failed", error=error)

    def fail_all(self, error: BaseException) -> list[EngineEvent]:
        """The last resort when a step boundary broke in a way no request can be blamed for."""
        with self._lock:
            requests = list(self.active.values())
        return [self._fail(r, error) for r in requests]

    def _waiting_events(self, batch: list[EngineRequest]) -> list[EngineEvent]:
        now = time.monotonic()
        chosen = {r.id for r in batch}
        with self._lock:
            # Started ones too: a more urgent batch can leave a request out after it started.
            waiting = [r for r in self.active.values() if r.id not in chosen
                       and now - r.told_waiting_at >= self.waiting_event_seconds]
        for request in waiting:
            request.told_waiting_at = now
        return [EngineEvent(r.id, "waiting", step=r.state.step, total_steps=r.state.total_steps) for r in waiting]

    def forward_running_seconds(self) -> float:
        """How long the forward in flight has run (0 between forwards)."""
        started = self.forward_started_at
        return time.monotonic() - started if started is not None else 0.0


class Superseded(Exception):
    """A later attempt of the same job took this request's place."""


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

    def supersede(self, job_prefix: str, reason: str) -> int:
        """End every open request whose id starts with `job_prefix` (an earlier attempt of a
        job whose caller is gone): it stops taking batch slots, and its stream ends."""
        stale = [rid for rid in self.streams if rid.startswith(job_prefix)]
        for request_id in stale:
            self.engine.cancel(request_id)
            self.streams[request_id].put_nowait(EngineEvent(request_id, "failed", error=Superseded(reason)))
        return len(stale)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()

        def before_forward(events: list[EngineEvent]) -> None:  # on the engine's thread
            for event in events:
                loop.call_soon_threadsafe(self._deliver, event)

        while True:
            if self.engine.idle:
                self.work.clear()
                await self.work.wait()
            try:
                events = await asyncio.to_thread(self.engine.step_batch, before_forward)
            except Exception as exc:  # never let the loop die with streams waiting on it
                logger.exception("denoise step boundary failed; failing the requests it held")
                events = self.engine.fail_all(exc)
            for event in events:
                self._deliver(event)

    def _deliver(self, event: EngineEvent) -> None:
        queue = self.streams.get(event.request_id)
        if queue is not None:
            queue.put_nowait(event)

"""Progress streams (server-sent events) of videos, cheap enough to hold many open.

One `JobWatcher` per Gateway replica reads every watched job in one query per interval and
hands each stream its job's latest row; a stream itself never queries the store. Streams
are counted (`StreamSlots`: per API key, and in all) and live at most a configured time,
then end with a `stream.expired` event telling the client to reconnect or poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from typing import AsyncIterator, Awaitable, Callable, Iterator

from serving.api.errors import APIError
from serving.api.schemas import Video
from serving.jobs.records import JobRecord

logger = logging.getLogger("ray.serve")

KEEPALIVE_SECONDS = 15.0  # an SSE comment this often keeps proxies from closing an idle stream


class Watch:
    """One stream's view of its job: the latest row the watcher read (None once deleted)."""

    def __init__(self) -> None:
        self.job: JobRecord | None = None
        self._read = asyncio.Event()

    def update(self, job: JobRecord | None) -> None:
        self.job = job
        self._read.set()

    async def next_read(self, timeout: float) -> bool:
        """Wait for the watcher's next read of the job; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._read.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        self._read.clear()
        return True


class JobWatcher:
    """Reads all watched jobs in one query every `interval_seconds`, while any stream watches."""

    def __init__(self, read_jobs: Callable[[list[str]], dict[str, JobRecord]], interval_seconds: float):
        self._read_jobs = read_jobs
        self._interval = interval_seconds
        self._watches: dict[str, set[Watch]] = {}
        self._task: asyncio.Task | None = None

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[Watch]:
        watch = Watch()
        self._watches.setdefault(job_id, set()).add(watch)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            yield watch
        finally:
            watchers = self._watches.get(job_id, set())
            watchers.discard(watch)
            if not watchers:
                self._watches.pop(job_id, None)

    async def _run(self) -> None:
        while self._watches:
            await asyncio.sleep(self._interval)
            ids = list(self._watches)
            if not ids:
                return
            try:
                found = await asyncio.to_thread(self._read_jobs, ids)
            except Exception:  # the store is down for a moment: streams wait, they do not fail
                logger.exception("progress streams could not read their jobs")
                continue
            for job_id in ids:
                for watch in self._watches.get(job_id, ()):
                    watch.update(found.get(job_id))


class StreamSlot:
    def __init__(self, slots: "StreamSlots", owner: str | None):
        self.owner, self.opened_at, self._slots = owner, time.monotonic(), slots

    def close(self) -> None:
        """Give the slot back (safe to call twice)."""
        self._slots._open.discard(self)


class StreamSlots:
    """Open streams of this replica, at most `total` in all and a per-key number each."""

    def __init__(self, total: int, lifetime_seconds: float):
        self.total, self.lifetime = total, lifetime_seconds
        self._open: set[StreamSlot] = set()

    def take(self, owner: str | None, per_key: int | None) -> StreamSlot:
        """A slot for a new stream, or a 429 whose Retry-After is when the oldest stream in the
        way ends at the latest (its maximum lifetime)."""
        mine = [s for s in self._open if s.owner == owner] if owner is not None else []
        if per_key is not None and len(mine) >= per_key:
            raise self._full(mine, f"this API key has {len(mine)} progress streams open; its limit is {per_key}")
        if len(self._open) >= self.total:
            raise self._full(list(self._open), f"this server has {len(self._open)} progress streams open; "
                                                f"its limit is {self.total}")
        slot = StreamSlot(self, owner)
        self._open.add(slot)
        return slot

    def _full(self, in_the_way: list[StreamSlot], why: str) -> APIError:
        oldest = min(s.opened_at for s in in_the_way)
        retry = max(1, math.ceil(oldest + self.lifetime - time.monotonic()))
        return APIError(429, f"{why}; close one, retry in {retry} s, or poll GET /v1/videos/{{video_id}} instead",
                        type="rate_limit_error", code="too_many_streams", headers={"Retry-After": str(retry)})


async def video_events(first: JobRecord, watcher: JobWatcher, shaped: Callable[[JobRecord], Awaitable[Video]],
                       slot: StreamSlot, lifetime_seconds: float) -> AsyncIterator[str]:
    """The video object on every change until it is finished, deleted, or the stream's
    lifetime is up; gives the slot back however it ends (a client hanging up included)."""
    try:
        deadline = time.monotonic() + lifetime_seconds
        with watcher.watch(first.id) as watch:
            current: JobRecord | None = first
            last = None
            while True:
                if current is None:
                    yield f"event: video.deleted\ndata: {json.dumps({'id': first.id})}\n\n"
                    return
                state = (current.status, current.stage, current.progress)
                if state != last:
                    last = state
                    video = await shaped(current)
                    name = f"video.{video.status}" if current.status.terminal else "video.progress"
                    yield f"event: {name}\ndata: {video.model_dump_json()}\n\n"
                    if current.status.terminal:
                        return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    expired = {"id": first.id, "message": f"this stream reached its limit of {lifetime_seconds:g} s; "
                                                          "reconnect, or poll GET /v1/videos/{id}"}
                    yield f"event: stream.expired\ndata: {json.dumps(expired)}\n\n"
                    return
                if await watch.next_read(min(remaining, KEEPALIVE_SECONDS)):
                    current = watch.job
                elif deadline > time.monotonic():
                    yield ": keep-alive\n\n"
    finally:
        slot.close()

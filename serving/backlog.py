"""Work on its way to each stage, for the stages' autoscalers.

A stage's own replicas and Serve's handle queues show only the calls that already reached
that stage. The rest of its coming work is elsewhere: jobs queued in the job store (beyond
the Director's `server.max_running_jobs` window, or not claimed yet) reach every stage, and a
job being encoded reaches the Denoiser and then the VAE decoder soon. `PendingWork` counts,
for each stage, the jobs (and their denoise steps) that have not reached it yet, from one
grouped query on the job store, so every Director's jobs count and none twice.

A Director publishes it every `PUBLISH_SECONDS` under the app's name in Ray's internal
key-value store (held by the GCS, which the Serve controller already talks to), and the
autoscaling policy, running in the controller, reads it there: no database access and
nothing slow in the controller's loop. A snapshot older than `STALE_SECONDS` (no Director
alive) is ignored; the stages then scale on what reached them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from serving.cost_model import STAGE_NAMES

PUBLISH_SECONDS = 1.0
STALE_SECONDS = 15.0
KV_NAMESPACE = "ditserve"


@dataclass(frozen=True)
class StageWork:
    jobs: int = 0
    steps: int = 0  # denoise steps still to run in those jobs


@dataclass(frozen=True)
class PendingWork:
    """Per stage: jobs that will reach it and have not yet (see the module docstring)."""

    stages: dict[str, StageWork] = field(default_factory=dict)
    at: float = 0.0  # wall clock of the query

    def of(self, stage: str) -> StageWork:
        return self.stages.get(stage, StageWork())

    @classmethod
    def from_counts(cls, queued: StageWork, in_progress: dict[str, StageWork], at: float) -> "PendingWork":
        """`queued`: jobs no Director has started; `in_progress`: running jobs by their stage."""
        stages, jobs, steps = {}, queued.jobs, queued.steps
        for stage in STAGE_NAMES:  # pipeline order: what is before a stage reaches it later
            stages[stage] = StageWork(jobs, steps)
            here = in_progress.get(stage, StageWork())
            jobs, steps = jobs + here.jobs, steps + here.steps
        return cls(stages, at)

    @classmethod
    def from_store(cls, store) -> "PendingWork":
        """From `JobStore.unfinished_work` (a claimed job not yet started counts as queued)."""
        at = time.time()
        queued, in_progress = StageWork(), {}
        for (status, stage), (jobs, steps) in store.unfinished_work().items():
            if status == "queued":
                queued = StageWork(queued.jobs + jobs, queued.steps + steps)
            elif stage is not None:
                in_progress[stage] = StageWork(jobs, steps)
        return cls.from_counts(queued, in_progress, at)

    def to_json(self) -> str:
        return json.dumps({"at": self.at, "stages": {name: asdict(work) for name, work in self.stages.items()}})

    @classmethod
    def from_json(cls, text: str | bytes) -> "PendingWork":
        data = json.loads(text)
        return cls({name: StageWork(**work) for name, work in data["stages"].items()}, float(data["at"]))

    def fresh(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) - self.at <= STALE_SECONDS


def kv_key(app_name: str | None) -> str:
    return f"pending-work/{app_name or ''}"


def publish(app_name: str, pending: PendingWork) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(kv_key(app_name), pending.to_json(), overwrite=True, namespace=KV_NAMESPACE)


def read_published(app_name: str | None) -> PendingWork | None:
    """The app's latest fresh snapshot, or None (none published, stale, or the GCS unreachable)."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return None
    try:
        raw = _internal_kv_get(kv_key(app_name), namespace=KV_NAMESPACE)
        pending = PendingWork.from_json(raw) if raw else None
    except Exception:  # a GCS hiccup must never break a scaling decision
        return None
    return pending if pending is not None and pending.fresh() else None

"""Wait estimates and admission control, in accelerator-seconds.

Every job is costed at submit in device seconds per stage (`serving/cost_model.py`, through
the live `MeasuredCost` of serving/measured_cost.py) and the cost is stored with it, so the
work ahead of any job is one SQL sum. The Director adds what it is driving now (the steps left
in each running job times the measured seconds per step of its shape, plus the encode and
decode still ahead) and measures each stage's capacity: the device seconds its replicas
complete per second, which is about how many replicas are busy (a replica that computes all
the time completes one device second per second; the engine shares a batched forward's time
among its jobs). Never less than the replicas configured to exist, so a quiet spell, when
few are busy, does not read as a small cluster.

Wait. A pipeline drains at the pace of its slowest stage, so a job with `ahead` seconds of
work in front of it starts in

    max over stages of (running + ahead) / capacity     (+ its own text encoding)

and more replicas (a higher measured capacity) shorten it. A queued job's `estimated_start_at`
counts only the queued work that outranks it (priority, then first come: the claim order).

Admission: a queue budget. `admission.max_queue_wait_seconds` is the longest a job may wait
to start; the cluster drains `limit x capacity` device seconds in that time, and that is what
the queue may hold. A new job is admitted when the work ahead of it (by its priority) plus
its own work fits in the budget of every stage:

    (running + ahead + own) / capacity <= limit

so every admitted job starts within the limit, and it stays true for the jobs behind it. A
large job needs more room than a small one: a flood of large jobs fills the budget and the
next large one gets 429, while small ones still fit in what is left. `Retry-After` is when
enough work will have drained for this job to fit: the excess divided by the capacity. A job
whose own work exceeds the whole budget is admitted once nothing is ahead of it, so none is
refused forever (pick the limit above the largest job's own time; generation.max_cost bounds
that). A replayed request (same Idempotency-Key) was admitted before and is never refused.

How good the estimate is gets measured, not assumed: `estimate_errors` compares each job's
`estimated_start_at` as shown right after submit with when its denoising actually started
(tests/test_admission.py; the load-test reports can call it on their jobs).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Iterable

from serving.cost_model import STAGE_NAMES, StageSeconds, spec_seconds
from serving.measured_cost import step_shape

NO_WORK = StageSeconds(0.0, 0.0, 0.0)


class Capacity:
    """Device seconds one stage completes per second, over a sliding window of recent work,
    never less than `floor` (the replicas that exist even when idle)."""

    def __init__(self, floor: float, window_seconds: float = 30.0):
        self.floor = floor
        self.window = window_seconds
        self.events: deque[tuple[float, float]] = deque()  # (monotonic time, device seconds)
        self.last_rate: float | None = None

    def record(self, device_seconds: float, now: float | None = None) -> None:
        self.events.append((time.monotonic() if now is None else now, device_seconds))

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self.events and self.events[0][0] < now - self.window:
            self.events.popleft()
        if len(self.events) >= 2:
            span = max(now - self.events[0][0], 1.0)
            self.last_rate = sum(seconds for _, seconds in self.events) / span
        # Idle: the last measured rate still describes the replicas best.
        return max(self.last_rate or 0.0, self.floor)


def stage_dict(seconds: StageSeconds) -> dict[str, float]:
    return {stage: seconds.of(stage) for stage in STAGE_NAMES}


@dataclass
class Admission:
    admitted: bool
    start_in: float  # seconds until the job would start
    drain_seconds: float  # seconds until the backlog with this job in it is done, at its slowest stage
    retry_after: int  # 0 when admitted


@dataclass
class WaitEstimate:
    """The Director's measured state; the Gateway pairs it with sums from the job store."""

    capacity: dict[str, float]  # device seconds completed per second, per stage
    running: dict[str, float]  # device seconds left in the jobs being driven, per stage
    queued: dict[str, float]  # device seconds of every job waiting for a driver, per stage
    calibration: dict = field(default_factory=dict)  # MeasuredCost's corrections, to cost new jobs alike

    def _drain(self, work: StageSeconds) -> float:
        return max((self.running[s] + work.of(s)) / self.capacity[s] for s in STAGE_NAMES)

    @property
    def wait_seconds(self) -> float:
        """Expected wait for a job submitted now, behind everything already accepted."""
        return self._drain(StageSeconds(**self.queued))

    def start_in(self, ahead: StageSeconds, own: StageSeconds = NO_WORK) -> float:
        """Seconds until a job with `ahead` queued work in front of it starts denoising."""
        return self._drain(ahead) + own.text_encoder

    def admit(self, own: StageSeconds, ahead: StageSeconds, limit_seconds: float) -> Admission:
        """The queue-budget rule of the module docstring, for a job costing `own` with `ahead`
        queued in front of it."""
        start = self.start_in(ahead, own)
        with_job = StageSeconds(**{s: ahead.of(s) + own.of(s) for s in STAGE_NAMES})
        drain = self._drain(with_job)
        own_alone = max(own.of(s) / self.capacity[s] for s in STAGE_NAMES)
        budget = max(limit_seconds, own_alone)  # a job bigger than the budget fits once nothing is ahead
        if drain <= budget:
            return Admission(True, start, drain, 0)
        return Admission(False, start, drain, max(1, math.ceil(drain - budget)))

    def to_dict(self) -> dict:
        return asdict(self)


class QueueFull(Exception):
    """Admitting the job would overfill the queue budget (see the module docstring)."""

    def __init__(self, verdict: Admission, limit_seconds: float):
        super().__init__(f"the queue is full: this job would start in about {verdict.start_in:.0f} s and the work "
                         f"queued with it would take {verdict.drain_seconds:.0f} s to drain, over this server's "
                         f"limit of {limit_seconds:.0f} s; retry in {verdict.retry_after} s")
        self.verdict, self.limit_seconds = verdict, limit_seconds


# ---- how good the estimates were -------------------------------------------------------------


@dataclass
class EstimateErrors:
    """Estimated vs actual start of denoising over a set of jobs (seconds; error = estimated
    minus actual, so a positive bias means the estimates were pessimistic)."""

    jobs: int
    mean_abs_error_s: float
    p50_abs_error_s: float
    p95_abs_error_s: float
    bias_s: float
    mean_actual_wait_s: float
    relative_error: float  # mean |error| / mean actual wait

    def to_dict(self) -> dict:
        return asdict(self)


def estimate_errors(samples: Iterable[tuple[float, float, float]]) -> EstimateErrors | None:
    """From (submitted_at, estimated_start_at, actual_start_at) per job; None with no jobs.
    Take the estimate shown right after submit and the job's `denoiser_started_at`."""
    rows = list(samples)
    if not rows:
        return None
    errors = [estimated - actual for _, estimated, actual in rows]
    absolute = sorted(abs(e) for e in errors)
    waits = [actual - submitted for submitted, _, actual in rows]
    mean_wait = statistics.fmean(waits)
    return EstimateErrors(
        jobs=len(rows), mean_abs_error_s=statistics.fmean(absolute), p50_abs_error_s=_quantile(absolute, 0.5),
        p95_abs_error_s=_quantile(absolute, 0.95), bias_s=statistics.fmean(errors), mean_actual_wait_s=mean_wait,
        relative_error=statistics.fmean(absolute) / max(mean_wait, 1e-9))


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


# ---- the Director's side -----------------------------------------------------------------------


@dataclass
class _Driven:
    spec: dict
    steps_left: int
    encoded: bool = False
    decoded: bool = False


class WorkInFlight:
    """The jobs one Director drives now and the device seconds each still needs per stage,
    priced by the live cost model (so a shape measured slower makes its running jobs longer)."""

    def __init__(self, cost, geometry):
        self.cost, self.geometry = cost, geometry
        self.jobs: dict[str, _Driven] = {}

    def start(self, job_id: str, spec: dict, steps_left: int) -> None:
        self.jobs[job_id] = _Driven(spec, steps_left)

    def encoded(self, job_id: str) -> None:
        if job_id in self.jobs:
            self.jobs[job_id].encoded = True

    def stepped(self, job_id: str, steps_left: int) -> None:
        if job_id in self.jobs:
            self.jobs[job_id].steps_left = steps_left

    def decoded(self, job_id: str) -> None:
        if job_id in self.jobs:
            self.jobs[job_id].decoded = True

    def finish(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def seconds_left(self) -> StageSeconds:
        encode = denoise = decode = 0.0
        for job in list(self.jobs.values()):
            spec, shape = job.spec, step_shape(self.geometry, job.spec)
            if not job.encoded:
                encode += self.cost.text_encode_seconds(shape[0], shape[2])
            denoise += job.steps_left * self.cost.dit_forward_seconds(*shape)
            if not job.decoded:
                decode += self.cost.vae_decode_seconds(spec["num_frames"], spec["width"], spec["height"])
        return StageSeconds(encode, denoise, decode)


def cost_uncosted_jobs(store, cost, geometry) -> int:
    """Cost the queued jobs a version without stored costs left behind (once, at a Director's
    start), so the queue sums count them; returns how many."""
    costed = 0
    while batch := store.jobs_without_cost():
        for job in batch:
            store.set_cost(job.id, spec_seconds(cost, geometry, job.spec))
        costed += len(batch)
    return costed

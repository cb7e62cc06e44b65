"""Autoscaling: the Denoiser scales on queue wait, not on request counts.

Ray Serve calls `QueueWaitPolicy` on every control-loop tick with the custom metrics each
Denoiser replica reports (`Denoiser.record_autoscaling_stats`): the denoise steps its engine
still has to run, how long its oldest waiting request has waited, and its measured step
time. The policy asks for enough replicas that the backlog drains within the queue-wait
target (the SLO): replicas = ceil(backlog seconds / target). A replica whose oldest waiter is
already past the target adds one more. Serve applies min/max and the up/down delays.
"""

from __future__ import annotations

import math
from typing import Any

# Until a replica has measured a step, assume this (seconds); the first forwards replace it.
DEFAULT_STEP_SECONDS = 0.5


class QueueWaitPolicy:
    def __init__(self, target_queue_wait_s: float):
        self.target = target_queue_wait_s

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}

        def values(name: str) -> list[float]:
            return [float(v) for v in (metrics.get(name) or {}).values()]

        steps = [s for s in values("step_seconds") if s > 0]
        step_seconds = sum(steps) / len(steps) if steps else DEFAULT_STEP_SECONDS
        max_batch = max(values("max_batch") or [1.0])
        requests = sum(values("requests"))
        remaining = sum(values("remaining_steps"))
        # Requests queued in front of the replicas (at the handles) bring about as much work
        # as the ones already inside them.
        per_request = remaining / requests if requests else 0.0
        remaining += (ctx.total_queued_requests or 0.0) * per_request
        backlog_seconds = remaining * step_seconds / max_batch
        oldest_wait = max(values("oldest_wait_s") or [0.0])

        desired = math.ceil(backlog_seconds / self.target) if backlog_seconds > 0 else ctx.capacity_adjusted_min_replicas
        if oldest_wait > self.target:
            desired = max(desired, ctx.current_num_replicas + 1)
        state = dict(ctx.policy_state or {}, backlog_seconds=backlog_seconds, oldest_wait_s=oldest_wait,
                     step_seconds=step_seconds)
        return max(desired, 1 if ctx.capacity_adjusted_min_replicas else 0), state

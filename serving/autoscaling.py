"""Autoscaling: every model stage scales on its own queue wait, not on request counts.

Ray Serve calls one `StagePolicy` per stage (TextEncoder, Denoiser, VAEDecoder) on every
control-loop tick, in the Serve controller. Its inputs, all in device-seconds of one replica:

- work held by the stage's replicas: each reports `backlog_seconds` from
  `record_autoscaling_stats` (serving/deployments/stage_load.py; the Denoiser's engine),
- calls queued in front of them at the handles (`ctx.total_queued_requests`), priced at the
  replicas' measured `seconds_per_job`,
- work on its way: jobs queued in the job store, beyond the Director's window or not claimed
  yet, and jobs at an earlier stage (serving/backlog.py), priced the same way (the Denoiser
  prices their denoise steps at its measured `seconds_per_step`).

With B that backlog, T the stage's `target_queue_wait_seconds`, n the running replicas and S
a new replica's start-up time (configured, else the longest the stage's replicas measured):

- The last job waiting starts once the work ahead of it is done, B minus its own work J
  (a job is never split across replicas), shared by the replicas: enough replicas that this
  takes at most T, were they all ready now: need = ceil((B - J) / T).
- Scale-up pays the start-up: a replica asked for now helps only with work still waiting in
  S seconds, R = B - J - n*S (the running replicas drain n*S meanwhile). If R <= 0 the running
  replicas finish first and nothing is added. Otherwise ask for enough that R drains in the
  time the target leaves after start-up, T - S, but sized for no less than T/2: a replica
  that arrives when the target is nearly or already lost is still bought to work, not to
  help for an instant.
- The oldest waiter is the second signal: past T, one more replica (when R > 0).
- The arrival rate is the floor: never fewer replicas than the work arriving keeps busy, at
  most `MAX_UTILIZATION` busy. A stage's backlog says how much work waits now, not how fast it
  arrives: under a steady stream the running work alone would price fewer replicas than are
  busy, and every replica removed would grow the queue back. The rate is measured by work
  conservation over the stage's `inflow_window_s`: work in = work done + growth of the
  backlog, where work done is the replicas' `busy` (a busy replica does one device-second per
  second). Not `busy` alone: while a queue drains every replica is busy, so a floor on `busy`
  would ratchet the stage up to its maximum and hold it there until the queue is empty.
- Scale-down keeps an idle replica as long as restarting it would cost (the break-even
  rule): only after the stage has wanted fewer replicas for S seconds may Serve's
  `downscale_delay_s` start, so removing a replica waits max(S, downscale_delay_s).

Serve then applies min/max replicas and the up/down delays (its wrapper of custom policies).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from serving.backlog import PendingWork, read_published

# The busiest a stage is kept: at full utilization it has no slack for the next arrival, and
# its queue wait grows without bound.
MAX_UTILIZATION = 0.85
# How often the policy reads the published pending work at most (the control loop ticks
# every 0.1 s; the Director publishes every second).
PENDING_READ_SECONDS = 1.0
# Samples of (time, backlog, busy) the inflow estimate keeps per window: enough to average
# busy over it, few enough that the policy state stays small.
INFLOW_SAMPLES = 30


def replicas_for(backlog_s: float, running: int, target_s: float, startup_s: float, oldest_wait_s: float,
                 job_s: float = 0.0) -> int:
    """Replicas one stage needs (the rule in the module docstring), before min/max and delays.
    `job_s`: one job's work here, which does not delay the last waiter's own start."""
    ahead = max(0.0, backlog_s - job_s)
    need = math.ceil(ahead / target_s) if ahead > 0 else 0
    left = ahead - running * startup_s  # still waiting when a replica asked for now is ready
    if need > running:
        need = running if left <= 0 else max(running, math.ceil(left / max(target_s - startup_s, target_s / 2)))
    if oldest_wait_s > target_s and left > 0:
        need = max(need, running + 1)
    return need


class StagePolicy:
    """Serve's custom policy for one stage (`autoscaling_config.policy` in serving/app.py)."""

    def __init__(self, stage: str, target_queue_wait_s: float, startup_seconds: float | None = None,
                 prior_seconds_per_step: float = 0.0, inflow_window_s: float = 60.0):
        self.stage = stage
        self.target = target_queue_wait_s
        self.startup = startup_seconds  # None: what the replicas measured
        self.inflow_window = inflow_window_s
        self.prior_seconds_per_step = prior_seconds_per_step
        # Where the work not yet at this stage comes from; tests hand in their own snapshot.
        self.read_pending: Callable[[str | None], PendingWork | None] = read_published
        self._pending: tuple[float, PendingWork | None] = (-math.inf, None)

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        metrics = ctx.aggregated_metrics or {}

        def values(name: str) -> list[float]:
            return [float(v) for v in (metrics.get(name) or {}).values()]

        def measured(name: str, prior: float = 0.0) -> float:
            found = [v for v in values(name) if v > 0]
            if found:
                state[name] = sum(found) / len(found)  # remembered while no replica reports one
            return state.get(name, prior)

        per_job = measured("seconds_per_job")
        per_step = measured("seconds_per_step", self.prior_seconds_per_step)
        startup = self.startup if self.startup is not None else max(values("startup_seconds") + [state.get(
            "startup_seconds", 0.0)])
        state["startup_seconds"] = startup

        held = sum(values("backlog_seconds"))
        queued = (ctx.total_queued_requests or 0.0) * per_job
        coming = self._pending_seconds(ctx, per_job, per_step)
        backlog = held + queued + coming
        oldest_wait = max(values("oldest_wait_s") or [0.0])
        # A job's price at this stage is the one queued calls get (the Denoiser's: its replicas'
        # requests' remaining steps, which errs towards more replicas).
        desired = replicas_for(backlog, ctx.current_num_replicas, self.target, startup, oldest_wait, per_job)
        busy = sum(values("busy"))
        inflow = self._inflow(ctx.current_time or 0.0, backlog, busy, state)
        desired = max(desired, math.ceil(inflow / MAX_UTILIZATION - 1e-9))
        desired = self._hold_idle_replicas(desired, ctx, startup, state)
        state.update(backlog_seconds=backlog, held_seconds=held, queued_seconds=queued, coming_seconds=coming,
                     oldest_wait_s=oldest_wait, busy_replicas=busy, inflow_replicas=inflow)
        self._report(desired, backlog, inflow)
        return desired, state

    def _report(self, desired: int, backlog: float, inflow: float) -> None:
        """The decision and its inputs, for operators (ditserve_autoscaler_* metrics)."""
        try:
            from serving.metrics import autoscaler_metrics

            gauges, tags = autoscaler_metrics(), {"stage": self.stage}
            gauges.wanted.set(desired, tags=tags)
            gauges.backlog.set(backlog, tags=tags)
            gauges.inflow.set(inflow, tags=tags)
        except Exception:  # outside a Ray worker (unit tests), or a metrics hiccup: never block a decision
            pass

    def _inflow(self, now: float, backlog: float, busy: float, state: dict[str, Any]) -> float:
        """Device-seconds of work arriving per second (= replicas it keeps busy), over the
        window: the mean of `busy` plus the backlog's growth. 0 until half a window is seen."""
        samples = [s for s in state.get("inflow_samples", []) if now - s[0] <= self.inflow_window]
        if not samples or now - samples[-1][0] >= self.inflow_window / INFLOW_SAMPLES:
            samples.append((now, backlog, busy))
        state["inflow_samples"] = samples
        span = now - samples[0][0]
        if span < self.inflow_window / 2:
            return 0.0
        mean_busy = sum(s[2] for s in samples) / len(samples)
        return max(0.0, mean_busy + (backlog - samples[0][1]) / span)

    def _pending_seconds(self, ctx, per_job: float, per_step: float) -> float:
        now = ctx.current_time or 0.0
        if now - self._pending[0] >= PENDING_READ_SECONDS:
            self._pending = (now, self.read_pending(ctx.app_name))
        pending = self._pending[1]
        if pending is None:
            return 0.0
        work = pending.of(self.stage)
        return work.steps * per_step if self.stage == "denoiser" else work.jobs * per_job

    @staticmethod
    def _hold_idle_replicas(desired: int, ctx, startup: float, state: dict[str, Any]) -> int:
        """Break-even: want fewer replicas for `startup - downscale_delay_s` seconds before
        saying so (Serve's own delay then runs), so the total wait is max(S, the delay)."""
        if desired >= ctx.target_num_replicas:
            state.pop("fewer_since", None)
            return desired
        now = ctx.current_time or 0.0
        since = state.setdefault("fewer_since", now)
        hold = startup - (ctx.config.downscale_delay_s if ctx.config is not None else 0.0)
        return ctx.target_num_replicas if now - since < hold else desired

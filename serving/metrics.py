"""Every ditserve metric, defined in one place.

They are Ray metrics (`ray.serve.metrics`), so each replica reports them to its node's Ray
metrics agent, which serves them in Prometheus format (names gain Ray's `ray_` prefix:
`ray_ditserve_queue_wait_seconds_bucket{stage=...}`). A cluster's Prometheus scrapes every
node; `ditserve serve --metrics-port` exposes the local one.

Metric objects are made lazily, inside the replica that records them.
"""

from __future__ import annotations

from functools import lru_cache

# Queue waits and latencies run from a fraction of a second (tiny model, idle) to the
# half-hour a hosted API queue reaches at peak: buckets span both.
SECONDS_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600]
STEP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
PING_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5]

STAGES = ("text_encoder", "denoiser", "vae_decoder")
JOB_STATES = ("queued", "in_progress", "completed", "failed", "cancelled")
ANONYMOUS_KEY = "anonymous"  # the usage metrics' key label for jobs made with auth off


class Metrics:
    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.queue_wait = Histogram(
            "ditserve_queue_wait_seconds", "Seconds from a job's submission to the start of a stage.",
            boundaries=SECONDS_BUCKETS, tag_keys=("stage",))
        self.webhook_attempts = Counter(
            "ditserve_webhook_attempts", "Webhook posts, by outcome: delivered, retry, gave_up, refused (a forbidden target).",
            tag_keys=("outcome",))
        self.job_latency = Histogram(
            "ditserve_job_latency_seconds", "Seconds from submission to a job's final state, by that state.",
            boundaries=SECONDS_BUCKETS, tag_keys=("status",))
        self.step_time = Histogram(
            "ditserve_denoise_step_seconds", "Wall time of one batched DiT forward (one denoise step).",
            boundaries=STEP_BUCKETS)
        self.batch_size = Histogram(
            "ditserve_denoise_batch_size", "Requests sharing one DiT forward.", boundaries=BATCH_BUCKETS)
        self.jobs = Gauge("ditserve_jobs", "Jobs in the job store, by state.", tag_keys=("state",))
        self.rejections = Counter(
            "ditserve_admission_rejections", "Requests refused at admission, by reason.", tag_keys=("reason",))
        self.accelerator_seconds = Histogram(
            "ditserve_accelerator_seconds_per_job",
            "Device seconds one job used in a stage (its share of each batched forward).",
            boundaries=SECONDS_BUCKETS, tag_keys=("stage",))
        self.attention_backend = Gauge(
            "ditserve_attention_backend",
            "1 on each Denoiser replica for the attention backend its DiT runs (after its self-check), with the "
            "backend asked for; 'simulated' where compute is simulated.",
            tag_keys=("backend", "requested", "dtype", "head_dim"))
        # Usage per API key (the key's name: bounded, keys come from the config; "anonymous"
        # with auth off), counted when a job ends, as GET /v1/usage sums it.
        self.usage_jobs = Counter(
            "ditserve_usage_jobs", "Jobs that ended, by API key and how: completed, failed, cancelled, deleted.",
            tag_keys=("key", "ending"))
        self.usage_accelerator_seconds = Counter(
            "ditserve_usage_accelerator_seconds",
            "Accelerator-seconds used by jobs that ended (every attempt, failures included), by API key and stage.",
            tag_keys=("key", "stage"))
        self.usage_video_seconds = Counter(
            "ditserve_usage_video_seconds", "Seconds of video delivered (completed jobs), by API key.",
            tag_keys=("key",))
        self.readiness_ping = Histogram(
            "ditserve_readiness_ping_seconds",
            "Seconds a stage took to answer /readyz's ping from the Director, by stage and outcome: ok, false (it "
            "answered not ready), busy (no answer in 5 s, queued behind full replicas, but Serve runs healthy "
            "ones: ready), timeout (no answer and no healthy replica: down), error.",
            boundaries=PING_BUCKETS, tag_keys=("stage", "outcome"))
        self.simulated = Gauge(
            "ditserve_simulated_time_scale",
            "Set only on replicas whose compute is SIMULATED (serving/simulate/): the time scale their waits are "
            "divided by, labelled with the cost profile. Absent on real accelerators.",
            tag_keys=("stage", "profile"))


    def count_usage(self, job, ending: str | None = None) -> None:
        """Count an ended job in the usage counters (`ending` when its status does not say)."""
        from serving.jobs.usage import video_seconds

        key = job.owner or ANONYMOUS_KEY
        self.usage_jobs.inc(tags={"key": key, "ending": ending or job.status.value})
        used = job.used
        for stage in STAGES:
            if used.of(stage) > 0:
                self.usage_accelerator_seconds.inc(used.of(stage), tags={"key": key, "stage": stage})
        if video_seconds(job) > 0:
            self.usage_video_seconds.inc(video_seconds(job), tags={"key": key})


def mark_simulated(stage: str, simulation) -> None:
    """Say on the metrics endpoint that this replica's compute is simulated (no-op when real)."""
    if simulation is not None:
        metrics().simulated.set(simulation.time_scale, tags={"stage": stage, "profile": str(simulation.profile)})


@lru_cache(maxsize=1)
def metrics() -> Metrics:
    return Metrics()


class AutoscalerMetrics:
    """Why a stage's autoscaler wants what it wants, set by `serving.autoscaling.StagePolicy`
    on every decision. The policy runs in Serve's controller, not in a replica, so these are
    plain Ray metrics (`ray.util.metrics`), exported by the head node's agent."""

    def __init__(self):
        from ray.util.metrics import Gauge

        self.wanted = Gauge(
            "ditserve_autoscaler_wanted_replicas",
            "Replicas the stage's policy asks for, before Serve's bounds and delays.", tag_keys=("stage",))
        self.backlog = Gauge(
            "ditserve_autoscaler_backlog_seconds",
            "Device-seconds of work the stage's policy sees: held by its replicas, queued at its handles, and "
            "on its way from the job store and earlier stages.", tag_keys=("stage",))
        self.inflow = Gauge(
            "ditserve_autoscaler_inflow_replicas",
            "Replicas the work arriving at the stage keeps busy (device-seconds arriving per second).",
            tag_keys=("stage",))


@lru_cache(maxsize=1)
def autoscaler_metrics() -> AutoscalerMetrics:
    return AutoscalerMetrics()

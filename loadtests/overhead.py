"""A job's overhead in `ditserve loadtest ceiling` (loadtests/ceiling.py): its latency (submitted ->
completed, from its own timestamps) minus the device seconds the profile gives it, and the same
split into contiguous segments between its timestamps, which add up to the whole."""

from __future__ import annotations

from dataclasses import dataclass

from serving.cost_model import StageSeconds

# (name, from timestamp, to timestamp, the stage whose device seconds the span holds):
# contiguous, so the segments' overheads add up to the job's.
SEGMENTS = (
    ("pickup", "submitted_at", "text_encoder_started_at", None),  # until the Director claims it
    ("text_encoder", "text_encoder_started_at", "text_encoder_finished_at", "text_encoder"),
    ("to_denoiser", "text_encoder_finished_at", "denoiser_started_at", None),  # routing, the engine taking it
    ("denoiser", "denoiser_started_at", "denoiser_finished_at", "denoiser"),  # streaming steps, progress writes
    ("to_vae_decoder", "denoiser_finished_at", "vae_decoder_started_at", None),
    ("vae_decoder", "vae_decoder_started_at", "vae_decoder_finished_at", "vae_decoder"),  # incl. MP4 mux, writes
    ("to_completed", "vae_decoder_finished_at", "completed_at", None),
)


@dataclass(frozen=True)
class JobOverhead:
    """One completed job, uncompressed seconds."""

    latency_s: float
    overhead_s: float
    segments: dict[str, float | None]  # SEGMENTS' overheads; None where a timestamp is missing

    @property
    def share(self) -> float:
        return self.overhead_s / self.latency_s


def job_overhead(timestamps: dict[str, float], ideal: StageSeconds, time_scale: float) -> JobOverhead | None:
    """From a video object's `timestamps` (compressed clock); None unless it completed."""
    if "submitted_at" not in timestamps or "completed_at" not in timestamps:
        return None
    latency = (timestamps["completed_at"] - timestamps["submitted_at"]) * time_scale
    segments = {}
    for name, start, end, stage in SEGMENTS:
        if start in timestamps and end in timestamps:
            segments[name] = (timestamps[end] - timestamps[start]) * time_scale - (ideal.of(stage) if stage else 0.0)
        else:
            segments[name] = None
    return JobOverhead(latency, latency - ideal.total, segments)

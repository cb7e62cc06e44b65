"""The timings a finished job's responses carry in `Server-Timing`, from its own timestamps:
what peers' benchmark clients read (TensorRT-LLM's `benchmark_visual_gen` takes
`generation` and `denoise` from the download's headers; the sync route adds vLLM-Omni's
`x-inference-time-s`)."""

from __future__ import annotations

from serving.jobs.records import JobRecord

# Server-Timing metric -> (from, to) of the job's own timestamps.
TIMINGS = {
    "queue": ("submitted_at", "text_encoder_started_at"),
    "encode": ("text_encoder_started_at", "text_encoder_finished_at"),
    "denoise": ("denoiser_started_at", "denoiser_finished_at"),
    "decode": ("vae_decoder_started_at", "vae_decoder_finished_at"),
    "generation": ("text_encoder_started_at", "vae_decoder_finished_at"),  # the model's work, queue excluded
    "total": ("submitted_at", "completed_at"),
}


def server_timing(job: JobRecord) -> dict[str, float]:
    """Milliseconds of each span the job's timestamps cover."""
    stamps = job.timestamps
    return {name: round(1000.0 * (stamps[end] - stamps[start]), 1) for name, (start, end) in TIMINGS.items()
            if start in stamps and end in stamps and stamps[end] >= stamps[start]}


def timing_headers(job: JobRecord) -> dict[str, str]:
    """`Server-Timing` (ms) and `x-inference-time-s` (the generation span) of a finished job."""
    timing = server_timing(job)
    headers = {"Server-Timing": ", ".join(f"{name};dur={ms:g}" for name, ms in timing.items())} if timing else {}
    if "generation" in timing:
        headers["x-inference-time-s"] = f"{timing['generation'] / 1000.0:.3f}"
    return headers

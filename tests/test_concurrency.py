"""Five jobs at once through the SDK: every one completes with a playable MP4 of the right length."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import av


def test_five_concurrent_jobs_complete(service):
    client = service.client()
    requests_ = [dict(seconds="1", fps=16, frames=17), dict(seconds="0.5", fps=16, frames=9),
                 dict(seconds="1", fps=8, frames=9), dict(seconds="0.25", fps=16, frames=5),
                 dict(seconds="1", fps=24, frames=25)]

    def run(index: int, request: dict):
        video = client.videos.create_and_poll(
            prompt=f"concurrent job {index}", seconds=request["seconds"], size="64x64",
            extra_body={"fps": request["fps"], "seed": index, "num_inference_steps": 3}, poll_interval_ms=200)
        return video, client.videos.download_content(video.id).read()

    with ThreadPoolExecutor(max_workers=5) as pool:
        results = list(pool.map(lambda item: run(*item), enumerate(requests_)))

    for request, (video, data) in zip(requests_, results):
        assert video.status == "completed", video.error
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            assert sum(1 for _ in container.decode(stream)) == request["frames"]
            assert float(stream.average_rate) == request["fps"]

"""MP4 muxing: uint8 frames -> H.264 MP4 bytes through PyAV, at the request's real fps."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import torch


SIMULATED_TITLE = "SIMULATED ditserve output (no model ran)"


def encode_mp4(frames: torch.Tensor | np.ndarray, fps: int, qp: int = 18, simulated_by: str | None = None) -> bytes:
    """Encode frames (T, H, W, 3) uint8 RGB as H.264 (yuv420p, playable everywhere).
    `simulated_by` (a cost profile's name) marks the file as simulated in its metadata."""
    array = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames of shape (T, H, W, 3), got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        if simulated_by is not None:
            container.metadata.update({"title": SIMULATED_TITLE,
                                       "comment": f"simulated: true; cost profile: {simulated_by}"})
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = array.shape[2], array.shape[1]
        stream.pix_fmt = "yuv420p"
        # A constant quantizer, not CRF: x264's CRF rate control works in floating point and
        # gave different bytes for the same frames depending on the process's float state
        # (e.g. after torch changed its thread count); the same seed must give the same MP4
        # on every replica.
        stream.options = {"qp": str(qp)}
        for image in array:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()

"""Downloads of a finished video (or its thumbnail): streamed from the artifact store in
chunks, so each download holds one chunk in memory whatever the file's size, with single
byte ranges (`Range: bytes=...`, answered 206, or 416 when unsatisfiable) for players
that seek."""

from __future__ import annotations

import asyncio

from fastapi.responses import StreamingResponse

from serving.api.errors import APIError
from serving.storage import ArtifactStore

CHUNK_BYTES = 1 << 20


async def content_response(artifacts: ArtifactStore, key: str, media_type: str, filename: str,
                           range_header: str | None) -> StreamingResponse:
    size = await asyncio.to_thread(artifacts.size, key)
    span = parse_range(range_header, size)
    start, end = span if span is not None else (0, size - 1)
    headers = {"Accept-Ranges": "bytes", "Content-Disposition": f'inline; filename="{filename}"',
               "Content-Length": str(end + 1 - start)}
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    # A sync iterator: Starlette reads each chunk in a worker thread, off the event loop.
    chunks = artifacts.read_chunks(key, start, end + 1, CHUNK_BYTES)
    return StreamingResponse(chunks, status_code=206 if span is not None else 200, media_type=media_type,
                             headers=headers)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """An inclusive byte span from a single-range `Range` header, or None for the whole file."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec or "-" not in spec:
        raise _unsatisfiable(size)
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":  # the last N bytes
            start, end = max(0, size - int(last)), size - 1
        else:
            start, end = int(first), (int(last) if last else size - 1)
    except ValueError:
        raise _unsatisfiable(size) from None
    end = min(end, size - 1)
    if start > end or start >= size:
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> APIError:
    return APIError(416, f"Range not satisfiable; the file has {size} bytes", param="Range",
                    code="range_not_satisfiable", headers={"Content-Range": f"bytes */{size}"})

"""Downloads on a live Gateway app (uvicorn, real HTTP, a real artifact folder; no Ray): a
video far larger than the read chunk streams through in constant memory, byte for byte, with
Content-Length; single byte ranges still answer 206 (across chunk boundaries) or 416."""

from __future__ import annotations

import hashlib
import os
import tracemalloc

import boto3
import pytest
import requests
from moto.server import ThreadedMotoServer

from live_api import config_for, live_api
from serving.api.content import CHUNK_BYTES
from serving.storage import ArtifactStore

SIZE = 24 * CHUNK_BYTES + 12345  # many chunks, the last one partial


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    data = os.urandom(SIZE)
    with live_api(config_for(tmp_path_factory.mktemp("downloads"))) as api:
        video_id = requests.post(f"{api.url}/v1/videos", json={"prompt": "a big one"}).json()["id"]
        api.finish(video_id, data)
        yield api, f"{api.url}/v1/videos/{video_id}/content", data


def test_a_large_download_streams_in_constant_memory_byte_for_byte(finished):
    api, url, data = finished
    digest, received = hashlib.sha256(), 0
    tracemalloc.start()
    try:
        with requests.get(url, stream=True, timeout=60) as response:
            assert response.status_code == 200
            assert int(response.headers["Content-Length"]) == SIZE
            for piece in response.iter_content(64 * 1024):
                digest.update(piece)
                received += len(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == SIZE and digest.digest() == hashlib.sha256(data).digest()
    # Server and client together held a few chunks at most, never the 24 MiB file.
    assert peak < 6 * CHUNK_BYTES, f"peak {peak / CHUNK_BYTES:.1f} MiB"


@pytest.mark.parametrize("header,start,end", [
    ("bytes=0-99", 0, 99),
    (f"bytes={CHUNK_BYTES - 10}-{3 * CHUNK_BYTES + 10}", CHUNK_BYTES - 10, 3 * CHUNK_BYTES + 10),
    ("bytes=-500", SIZE - 500, SIZE - 1),
    (f"bytes={SIZE - 3}-", SIZE - 3, SIZE - 1),
])
def test_byte_ranges_are_206_with_the_exact_bytes(finished, header, start, end):
    _, url, data = finished
    response = requests.get(url, headers={"Range": header}, timeout=60)
    assert response.status_code == 206
    assert response.headers["Content-Range"] == f"bytes {start}-{end}/{SIZE}"
    assert int(response.headers["Content-Length"]) == end + 1 - start
    assert response.content == data[start:end + 1]


@pytest.mark.parametrize("header", [f"bytes={SIZE}-", "bytes=5-2", "items=0-1", "bytes=0-1,4-5"])
def test_unsatisfiable_ranges_are_416(finished, header):
    _, url, _ = finished
    response = requests.get(url, headers={"Range": header}, timeout=60)
    assert response.status_code == 416 and response.headers["Content-Range"] == f"bytes */{SIZE}"
    assert response.json()["error"]["param"] == "Range"


def test_chunked_reads_from_an_s3_bucket_are_ranged_and_exact():
    """The same reads against an object store (moto's S3 server on 127.0.0.1)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        credentials = {"key": "testing", "secret": "testing"}  # moto takes any; never real ones
        boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="videos")
        store = ArtifactStore("s3://videos/artifacts", {"endpoint_url": f"http://{host}:{port}", **credentials,
                                                        "client_kwargs": {"region_name": "us-east-1"}})
        data = os.urandom(3 * CHUNK_BYTES + 777)
        store.put("video_x/video.mp4", data)
        pieces = list(store.read_chunks("video_x/video.mp4", 5, len(data), CHUNK_BYTES))
        assert len(pieces) == 4 and all(len(p) <= CHUNK_BYTES for p in pieces)
        assert b"".join(pieces) == data[5:]
    finally:
        server.stop()

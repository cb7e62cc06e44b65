"""The artifact store on a real S3-protocol server (moto in server mode, on loopback) through
s3fs, as in production: a delete removes every object of a job even after a readiness ping
listed the store; readiness reaches the bucket on every call; a delete the store refuses is
answered 202 and finished by the storage sweep, never silently orphaned; the list goes on
past a deleted video. The Gateway's API runs in-process on real HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from contextlib import contextmanager

import boto3
import pytest
import requests
import uvicorn
from moto.server import ThreadedMotoServer

from serving.api.app import create_api
from serving.config import load_config
from serving.jobs.retention import StorageSweeper
from serving.jobs.videos import VideoJobs
from serving.storage import ArtifactStore, ArtifactStoreError

CREDENTIALS = {"key": "testing", "secret": "testing"}  # moto accepts any; never real ones


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoS3:
    """moto's S3 server on 127.0.0.1; `down()` stops it for a while (its buckets live on in
    this process), as an unreachable store."""

    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._start()

    def _start(self):
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    @contextmanager
    def down(self):
        self.server.stop()
        try:
            yield
        finally:
            self._start()

    def client(self):
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=CREDENTIALS["key"], aws_secret_access_key=CREDENTIALS["secret"])

    def options(self) -> dict:
        # Fail fast while the server is down: one attempt, a short connect timeout.
        return {"endpoint_url": self.url, **CREDENTIALS, "client_kwargs": {"region_name": "us-east-1"},
                "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}


@pytest.fixture(scope="module")
def s3():
    server = MotoS3()
    yield server
    server.server.stop()


@pytest.fixture
def bucket(s3):
    name = f"ditserve-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


def objects(s3, bucket: str) -> list[str]:
    """Every key in the bucket, as S3 itself lists it (no fsspec in between)."""
    return sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", []))


def job_id() -> str:
    return f"video_{uuid.uuid4().hex}"


def test_delete_after_a_readiness_ping_removes_every_object(s3, bucket):
    store = ArtifactStore(f"s3://{bucket}/videos", s3.options())
    store.put(f"{job_id()}/video.mp4", b"another video")  # the store is not empty at the ping
    store.ping()  # the Gateway's readiness check lists the store before the job exists
    victim = job_id()
    writer = s3.client()  # the Director: another process, another client
    for name in ("denoise-checkpoint.pt", "video.mp4", "thumbnail.webp"):
        writer.put_object(Bucket=bucket, Key=f"videos/{victim}/{name}", Body=b"bytes")

    store.delete_prefix(victim)
    assert [key for key in objects(s3, bucket) if victim in key] == []
    store.delete_prefix(victim)  # deleting again is fine: nothing there


def test_delete_raises_when_the_store_is_unreachable(s3, bucket):
    store = ArtifactStore(f"s3://{bucket}/videos", s3.options())
    victim = job_id()
    store.put(f"{victim}/video.mp4", b"mp4")
    with s3.down(), pytest.raises(ArtifactStoreError):
        store.delete_prefix(victim)
    assert objects(s3, bucket) == [f"videos/{victim}/video.mp4"]


def test_readiness_reaches_the_bucket_on_every_call(s3, bucket):
    store = ArtifactStore(f"s3://{bucket}/videos", s3.options())
    store.ping()  # an empty bucket is ready
    store.put(f"{job_id()}/video.mp4", b"mp4")
    store.ping()
    client = s3.client()
    for key in objects(s3, bucket):
        client.delete_object(Bucket=bucket, Key=key)
    client.delete_bucket(Bucket=bucket)
    with pytest.raises(FileNotFoundError):
        store.ping()


# ---- through the API, on real HTTP --------------------------------------------------------


@pytest.fixture
def api(s3, bucket, tmp_path):
    config = load_config(None, environ={
        "DITSERVE_STORAGE__JOB_STORE_URL": f"sqlite:///{tmp_path}/jobs.db",
        "DITSERVE_STORAGE__ARTIFACTS_URL": f"s3://{bucket}/videos",
        "DITSERVE_STORAGE__ARTIFACTS_OPTIONS": json.dumps(s3.options()),
    })
    jobs = VideoJobs(config)
    server = uvicorn.Server(uvicorn.Config(create_api(config, jobs), host="127.0.0.1", port=_free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}", jobs
    server.should_exit = True
    thread.join(timeout=10)


def finished_video(jobs: VideoJobs) -> str:
    """A job with the files a Director leaves: checkpoint, video and thumbnail."""
    job, _ = jobs.submit({"prompt": "a red fox"})
    for name in ("denoise-checkpoint.pt", "video.mp4", "thumbnail.webp"):
        jobs.artifacts.put(f"{job.id}/{name}", b"bytes")
    return job.id


def test_delete_the_store_refuses_is_202_and_finished_by_the_sweep(s3, bucket, api):
    url, jobs = api
    assert requests.get(f"{url}/readyz", timeout=10).json()["checks"]["storage"] is True
    video = finished_video(jobs)
    with s3.down():
        response = requests.delete(f"{url}/v1/videos/{video}", timeout=30)
        assert response.status_code == 202, response.text  # deleted, but its files are not gone yet
        assert response.json() == {"id": video, "object": "video.deleted", "deleted": True}
        assert requests.get(f"{url}/v1/videos/{video}", timeout=10).status_code == 404  # gone from the API at once
        assert requests.get(f"{url}/readyz", timeout=30).json()["checks"]["storage"] is False
    assert len(objects(s3, bucket)) == 3  # the files outlived the delete...

    result = StorageSweeper(jobs.store, jobs.artifacts, retention_hours=None).run()
    assert result.files_deleted == [video] and objects(s3, bucket) == []  # ...until the next sweep
    assert requests.delete(f"{url}/v1/videos/{video}", timeout=10).status_code == 404


def test_delete_with_the_store_up_is_200_and_leaves_nothing(s3, bucket, api):
    url, jobs = api
    requests.get(f"{url}/readyz", timeout=10)  # a readiness ping first, as in production
    video = finished_video(jobs)
    response = requests.delete(f"{url}/v1/videos/{video}", timeout=30)
    assert response.status_code == 200 and response.json()["deleted"] is True
    assert objects(s3, bucket) == []
    assert StorageSweeper(jobs.store, jobs.artifacts, retention_hours=None).run().files_deleted == []


def test_the_list_goes_on_past_a_deleted_video(api):
    url, jobs = api
    ids = [jobs.submit({"prompt": f"video {i}"})[0].id for i in range(5)]
    page = requests.get(f"{url}/v1/videos", params={"limit": 2, "order": "asc"}, timeout=10).json()
    assert [v["id"] for v in page["data"]] == ids[:2] and page["has_more"]
    assert requests.delete(f"{url}/v1/videos/{page['last_id']}", timeout=30).status_code == 200

    after = requests.get(f"{url}/v1/videos", params={"after": page["last_id"], "limit": 2, "order": "asc"},
                         timeout=10)
    assert after.status_code == 200, after.text
    assert [v["id"] for v in after.json()["data"]] == ids[2:4]
    everything = requests.get(f"{url}/v1/videos", params={"limit": 100}, timeout=10).json()["data"]
    assert [v["id"] for v in everything] == [ids[4], ids[3], ids[2], ids[0]]  # the deleted one is not listed
    unknown = requests.get(f"{url}/v1/videos", params={"after": job_id()}, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "after"

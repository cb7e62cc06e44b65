"""Retention: nothing expires by default; with retention set, expired videos and files go."""

from __future__ import annotations

import time

from serving.config import load_config
from serving.jobs.records import JobRecord, JobStatus, new_job_id
from serving.jobs.retention import sweep_expired
from serving.jobs.store import JobStore
from serving.storage import ArtifactStore


def test_sweep_deletes_only_expired_jobs_and_their_files(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    artifacts = ArtifactStore(str(tmp_path / "artifacts"))
    now = time.time()

    def completed(expires_at):
        job = JobRecord(id=new_job_id(), created_at=now, status=JobStatus.COMPLETED, model="tiny",
                        spec={"prompt": "x"}, expires_at=expires_at, video_key="v")
        store.create(job)
        artifacts.put(f"{job.id}/video.mp4", b"mp4 bytes")
        return job.id

    kept_forever, kept_for_now, expired = completed(None), completed(now + 3600), completed(now - 1)
    assert sweep_expired(store, artifacts, now=now) == [expired]
    assert store.get(expired) is None and not artifacts.exists(f"{expired}/video.mp4")
    for job_id in (kept_forever, kept_for_now):
        assert store.get(job_id) is not None and artifacts.exists(f"{job_id}/video.mp4")


def test_retention_is_off_by_default():
    assert load_config(None, environ={}).storage.retention_hours is None

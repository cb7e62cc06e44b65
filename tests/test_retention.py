"""Every file a job made goes with it or by retention, on both job stores (SQLite, and
Postgres when DITSERVE_TEST_POSTGRES_URL is set) with a local artifact folder:
- a deleted job is a tombstone at once: no read, list, count or Director sees it again;
- retention ends completed, failed and cancelled jobs alike, each announced by `expires_at`;
- a driver's files for a job deleted under it are removed; a finished job keeps only its
  outputs, while a job that can still be retried keeps its checkpoint;
- the storage sweep removes prefixes no row accounts for, once past the grace period.
(The S3 side, the API's 202 and the list cursor are in test_s3.py.)"""

from __future__ import annotations

import time

import pytest

from serving.config import load_config
from serving.jobs.records import JobStatus, new_job_id
from serving.jobs.retention import (ORPHAN_GRACE_SECONDS, TOMBSTONE_KEEP_SECONDS, StorageSweeper, delete_job,
                                    tidy_after_run)
from serving.jobs.store import LeaseLost
from serving.storage import ArtifactStore
from test_jobstore import job  # the `store` fixture (SQLite and Postgres) is conftest's

OUTPUTS = ("video.mp4", "thumbnail.webp")
CHECKPOINT = "denoise-checkpoint.pt"


@pytest.fixture
def artifacts(tmp_path):
    return ArtifactStore(str(tmp_path / "artifacts"))


def ended(store, status: JobStatus, expires_at: float | None = None) -> str:
    """A job that ended in `status`, with the files its run left: a checkpoint, and the
    outputs if it completed."""
    record = job()
    record.status, record.expires_at = status, expires_at
    if status == JobStatus.COMPLETED:
        record.video_key, record.thumbnail_key = (f"{record.id}/{name}" for name in OUTPUTS)
    store.create(record)
    return record.id


def write_files(artifacts, job_id: str, names=(CHECKPOINT, *OUTPUTS)) -> None:
    for name in names:
        artifacts.put(f"{job_id}/{name}", b"bytes")


def test_retention_deletes_only_expired_jobs_and_their_files(store, artifacts):
    now = time.time()
    kept_for_now = ended(store, JobStatus.COMPLETED, now + 3600)
    expired = ended(store, JobStatus.COMPLETED, now - 1)
    for job_id in (kept_for_now, expired):
        write_files(artifacts, job_id, OUTPUTS)
    assert StorageSweeper(store, artifacts, retention_hours=2).run(now=now).expired == [expired]
    assert store.get(expired) is None and artifacts.keys(expired) == []
    assert store.get(kept_for_now) is not None and len(artifacts.keys(kept_for_now)) == 2


@pytest.mark.parametrize("status", [JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.COMPLETED])
def test_retention_ends_failed_and_cancelled_jobs_too_announced_first(store, artifacts, status):
    # Ended without an expires_at: cancelled in the API while queued, or before retention was on.
    job_id = ended(store, status)
    write_files(artifacts, job_id)
    running = store.create(job())[0].id
    sweeper = StorageSweeper(store, artifacts, retention_hours=1)
    now = time.time()
    assert sweeper.run(now=now).expired == []
    assert store.get(job_id).expires_at == pytest.approx(now + 3600)  # the client sees when it goes
    assert store.get(running).expires_at is None  # a job still running never expires

    assert sweeper.run(now=now + 3601).expired == [job_id]
    assert store.get(job_id) is None and artifacts.keys(job_id) == []


def test_nothing_expires_with_retention_off(store, artifacts):
    job_id = ended(store, JobStatus.FAILED)
    StorageSweeper(store, artifacts, retention_hours=None).run(now=time.time() + 10 * 365 * 86400)
    assert store.get(job_id).expires_at is None
    assert load_config(None, environ={}).storage.retention_hours is None


def test_a_deleted_job_is_invisible_and_undrivable_at_once(store, artifacts):
    record = job(key="owner/k1", request_hash="h")
    record.owner = "alice"
    store.create(record)
    [claimed] = store.claim("director-1", lease_seconds=30, limit=1)
    store.update(claimed.id, "director-1", status=JobStatus.IN_PROGRESS)
    queued_ahead = store.create(job())[0]
    waiting = store.create(job())[0]
    assert store.tombstone(queued_ahead.id) is not None
    assert store.queue_position(waiting.id) == 1  # a deleted job holds no place in the queue

    assert store.tombstone(record.id) is not None
    assert store.tombstone(record.id) is None  # deleting twice: no such job
    assert store.get(record.id) is None
    assert [j.id for j in store.list(limit=10)[0]] == [waiting.id]
    assert store.count_active("alice") == 0 and store.count_by_status() == {"queued": 1}
    with pytest.raises(LeaseLost):  # its driver's next heartbeat stops it
        store.renew(record.id, "director-1", 30)
    later = time.time() + 3600  # long after any lease would have run out
    assert [j.id for j in store.claim("director-2", lease_seconds=30, limit=5, now=later)] == [waiting.id]
    # Its idempotency key is free again: the same request makes a new video.
    again, created = store.create(job(key="owner/k1", request_hash="h"))
    assert created and again.id != record.id
    assert store.is_cursor(record.id, "alice") and not store.is_cursor(record.id, "mallory")


def test_tombstones_are_dropped_a_day_after_their_files_are_gone(store, artifacts):
    job_id = ended(store, JobStatus.COMPLETED)
    write_files(artifacts, job_id)
    assert delete_job(store, artifacts, job_id) is True and artifacts.keys(job_id) == []
    sweeper = StorageSweeper(store, artifacts, retention_hours=None)
    now = time.time()
    assert sweeper.run(now=now).tombstones_dropped == 0 and store.is_cursor(job_id)
    assert sweeper.run(now=now + TOMBSTONE_KEEP_SECONDS + 1).tombstones_dropped == 1
    assert not store.is_cursor(job_id)


def test_files_a_driver_writes_after_the_job_was_deleted_are_removed(store, artifacts):
    record = store.create(job())[0]
    store.claim("director-1", lease_seconds=30, limit=1)
    write_files(artifacts, record.id, [CHECKPOINT])  # the Denoiser checkpointed
    assert delete_job(store, artifacts, record.id) is True  # the user deletes mid-decode
    write_files(artifacts, record.id, OUTPUTS)  # the Director stores the decoded video anyway
    with pytest.raises(LeaseLost):  # its completion write is refused...
        store.stamp(record.id, "director-1", ["completed_at"], status=JobStatus.COMPLETED)
    tidy_after_run(store, artifacts, record.id)  # ...and on its way out it removes what it wrote
    assert artifacts.keys(record.id) == []


@pytest.mark.parametrize("status, left", [(JobStatus.COMPLETED, list(OUTPUTS)), (JobStatus.FAILED, []),
                                          (JobStatus.CANCELLED, [])])
def test_a_finished_job_keeps_only_its_outputs(store, artifacts, status, left):
    job_id = ended(store, status)
    write_files(artifacts, job_id, [CHECKPOINT, *left])
    tidy_after_run(store, artifacts, job_id)
    assert sorted(artifacts.keys(job_id)) == sorted(f"{job_id}/{name}" for name in left)


@pytest.mark.parametrize("status", [JobStatus.QUEUED, JobStatus.IN_PROGRESS])
def test_a_job_that_can_still_be_retried_keeps_its_checkpoint(store, artifacts, status):
    # Its driver lost the lease (taken over) or handed it back after a replica died.
    job_id = ended(store, status)
    write_files(artifacts, job_id, [CHECKPOINT])
    tidy_after_run(store, artifacts, job_id)
    StorageSweeper(store, artifacts, retention_hours=1).run(now=time.time() + ORPHAN_GRACE_SECONDS + 1)
    assert artifacts.keys(job_id) == [f"{job_id}/{CHECKPOINT}"]


def test_the_storage_sweep_removes_what_no_job_accounts_for(store, artifacts, tmp_path):
    orphan = new_job_id()  # e.g. a checkpoint that landed after its job's row was dropped
    write_files(artifacts, orphan, [CHECKPOINT])
    finished = ended(store, JobStatus.COMPLETED)  # its driver died before tidying
    write_files(artifacts, finished)
    running = store.create(job())[0].id
    write_files(artifacts, running, [CHECKPOINT])
    artifacts.put("README.txt", b"not ours")  # anything but job prefixes is left alone

    now = time.time()
    soon = StorageSweeper(store, artifacts, retention_hours=None).run(now=now)
    assert soon.orphans == []  # too recent: its writer may still be at work
    assert soon.scratch == [f"{finished}/{CHECKPOINT}"]
    later = StorageSweeper(store, artifacts, retention_hours=None).run(now=now + ORPHAN_GRACE_SECONDS + 1)
    assert later.orphans == [orphan] and artifacts.keys(orphan) == []
    assert sorted(artifacts.keys()) == sorted(["README.txt", f"{running}/{CHECKPOINT}",
                                               *(f"{finished}/{name}" for name in OUTPUTS)])


def test_the_storage_sweep_lists_the_store_only_now_and_then(store, artifacts):
    sweeper = StorageSweeper(store, artifacts, retention_hours=None, store_sweep_seconds=3600)
    now = time.time()
    sweeper.run(now=now)
    orphan = new_job_id()
    write_files(artifacts, orphan, [CHECKPOINT])
    assert sweeper.run(now=now + ORPHAN_GRACE_SECONDS - 1).orphans == []  # not due yet
    assert sweeper.run(now=now + 3600 + ORPHAN_GRACE_SECONDS).orphans == [orphan]

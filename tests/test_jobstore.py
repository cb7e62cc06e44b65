"""The job store on both backends: an SQLite file, and PostgreSQL (started by .ci/postgres.sh)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.jobs.records import JobRecord, JobStatus, Stage, new_job_id
from serving.jobs.store import IdempotencyConflict, JobStore, LeaseLost, metadata

POSTGRES_ENV = "DITSERVE_TEST_POSTGRES_URL"


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    else:
        url = os.environ.get(POSTGRES_ENV)
        if not url:
            if os.environ.get("CI"):
                pytest.fail(f"{POSTGRES_ENV} is not set: .ci/run must start PostgreSQL")
            pytest.skip(f"set {POSTGRES_ENV} (see .ci/postgres.sh) to test the Postgres job store")
        store = JobStore(url)
        metadata.drop_all(store.engine)  # a clean table per test on the shared server
        metadata.create_all(store.engine)
    yield store
    store.close()


def job(prompt="a red fox", key=None, request_hash=None) -> JobRecord:
    now = time.time()
    spec = {"prompt": prompt, "width": 64, "height": 64, "num_frames": 17, "fps": 16}
    return JobRecord(id=new_job_id(), created_at=now, status=JobStatus.QUEUED, model="tiny", spec=spec,
                     timestamps={"submitted_at": now}, idempotency_key=key, request_hash=request_hash)


def test_round_trip(store):
    record, created = store.create(job())
    assert created
    loaded = store.get(record.id)
    assert loaded == record
    assert store.get(new_job_id()) is None


def test_list_pages_in_creation_order(store):
    ids = [store.create(job(f"p{i}"))[0].id for i in range(5)]
    page, more = store.list(limit=2, order="desc")
    assert [j.id for j in page] == ids[::-1][:2] and more
    page, more = store.list(after=page[-1].id, limit=10, order="desc")
    assert [j.id for j in page] == ids[::-1][2:] and not more
    page, more = store.list(after=ids[1], limit=2, order="asc")
    assert [j.id for j in page] == ids[2:4] and more


def test_idempotency_key(store):
    first, created = store.create(job(key="k", request_hash="h1"))
    again, created_again = store.create(job(key="k", request_hash="h1"))
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        store.create(job(key="k", request_hash="h2"))


def test_claim_lease_and_takeover(store):
    a, _ = store.create(job())
    b, _ = store.create(job())
    claimed = store.claim("director-1", lease_seconds=30, limit=1)
    assert [j.id for j in claimed] == [a.id]  # oldest first
    assert [j.id for j in store.claim("director-2", lease_seconds=30, limit=5)] == [b.id]
    assert store.claim("director-3", lease_seconds=30, limit=5) == []

    store.update(a.id, "director-1", status=JobStatus.IN_PROGRESS, stage=Stage.DENOISER)
    with pytest.raises(LeaseLost):
        store.update(a.id, "director-2", progress=50)
    # director-1 goes silent: once its lease runs out, another takes the job over.
    later = time.time() + 31
    taken = store.claim("director-3", lease_seconds=30, limit=5, now=later)
    assert [j.id for j in taken] == [a.id, b.id]
    assert taken[0].attempts == 2
    with pytest.raises(LeaseLost):
        store.update(a.id, "director-1", progress=60)  # the old driver can no longer write


def test_racing_claims_take_each_job_once(store):
    ids = {store.create(job(f"race {i}"))[0].id for i in range(12)}
    with ThreadPoolExecutor(max_workers=4) as pool:
        batches = list(pool.map(lambda n: store.claim(f"director-{n}", 30, 12), range(4)))
    claimed = [j.id for batch in batches for j in batch]
    assert sorted(claimed) == sorted(ids)  # every job once, none twice


def test_stamp_and_cancel(store):
    queued, _ = store.create(job())
    running, _ = store.create(job())
    store.claim("d", 30, 5)
    stamped = store.stamp(running.id, "d", ["text_encoder_started_at"], status=JobStatus.IN_PROGRESS,
                          stage=Stage.TEXT_ENCODER)
    assert "text_encoder_started_at" in stamped.timestamps and "submitted_at" in stamped.timestamps
    assert store.request_cancel(running.id).cancel_requested
    assert store.get(running.id).status == JobStatus.IN_PROGRESS  # its driver stops it
    fresh, _ = store.create(job())
    cancelled = store.request_cancel(fresh.id)
    assert cancelled.status == JobStatus.CANCELLED and cancelled.error_code == "cancelled"
    assert store.request_cancel(new_job_id()) is None


def test_queue_position_and_delete(store):
    ids = [store.create(job())[0].id for _ in range(3)]
    assert [store.queue_position(i) for i in ids] == [1, 2, 3]
    assert store.delete(ids[0]).id == ids[0]
    assert store.get(ids[0]) is None and store.delete(ids[0]) is None
    assert store.queue_position(ids[2]) == 2


def test_claim_takes_higher_priority_first(store):
    low, _ = store.create(job("low"))
    high_record = job("high")
    high_record.priority = 5
    high, _ = store.create(high_record)
    assert [j.id for j in store.claim("d", 30, 1)] == [high.id]
    assert store.queue_position(low.id) == 1

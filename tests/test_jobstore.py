"""The job store on both backends: an SQLite file, and PostgreSQL (started by .ci/postgres.sh)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.jobs.records import JobRecord, JobStatus, Stage, new_job_id
from serving.jobs.store import IdempotencyConflict, JobStore, LeaseLost, metadata

from conftest import PostgresOutage, postgres_url

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


def test_terminal_state_writes_its_webhook_event_in_the_same_transaction(store):
    record = job()
    record.webhook_url = "http://127.0.0.1:9/hook"
    store.create(record)
    store.update(record.id, None, status=JobStatus.IN_PROGRESS)
    assert store.webhook_events_of(record.id) == []  # only a finished job announces itself
    store.update(record.id, None, status=JobStatus.COMPLETED)
    [event] = store.webhook_events_of(record.id)
    assert (event.type, event.url, event.attempts) == ("video.completed", record.webhook_url, 0)
    assert f'"data":{{"id":"{record.id}"}}' in event.body

    now = time.time()
    [claimed] = store.claim_webhooks(limit=10, hold_seconds=60, now=now)
    assert claimed.id == event.id and claimed.attempts == 1
    assert store.claim_webhooks(limit=10, hold_seconds=60, now=now) == []  # held by the first sender
    store.webhook_attempted(event.id, delivered=False, error="HTTP 500", retry_at=now + 5)
    assert store.claim_webhooks(limit=10, hold_seconds=60, now=now + 1) == []
    [again] = store.claim_webhooks(limit=10, hold_seconds=60, now=now + 6)
    assert (again.id, again.body, again.attempts) == (event.id, event.body, 2)  # same event, same bytes
    store.webhook_attempted(event.id, delivered=True)
    assert store.claim_webhooks(limit=10, hold_seconds=60, now=now + 3600) == []
    assert store.webhook_events_of(record.id)[0].delivered_at is not None
    assert store.prune_webhook_events(older_than=now - 60) == 0
    assert store.prune_webhook_events(older_than=now + 60) == 1


def test_cancelling_a_queued_job_announces_it(store):
    record = job()
    record.webhook_url = "http://127.0.0.1:9/hook"
    store.create(record)
    store.request_cancel(record.id)
    assert [e.type for e in store.webhook_events_of(record.id)] == ["video.failed"]


def test_owner_scoped_lists_and_active_counts(store):
    mine, theirs = job("mine"), job("theirs")
    mine.owner, theirs.owner = "alpha", "beta"
    store.create(mine)
    store.create(theirs)
    assert [j.id for j in store.list(owner="alpha")[0]] == [mine.id]
    assert store.count_active("alpha") == 1
    store.update(mine.id, None, status=JobStatus.COMPLETED)
    assert store.count_active("alpha") == 0 and store.count_active("beta") == 1


def test_a_store_made_before_owners_and_webhooks_is_upgraded_in_place(tmp_path):
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path}/old.db"
    old = sa.MetaData()
    sa.Table("jobs", old, *[sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                            for c in metadata.tables["jobs"].columns if c.name not in ("owner", "webhook_url")])
    engine = sa.create_engine(url)
    old.create_all(engine)
    engine.dispose()
    store = JobStore(url)
    record = job()
    record.owner = "alpha"
    store.create(record)
    assert store.get(record.id).owner == "alpha"
    store.close()


# ---- terminal states are final; transient database faults are retried (issue 15, items 5 and 7)


def test_a_cancel_racing_a_claim_stays_cancelled_with_one_event(store):
    record = job()
    record.webhook_url = "http://127.0.0.1:9/hook"
    store.create(record)
    [claimed] = store.claim("director-1", lease_seconds=30, limit=1)  # claimed, not yet started...
    assert store.request_cancel(claimed.id).status == JobStatus.CANCELLED  # ...when the client cancels
    with pytest.raises(LeaseLost):  # the driver's first write is refused: the job never comes back
        store.stamp(claimed.id, "director-1", ["text_encoder_started_at"], status=JobStatus.IN_PROGRESS)
    with pytest.raises(LeaseLost):
        store.update(claimed.id, "director-1", status=JobStatus.CANCELLED, error_code="cancelled")
    assert store.get(claimed.id).status == JobStatus.CANCELLED
    assert [e.type for e in store.webhook_events_of(claimed.id)] == ["video.failed"]  # exactly one
    assert store.claim("director-2", lease_seconds=30, limit=5) == []


def test_a_finished_job_is_never_written_again(store):
    record, _ = store.create(job())
    store.claim("d", 30, 1)
    store.update(record.id, "d", status=JobStatus.COMPLETED, lease_owner=None)
    for owner in ("d", None):
        with pytest.raises(LeaseLost):
            store.update(record.id, owner, status=JobStatus.FAILED, error_code="late")
    later = time.time() + 3600
    assert store.claim("other", 30, 5, now=later) == []
    assert store.get(record.id).status == JobStatus.COMPLETED and store.get(record.id).error_code is None


def test_transient_errors_are_recognised():
    import sqlalchemy as sa

    from serving.jobs.store import is_transient

    assert is_transient(sa.exc.OperationalError("UPDATE jobs", {}, Exception("server closed the connection")))
    assert not is_transient(sa.exc.IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not is_transient(ValueError("bad spec"))


def test_a_postgres_outage_shorter_than_the_retry_window_loses_no_write():
    """The database refuses connections and drops every open one for ~1.5 s (a failover): the
    store's writes wait it out instead of failing the job."""
    import threading

    outage = PostgresOutage("a Postgres outage")
    store = JobStore(outage.url)
    try:
        record, _ = store.create(job())
        store.claim("d", 30, 1)
        outage.down()
        threading.Timer(1.5, outage.up).start()
        started = time.monotonic()
        written = store.stamp(record.id, "d", ["denoiser_started_at"], status=JobStatus.IN_PROGRESS,
                              stage=Stage.DENOISER, step=3)
        assert time.monotonic() - started >= 1.0  # it really met the outage
        assert written.step == 3 and store.get(record.id).stage == Stage.DENOISER
        assert store.create(job())[1]  # a new job is accepted once the database is back
    finally:
        store.close()
        outage.drop()


def test_a_retried_write_whose_first_try_committed_is_not_mistaken_for_a_lost_lease(store):
    """After an ambiguous failure (the commit landed, its answer did not) the retry's
    conditional write matches nothing; the store recognises its own write."""
    record, _ = store.create(job())
    store.claim("d", 30, 1)
    store.update(record.id, "d", status=JobStatus.COMPLETED, lease_owner=None)
    second_try = JobStore.stamp.__wrapped__  # what the retry loop runs after a transient error
    done = second_try(store, record.id, "d", (), _attempt=1, status=JobStatus.COMPLETED, lease_owner=None)
    assert done.status == JobStatus.COMPLETED
    with pytest.raises(LeaseLost):  # a different write is still refused
        second_try(store, record.id, "d", (), _attempt=1, status=JobStatus.FAILED, lease_owner=None)

"""`JobStore`: the job table in SQL (SQLite file by default, Postgres in production).

The row is the truth: every state change is committed here before anyone is told. Drivers
hold a lease on the jobs they run; a write from a driver that lost its lease is refused,
so a job taken over after a crash is never finished twice.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable

import sqlalchemy as sa
from sqlalchemy import event

from serving.cost_model import STAGE_NAMES, StageSeconds
from serving.jobs.outbox import WebhookEvent, WebhookOutbox, queue_webhook
from serving.jobs.records import JobRecord, JobStatus, Stage
from serving.jobs.tables import add_missing_columns, jobs, metadata, webhook_events
from serving.jobs.transient import TRANSIENT_RETRY_SECONDS, is_transient, retry_transient
from serving.jobs.usage import DELETED as DELETED_UNFINISHED
from serving.jobs.usage import UsageLedger, record_usage

# Re-exported: callers name the store's errors, tables and event type through this module.
__all__ = ["JobStore", "LeaseLost", "IdempotencyConflict", "WebhookEvent", "is_transient", "metadata",
           "webhook_events", "cost_fields", "DELETED"]

_FIELDS = [f.name for f in dataclasses.fields(JobRecord)]
_TERMINAL = [s.value for s in JobStatus if s.terminal]

_live = jobs.c.deleted_at.is_(None)  # not tombstoned: the only rows any reader sees

# Device seconds per stage, summed (0 over no rows).
_STAGE_SUMS = [sa.func.coalesce(sa.func.sum(jobs.c[f"{stage}_seconds"]), 0.0) for stage in STAGE_NAMES]


def cost_fields(seconds: StageSeconds) -> dict[str, float]:
    """A job's cost as its record's fields."""
    return {f"{stage}_seconds": seconds.of(stage) for stage in STAGE_NAMES}

# The lease owner of a tombstone: no Director holds it, none can claim it (it never expires).
DELETED = "deleted"

# Columns that hold what the user asked for: emptied when the job is deleted.
_CONTENT_CLEARED = {"spec": {}, "idempotency_key": None, "request_hash": None, "webhook_url": None,
                    "error_message": None}


class LeaseLost(Exception):
    """The driver no longer holds this job (it was taken over, deleted, or already ended:
    a finished job is never written again)."""


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


class JobStore(WebhookOutbox, UsageLedger):
    def __init__(self, url: str, transient_retry_seconds: float = TRANSIENT_RETRY_SECONDS):
        self.url = url
        self.transient_retry_seconds = transient_retry_seconds
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            _ensure_sqlite_folder(url)
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine = sa.create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        add_missing_columns(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.select(1))

    # ---- creating and reading -------------------------------------------------------

    @retry_transient
    def create(self, record: JobRecord, *, _attempt: int = 0) -> tuple[JobRecord, bool]:
        """Insert a queued job. With an idempotency key already used for the same request
        hash, return the earlier job instead (created=False); with another hash, raise."""
        row = _to_row(record)
        if _attempt and self.get(record.id) is not None:
            return record, True  # the earlier try committed before its connection broke
        with self.engine.begin() as conn:
            if record.idempotency_key:
                existing = conn.execute(
                    sa.select(jobs).where(jobs.c.idempotency_key == record.idempotency_key)
                ).mappings().first()
                if existing is not None:
                    if existing["request_hash"] != record.request_hash:
                        raise IdempotencyConflict(record.idempotency_key)
                    return _from_row(existing), False
            try:
                conn.execute(jobs.insert().values(**row))
            except sa.exc.IntegrityError:
                # Two requests raced on one idempotency key: the loser reads the winner.
                conn.rollback()
                return self._after_race(record)
        return record, True

    def _after_race(self, record: JobRecord) -> tuple[JobRecord, bool]:
        existing = self.get_by_idempotency_key(record.idempotency_key) if record.idempotency_key else None
        if existing is None:
            return self.create(record)
        if existing.request_hash != record.request_hash:
            raise IdempotencyConflict(record.idempotency_key)
        return existing, False

    @retry_transient
    def get(self, job_id: str) -> JobRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id, _live)).mappings().first()
        return _from_row(row) if row else None

    @retry_transient
    def get_by_idempotency_key(self, key: str) -> JobRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.idempotency_key == key, _live)).mappings().first()
        return _from_row(row) if row else None

    @retry_transient
    def get_many(self, job_ids: Iterable[str]) -> dict[str, JobRecord]:
        """The live jobs among `job_ids`, by id (deleted and unknown ones are absent)."""
        ids, found = list(job_ids), {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):  # bounded IN lists
                rows = conn.execute(sa.select(jobs).where(jobs.c.id.in_(ids[start:start + 500]), _live)).mappings()
                found.update((row["id"], _from_row(row)) for row in rows)
        return found

    @retry_transient
    def is_cursor(self, job_id: str, owner: str | None = None) -> bool:
        """Whether `job_id` can start a list page: a live job, or a deleted one whose
        tombstone still holds its place (so paging on past a deleted video works)."""
        query = sa.select(jobs.c.seq).where(jobs.c.id == job_id)
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        with self.engine.connect() as conn:
            return conn.execute(query).first() is not None

    @retry_transient
    def list(self, *, after: str | None = None, limit: int = 20, order: str = "desc",
             owner: str | None = None) -> tuple[list[JobRecord], bool]:
        """A page of jobs by creation order, starting after the job `after`; and whether more
        follow. With `owner`, only that API key's jobs. `after` may be a deleted job (see `is_cursor`)."""
        query = sa.select(jobs).where(_live)
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        descending = order == "desc"
        if after is not None:
            cursor = sa.select(jobs.c.seq).where(jobs.c.id == after).scalar_subquery()
            query = query.where(jobs.c.seq < cursor if descending else jobs.c.seq > cursor)
        query = query.order_by(jobs.c.seq.desc() if descending else jobs.c.seq.asc()).limit(limit + 1)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_from_row(r) for r in rows[:limit]], len(rows) > limit

    @retry_transient
    def tombstone(self, job_id: str, now: float | None = None, *, _attempt: int = 0) -> JobRecord | None:
        """Delete a job as far as anyone can see, in one conditional UPDATE: every read, list
        and count skips it from now on, its driver's next write or renewal raises LeaseLost,
        no Director can claim it, its idempotency key is free again and its prompt is gone.
        The row stays, holding its list position and the fact that its files must go.
        Returns the job as the deletion found it (status and usage read after the UPDATE took
        the row, so a driver's last write is in it; its request content already cleared);
        None if it is absent or already deleted."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            hidden = conn.execute(jobs.update().where(jobs.c.id == job_id, _live).values(
                deleted_at=now, lease_owner=DELETED, lease_expires_at=None, **_CONTENT_CLEARED)).rowcount
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().first()
            if not hidden:
                # On a retry, our first try may have committed before its connection dropped.
                return _from_row(row) if _attempt and row is not None else None
            job = _from_row(row)
            if not job.status.terminal:  # it ends here: what it used so far is spent
                record_usage(conn, job, DELETED_UNFINISHED, now)
        return job

    @retry_transient
    def files_deleted(self, job_id: str, now: float | None = None) -> None:
        """Record that every file of a tombstoned job is gone."""
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.deleted_at.is_not(None))
                         .values(files_deleted_at=time.time() if now is None else now))

    @retry_transient
    def files_pending(self, limit: int = 100) -> list[str]:
        """Tombstoned jobs whose files are not known to be gone yet (oldest first)."""
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(jobs.c.id).where(jobs.c.deleted_at.is_not(None),
                                                                jobs.c.files_deleted_at.is_(None))
                                     .order_by(jobs.c.deleted_at).limit(limit)).scalars())

    @retry_transient
    def drop_tombstones(self, deleted_before: float) -> int:
        """Drop tombstones deleted before `deleted_before` whose files are gone."""
        with self.engine.begin() as conn:
            return conn.execute(jobs.delete().where(jobs.c.deleted_at < deleted_before,
                                                    jobs.c.files_deleted_at.is_not(None))).rowcount

    @retry_transient
    def delete(self, job_id: str) -> JobRecord | None:
        """Drop the row at once, tombstone or not (the API deletes through `tombstone`)."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().first()
            if row is None:
                return None
            conn.execute(jobs.delete().where(jobs.c.id == job_id))
        return _from_row(row)

    @retry_transient
    def queue_ahead(self, job_id: str) -> tuple[int, StageSeconds] | None:
        """(1-based queue position, device seconds per stage of the queued jobs ahead) of a job."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs.c.seq, jobs.c.priority).where(jobs.c.id == job_id)).first()
            if row is None:
                return None
            seq, priority = row
            # Ahead: queued jobs no Director has taken yet that outrank this one (the claim order).
            count, *seconds = conn.execute(
                sa.select(sa.func.count(), *_STAGE_SUMS)
                .where(self._waiting, sa.or_(jobs.c.priority > priority,
                                             sa.and_(jobs.c.priority == priority, jobs.c.seq < seq)))).one()
        return int(count) + 1, StageSeconds(*(float(s) for s in seconds))

    def queue_position(self, job_id: str) -> int | None:
        ahead = self.queue_ahead(job_id)
        return ahead[0] if ahead else None

    @retry_transient
    def queued_seconds(self, min_priority: int | None = None) -> StageSeconds:
        """Device seconds per stage of every job still waiting for a Director (with
        `min_priority`: of those a new job of that priority would wait behind)."""
        query = sa.select(*_STAGE_SUMS).where(self._waiting)
        if min_priority is not None:
            query = query.where(jobs.c.priority >= min_priority)
        with self.engine.connect() as conn:
            return StageSeconds(*(float(s) for s in conn.execute(query).one()))

    @retry_transient
    def jobs_without_cost(self, limit: int = 500) -> list[JobRecord]:
        """Queued jobs stored before jobs carried their cost (see `tables.add_missing_columns`)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs).where(self._waiting, jobs.c.denoiser_seconds.is_(None))
                                .limit(limit)).mappings()
            return [_from_row(r) for r in rows]

    @retry_transient
    def set_cost(self, job_id: str, seconds: StageSeconds) -> None:
        """Cost a job that has none (an upgrade's queued jobs); a cost already set stays."""
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.denoiser_seconds.is_(None))
                         .values(**cost_fields(seconds)))

    _waiting = sa.and_(jobs.c.status == JobStatus.QUEUED.value, jobs.c.lease_owner.is_(None), _live)

    @retry_transient
    def count_active(self, owner: str) -> int:
        """Queued and running jobs of one API key (its concurrent-job quota counts these)."""
        active = [JobStatus.QUEUED.value, JobStatus.IN_PROGRESS.value]
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).where(jobs.c.owner == owner, _live,
                                                                      jobs.c.status.in_(active))).scalar())

    @retry_transient
    def count_by_status(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs.c.status, sa.func.count()).where(_live).group_by(jobs.c.status)).all()
        return {status: count for status, count in rows}

    @retry_transient
    def unfinished_work(self) -> dict[tuple[str, str | None], tuple[int, int]]:
        """(status, stage) -> (jobs, denoise steps still to run) of queued and running jobs,
        in one grouped query (the stages' autoscalers count what is coming; serving/backlog.py)."""
        active = [JobStatus.QUEUED.value, JobStatus.IN_PROGRESS.value]
        steps = sa.func.coalesce(sa.func.sum(jobs.c.num_steps - jobs.c.checkpoint_step), 0)
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs.c.status, jobs.c.stage, sa.func.count(), steps)
                                .where(_live, jobs.c.status.in_(active)).group_by(jobs.c.status, jobs.c.stage)).all()
        return {(status, stage): (int(count), int(left)) for status, stage, count, left in rows}

    @retry_transient
    def expired(self, now: float | None = None) -> list[JobRecord]:
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs).where(_live, jobs.c.expires_at.is_not(None), jobs.c.expires_at < now)
                                .order_by(jobs.c.expires_at)).mappings()
            return [_from_row(r) for r in rows]

    @retry_transient
    def set_expiry(self, retention_seconds: float, now: float | None = None) -> int:
        """Give every ended job that has no `expires_at` one, `retention_seconds` from now
        (jobs ended by a cancel in the API, or before retention was turned on): each is
        announced for the whole retention period before it goes."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            return conn.execute(jobs.update().where(_live, jobs.c.status.in_(_TERMINAL), jobs.c.expires_at.is_(None))
                                .values(expires_at=now + retention_seconds)).rowcount

    # ---- driving (the Director) -----------------------------------------------------

    @retry_transient
    def claim(self, owner: str, lease_seconds: float, limit: int, now: float | None = None) -> list[JobRecord]:
        """Take up to `limit` runnable jobs: queued ones, and in-progress ones whose driver's
        lease ran out. Highest priority first, then oldest. Safe with several Directors: each row is taken by a
        conditional UPDATE, and only the one whose UPDATE matched runs it."""
        now = time.time() if now is None else now
        runnable = sa.or_(
            jobs.c.status == JobStatus.QUEUED.value,
            sa.and_(jobs.c.status == JobStatus.IN_PROGRESS.value,
                    sa.or_(jobs.c.lease_expires_at.is_(None), jobs.c.lease_expires_at < now)),
        )
        unleased = sa.or_(jobs.c.lease_owner.is_(None), jobs.c.lease_expires_at < now)
        claimed: list[JobRecord] = []
        with self.engine.connect() as conn:
            candidates = conn.execute(
                sa.select(jobs.c.id).where(runnable, unleased)
                .order_by(jobs.c.priority.desc(), jobs.c.seq).limit(limit * 2)
            ).scalars().all()
        for job_id in candidates:
            if len(claimed) >= limit:
                break
            with self.engine.begin() as conn:
                taken = conn.execute(
                    jobs.update().where(jobs.c.id == job_id, runnable, unleased).values(
                        lease_owner=owner, lease_expires_at=now + lease_seconds, attempts=jobs.c.attempts + 1)
                ).rowcount
            if taken:
                claimed.append(self.get(job_id))
        return [job for job in claimed if job is not None]

    def renew(self, job_id: str, owner: str, lease_seconds: float) -> None:
        self.update(job_id, owner, lease_expires_at=time.time() + lease_seconds)

    def update(self, job_id: str, owner: str | None, **changes: Any) -> JobRecord:
        """Write `changes` if `owner` still holds the lease (None: no lease needed)."""
        return self.stamp(job_id, owner, (), **changes)

    @retry_transient
    def stamp(self, job_id: str, owner: str | None, names: Iterable[str], *, _attempt: int = 0,
              **changes: Any) -> JobRecord:
        """Write `changes` and record timestamps now (e.g. 'denoiser_started_at'), in one
        transaction, if `owner` still holds the lease and the job has not ended. Without names
        the timestamps column is left alone: the per-step progress write stays one UPDATE and
        one read. A terminal status is final: no write reaches the row after it (so a job
        cancelled while being claimed never comes back, and emits one terminal event)."""
        if "timestamps" in changes:
            raise ValueError("pass timestamp names, not a timestamps dict")
        names = list(names)
        condition = [jobs.c.id == job_id, jobs.c.status.notin_(_TERMINAL)]
        if owner is not None:
            condition.append(jobs.c.lease_owner == owner)
        values = _to_row_fields(changes)
        with self.engine.begin() as conn:
            if names:
                row = conn.execute(sa.select(jobs.c.timestamps).where(*condition)).first()
                if row is None:
                    return self._landed_before(conn, job_id, values, _attempt)
                now = time.time()
                values["timestamps"] = dict(row[0] or {}, **{name: now for name in names})
            if not conn.execute(jobs.update().where(*condition).values(**values)).rowcount:
                return self._landed_before(conn, job_id, values, _attempt)
            current = _from_row(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().first())
            if "status" in changes:
                queue_webhook(conn, current)
                record_usage(conn, current)
        return current

    @staticmethod
    def _landed_before(conn, job_id: str, values: dict[str, Any], attempt: int) -> JobRecord:
        """A conditional write matched no row. On a retry that can mean the first try committed
        and only its answer was lost: if the row holds exactly what was written, that is success."""
        if attempt:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().first()
            if row is not None and all(row[k] == v for k, v in values.items() if k != "timestamps"):
                return _from_row(row)
        raise LeaseLost(job_id)

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a queued job at once; flag a running one for its driver to stop."""
        found = self.cancel(job_id)
        return found[0] if found is not None else None

    @retry_transient
    def cancel(self, job_id: str) -> tuple[JobRecord, bool] | None:
        """Cancel a queued job at once; flag a running one for its driver to stop. Both are
        conditional updates, so a job claimed mid-call is still flagged. Returns (the job,
        whether this call ended it); None for an unknown job."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(jobs.c.timestamps).where(jobs.c.id == job_id)).first()
            if row is None:
                return None
            stamps = dict(row[0] or {}, cancelled_at=time.time())
            queued = conn.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.status == JobStatus.QUEUED.value).values(
                    # A Director that claimed it a moment ago loses the lease: its first write fails.
                    status=JobStatus.CANCELLED.value, cancel_requested=True, timestamps=stamps,
                    lease_owner=None, lease_expires_at=None,
                    error_code="cancelled", error_message="cancelled at the client's request")).rowcount
            if queued:
                cancelled = _from_row(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().first())
                queue_webhook(conn, cancelled)
                record_usage(conn, cancelled)
            else:
                conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status == JobStatus.IN_PROGRESS.value)
                             .values(cancel_requested=True))
        job = self.get(job_id)
        return (job, bool(queued)) if job is not None else None


def _to_row(record: JobRecord) -> dict[str, Any]:
    row = {name: getattr(record, name) for name in _FIELDS}
    return _to_row_fields(row)


def _to_row_fields(fields: dict[str, Any]) -> dict[str, Any]:
    unknown = set(fields) - set(_FIELDS)
    if unknown:
        raise ValueError(f"unknown job fields: {sorted(unknown)}")
    return {k: (v.value if isinstance(v, (JobStatus, Stage)) else v) for k, v in fields.items()}


def _from_row(row) -> JobRecord:
    values = {name: row[name] for name in _FIELDS}
    values["status"] = JobStatus(values["status"])
    values["stage"] = Stage(values["stage"]) if values["stage"] else None
    values["timestamps"] = dict(values["timestamps"] or {})
    values["cancel_requested"] = bool(values["cancel_requested"])
    return JobRecord(**values)


def _ensure_sqlite_folder(url: str) -> None:
    from pathlib import Path

    path = url.split(":///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the Gateway read while the Director writes; the busy timeout waits out writers.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()

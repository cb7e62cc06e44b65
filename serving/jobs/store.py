"""`JobStore`: the job table in SQL (SQLite file by default, Postgres in production).

The row is the truth: every state change is committed here before anyone is told. Drivers
hold a lease on the jobs they run; a write from a driver that lost its lease is refused,
so a job taken over after a crash is never finished twice.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import time
from typing import Any, Callable, Iterable, TypeVar

import sqlalchemy as sa
from sqlalchemy import event

from serving.cost_model import STAGE_NAMES, StageSeconds
from serving.jobs.events import terminal_event
from serving.jobs.records import JobRecord, JobStatus, Stage

metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    # Insertion order: the list cursor and first-come-first-served order.
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("stage", sa.String(16)),
    sa.Column("progress", sa.Integer, nullable=False, default=0),
    sa.Column("step", sa.Integer, nullable=False, default=0),
    sa.Column("total_steps", sa.Integer, nullable=False, default=0),
    sa.Column("timestamps", sa.JSON, nullable=False),
    sa.Column("error_code", sa.String(64)),
    sa.Column("error_message", sa.Text),
    sa.Column("completed_at", sa.Float),
    sa.Column("expires_at", sa.Float),
    sa.Column("video_key", sa.String(256)),
    sa.Column("thumbnail_key", sa.String(256)),
    sa.Column("idempotency_key", sa.String(256), unique=True),
    sa.Column("request_hash", sa.String(64)),
    sa.Column("lease_owner", sa.String(128)),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("priority", sa.Integer, nullable=False, default=0),
    sa.Column("num_steps", sa.Integer, nullable=False, default=0),
    # The job's device seconds per stage, costed at submit (summed for estimates and admission).
    sa.Column("text_encoder_seconds", sa.Float),
    sa.Column("denoiser_seconds", sa.Float),
    sa.Column("vae_decoder_seconds", sa.Float),
    sa.Column("checkpoint_step", sa.Integer, nullable=False, default=0),
    sa.Column("resumed_from_step", sa.Integer),
    sa.Column("owner", sa.String(64), index=True),
    sa.Column("webhook_url", sa.Text),
    # A deleted job is first a tombstone: hidden from every read, its lease taken from its
    # driver, its files then removed (files_deleted_at), the row dropped later (see retention).
    sa.Column("deleted_at", sa.Float),
    sa.Column("files_deleted_at", sa.Float),
)

# The webhook outbox: one row per event, written in the same transaction as the job's
# terminal state, delivered (and retried) by the Director's WebhookSender.
webhook_events = sa.Table(
    "webhook_events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),  # the webhook-id of every attempt
    sa.Column("job_id", sa.String(64), nullable=False, index=True),
    sa.Column("url", sa.Text, nullable=False),
    # The job's API key: its webhook secret signs the event (looked up at send time, never stored).
    sa.Column("owner", sa.String(64)),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("body", sa.Text, nullable=False),  # the exact bytes signed and sent, every attempt
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float, index=True),  # None once delivered or given up
    sa.Column("delivered_at", sa.Float),
    sa.Column("last_error", sa.Text),
)

_FIELDS = [f.name for f in dataclasses.fields(JobRecord)]
_TERMINAL = [s.value for s in JobStatus if s.terminal]

logger = logging.getLogger("ray.serve")

# A database blip (a dropped connection, a failover, a lock held too long) is retried with
# doubling waits for about this long before the caller sees it.
TRANSIENT_RETRY_SECONDS = 10.0
_FIRST_WAIT_SECONDS = 0.1

_T = TypeVar("_T")


def is_transient(exc: BaseException) -> bool:
    """A database error that says nothing about the request: trying again may succeed."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError))


def _retry_transient(method: Callable[..., _T]) -> Callable[..., _T]:
    """Run a store method again after a transient database error. Every method so wrapped
    is safe to repeat: reads, conditional updates, and inserts that look for their own row.
    A method with an `_attempt` parameter is told which try it is (0 first)."""
    wants_attempt = "_attempt" in inspect.signature(method).parameters

    @functools.wraps(method)
    def retrying(self: "JobStore", *args: Any, **kwargs: Any) -> _T:
        deadline = time.monotonic() + self.transient_retry_seconds
        wait, attempt = _FIRST_WAIT_SECONDS, 0
        while True:
            try:
                if wants_attempt:
                    kwargs["_attempt"] = attempt
                return method(self, *args, **kwargs)
            except Exception as exc:
                if not is_transient(exc) or time.monotonic() + wait > deadline:
                    raise
                logger.warning("job store: %s failed (%s); retrying in %.1f s", method.__name__,
                               type(exc).__name__, wait)
            time.sleep(wait)
            wait, attempt = wait * 2, attempt + 1

    return retrying


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


@dataclasses.dataclass
class WebhookEvent:
    id: str
    job_id: str
    url: str
    owner: str | None
    type: str
    body: str
    created_at: float
    attempts: int
    next_attempt_at: float | None
    delivered_at: float | None
    last_error: str | None


class JobStore:
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
        _add_missing_columns(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.select(1))

    # ---- creating and reading -------------------------------------------------------

    @_retry_transient
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

    @_retry_transient
    def get(self, job_id: str) -> JobRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id, _live)).mappings().first()
        return _from_row(row) if row else None

    @_retry_transient
    def get_by_idempotency_key(self, key: str) -> JobRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.idempotency_key == key, _live)).mappings().first()
        return _from_row(row) if row else None

    @_retry_transient
    def get_many(self, job_ids: Iterable[str]) -> dict[str, JobRecord]:
        """The live jobs among `job_ids`, by id (deleted and unknown ones are absent)."""
        ids, found = list(job_ids), {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):  # bounded IN lists
                rows = conn.execute(sa.select(jobs).where(jobs.c.id.in_(ids[start:start + 500]), _live)).mappings()
                found.update((row["id"], _from_row(row)) for row in rows)
        return found

    @_retry_transient
    def is_cursor(self, job_id: str, owner: str | None = None) -> bool:
        """Whether `job_id` can start a list page: a live job, or a deleted one whose
        tombstone still holds its place (so paging on past a deleted video works)."""
        query = sa.select(jobs.c.seq).where(jobs.c.id == job_id)
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        with self.engine.connect() as conn:
            return conn.execute(query).first() is not None

    @_retry_transient
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

    @_retry_transient
    def tombstone(self, job_id: str, now: float | None = None, *, _attempt: int = 0) -> JobRecord | None:
        """Delete a job as far as anyone can see, in one conditional UPDATE: every read, list
        and count skips it from now on, its driver's next write or renewal raises LeaseLost,
        no Director can claim it, its idempotency key is free again and its prompt is gone.
        The row stays, holding its list position and the fact that its files must go.
        Returns the job as it was; None if it is absent or already deleted."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id, _live)).mappings().first()
            if row is None:
                # On a retry, our first try may have committed before its connection dropped.
                gone = _attempt and conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().first()
                return _from_row(gone) if gone else None
            hidden = conn.execute(jobs.update().where(jobs.c.id == job_id, _live).values(
                deleted_at=now, lease_owner=DELETED, lease_expires_at=None, **_CONTENT_CLEARED)).rowcount
        return _from_row(row) if hidden else None

    @_retry_transient
    def files_deleted(self, job_id: str, now: float | None = None) -> None:
        """Record that every file of a tombstoned job is gone."""
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.deleted_at.is_not(None))
                         .values(files_deleted_at=time.time() if now is None else now))

    @_retry_transient
    def files_pending(self, limit: int = 100) -> list[str]:
        """Tombstoned jobs whose files are not known to be gone yet (oldest first)."""
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(jobs.c.id).where(jobs.c.deleted_at.is_not(None),
                                                                jobs.c.files_deleted_at.is_(None))
                                     .order_by(jobs.c.deleted_at).limit(limit)).scalars())

    @_retry_transient
    def drop_tombstones(self, deleted_before: float) -> int:
        """Drop tombstones deleted before `deleted_before` whose files are gone."""
        with self.engine.begin() as conn:
            return conn.execute(jobs.delete().where(jobs.c.deleted_at < deleted_before,
                                                    jobs.c.files_deleted_at.is_not(None))).rowcount

    @_retry_transient
    def delete(self, job_id: str) -> JobRecord | None:
        """Drop the row at once, tombstone or not (the API deletes through `tombstone`)."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().first()
            if row is None:
                return None
            conn.execute(jobs.delete().where(jobs.c.id == job_id))
        return _from_row(row)

    @_retry_transient
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

    @_retry_transient
    def queued_seconds(self, min_priority: int | None = None) -> StageSeconds:
        """Device seconds per stage of every job still waiting for a Director (with
        `min_priority`: of those a new job of that priority would wait behind)."""
        query = sa.select(*_STAGE_SUMS).where(self._waiting)
        if min_priority is not None:
            query = query.where(jobs.c.priority >= min_priority)
        with self.engine.connect() as conn:
            return StageSeconds(*(float(s) for s in conn.execute(query).one()))

    @_retry_transient
    def jobs_without_cost(self, limit: int = 500) -> list[JobRecord]:
        """Queued jobs stored before jobs carried their cost (see `_add_missing_columns`)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs).where(self._waiting, jobs.c.denoiser_seconds.is_(None))
                                .limit(limit)).mappings()
            return [_from_row(r) for r in rows]

    @_retry_transient
    def set_cost(self, job_id: str, seconds: StageSeconds) -> None:
        """Cost a job that has none (an upgrade's queued jobs); a cost already set stays."""
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.denoiser_seconds.is_(None))
                         .values(**cost_fields(seconds)))

    _waiting = sa.and_(jobs.c.status == JobStatus.QUEUED.value, jobs.c.lease_owner.is_(None), _live)

    @_retry_transient
    def count_active(self, owner: str) -> int:
        """Queued and running jobs of one API key (its concurrent-job quota counts these)."""
        active = [JobStatus.QUEUED.value, JobStatus.IN_PROGRESS.value]
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).where(jobs.c.owner == owner, _live,
                                                                      jobs.c.status.in_(active))).scalar())

    @_retry_transient
    def count_by_status(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs.c.status, sa.func.count()).where(_live).group_by(jobs.c.status)).all()
        return {status: count for status, count in rows}

    @_retry_transient
    def unfinished_work(self) -> dict[tuple[str, str | None], tuple[int, int]]:
        """(status, stage) -> (jobs, denoise steps still to run) of queued and running jobs,
        in one grouped query (the stages' autoscalers count what is coming; serving/backlog.py)."""
        active = [JobStatus.QUEUED.value, JobStatus.IN_PROGRESS.value]
        steps = sa.func.coalesce(sa.func.sum(jobs.c.num_steps - jobs.c.checkpoint_step), 0)
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs.c.status, jobs.c.stage, sa.func.count(), steps)
                                .where(_live, jobs.c.status.in_(active)).group_by(jobs.c.status, jobs.c.stage)).all()
        return {(status, stage): (int(count), int(left)) for status, stage, count, left in rows}

    @_retry_transient
    def expired(self, now: float | None = None) -> list[JobRecord]:
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs).where(_live, jobs.c.expires_at.is_not(None), jobs.c.expires_at < now)
                                .order_by(jobs.c.expires_at)).mappings()
            return [_from_row(r) for r in rows]

    @_retry_transient
    def set_expiry(self, retention_seconds: float, now: float | None = None) -> int:
        """Give every ended job that has no `expires_at` one, `retention_seconds` from now
        (jobs ended by a cancel in the API, or before retention was turned on): each is
        announced for the whole retention period before it goes."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            return conn.execute(jobs.update().where(_live, jobs.c.status.in_(_TERMINAL), jobs.c.expires_at.is_(None))
                                .values(expires_at=now + retention_seconds)).rowcount

    # ---- driving (the Director) -----------------------------------------------------

    @_retry_transient
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

    @_retry_transient
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
                _queue_webhook(conn, current)
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

    @_retry_transient
    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a queued job at once; flag a running one for its driver to stop.
        Both are conditional updates, so a job claimed mid-call is still flagged."""
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
                _queue_webhook(conn, _from_row(conn.execute(sa.select(jobs).where(jobs.c.id == job_id))
                                               .mappings().first()))
            else:
                conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status == JobStatus.IN_PROGRESS.value)
                             .values(cancel_requested=True))
        return self.get(job_id)


    # ---- the webhook outbox ----------------------------------------------------------

    @_retry_transient
    def claim_webhooks(self, limit: int, hold_seconds: float, now: float | None = None) -> list[WebhookEvent]:
        """Events due for an attempt. Each is held for `hold_seconds` by moving its next
        attempt forward (a conditional UPDATE), so two senders never post it at once, and
        a sender that dies mid-attempt leaves it due again afterwards."""
        now = time.time() if now is None else now
        due = sa.and_(webhook_events.c.next_attempt_at.is_not(None), webhook_events.c.next_attempt_at <= now)
        with self.engine.connect() as conn:
            ids = conn.execute(sa.select(webhook_events.c.id).where(due).order_by(webhook_events.c.next_attempt_at)
                               .limit(limit)).scalars().all()
        claimed = []
        for event_id in ids:
            with self.engine.begin() as conn:
                taken = conn.execute(webhook_events.update().where(webhook_events.c.id == event_id, due)
                                     .values(next_attempt_at=now + hold_seconds,
                                             attempts=webhook_events.c.attempts + 1)).rowcount
                if taken:
                    row = conn.execute(sa.select(webhook_events).where(webhook_events.c.id == event_id)).mappings().first()
                    claimed.append(_event_from_row(row))
        return claimed

    @_retry_transient
    def webhook_attempted(self, event_id: str, *, delivered: bool, error: str | None = None,
                          retry_at: float | None = None) -> None:
        """Record an attempt: delivered, retry at `retry_at`, or (neither) given up."""
        values: dict[str, Any] = {"last_error": error, "next_attempt_at": None if delivered else retry_at}
        if delivered:
            values["delivered_at"] = time.time()
        with self.engine.begin() as conn:
            conn.execute(webhook_events.update().where(webhook_events.c.id == event_id).values(**values))

    @_retry_transient
    def prune_webhook_events(self, older_than: float) -> int:
        """Forget events that are settled (delivered or given up) and older than `older_than`."""
        with self.engine.begin() as conn:
            return conn.execute(webhook_events.delete().where(webhook_events.c.next_attempt_at.is_(None),
                                                              webhook_events.c.created_at < older_than)).rowcount

    @_retry_transient
    def webhook_events_of(self, job_id: str) -> list[WebhookEvent]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(webhook_events).where(webhook_events.c.job_id == job_id)
                                .order_by(webhook_events.c.seq)).mappings().all()
        return [_event_from_row(r) for r in rows]


def _queue_webhook(conn, job: JobRecord) -> None:
    """Add the job's terminal event to the outbox, inside the caller's transaction."""
    if not job.webhook_url or not job.status.terminal:
        return
    now = time.time()
    event_id, kind, body = terminal_event(job, now)
    conn.execute(webhook_events.insert().values(id=event_id, job_id=job.id, url=job.webhook_url, owner=job.owner,
                                                type=kind, body=body, created_at=now, attempts=0, next_attempt_at=now))


def _event_from_row(row) -> WebhookEvent:
    return WebhookEvent(**{f.name: row[f.name] for f in dataclasses.fields(WebhookEvent)})


def _add_missing_columns(engine: sa.Engine) -> None:
    """Stores made by an earlier version lack newer (nullable) columns: add them in place,
    so an upgrade keeps every job."""
    inspector = sa.inspect(engine)
    for table in metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present and column.nullable:
                kind = column.type.compile(dialect=engine.dialect)
                with engine.begin() as conn:
                    conn.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


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

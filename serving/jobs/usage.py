"""Usage: what each API key's jobs really cost, in accelerator-seconds.

A job's row carries the device seconds it has used per stage (`JobRecord.used`, written by
the Director as each stage reports them). When the job ends, `record_usage` copies them into
the usage ledger (serving/jobs/tables.py) in the same transaction, with the seconds of video
it delivered; `UsageLedger.usage_by_key` sums the ledger. The figure users need is the cost
per *usable* video: everything spent, failures and cancellations included, divided by the
videos that completed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from serving.cost_model import STAGE_NAMES, StageSeconds
from serving.jobs.records import JobRecord, JobStatus
from serving.jobs.tables import usage
from serving.jobs.transient import retry_transient

# How a job that was deleted before it ended is entered (it used what it used).
DELETED = "deleted"
ENDINGS = ("completed", "failed", "cancelled", DELETED)


def video_seconds(job: JobRecord) -> float:
    """Seconds of video the job delivered: its clip's length if it completed, else 0."""
    spec = job.spec or {}
    if job.status != JobStatus.COMPLETED or not spec.get("fps"):
        return 0.0
    return (spec["num_frames"] - 1) / spec["fps"]


def record_usage(conn, job: JobRecord, ending: str | None = None, now: float | None = None) -> bool:
    """Enter an ended job in the ledger, inside the caller's transaction; once per job (a
    second entry is ignored by the database, whoever races). `ending`: how it ended when its
    status does not say (a deletion). Returns whether this call entered it."""
    ending = ending or job.status.value
    if ending not in ENDINGS:
        return False
    used = job.used
    values = dict(job_id=job.id, owner=job.owner, status=ending, ended_at=time.time() if now is None else now,
                  video_seconds=video_seconds(job), **{f"{stage}_seconds": used.of(stage) for stage in STAGE_NAMES})
    dialect = conn.dialect.name
    if dialect in ("postgresql", "sqlite"):
        insert = (postgresql_insert if dialect == "postgresql" else sqlite_insert)(usage).values(**values)
        return conn.execute(insert.on_conflict_do_nothing(index_elements=["job_id"])).rowcount > 0
    if conn.execute(sa.select(usage.c.seq).where(usage.c.job_id == job.id)).first() is not None:
        return False
    conn.execute(usage.insert().values(**values))
    return True


@dataclass(frozen=True)
class KeyUsage:
    """One API key's ended jobs over a period (key None: jobs made with auth off)."""

    key: str | None
    jobs: dict[str, int]  # by ending: completed, failed, cancelled, deleted
    video_seconds: float
    accelerator_seconds: StageSeconds

    @property
    def completed(self) -> int:
        return self.jobs.get("completed", 0)

    @property
    def per_completed_video(self) -> float | None:
        """Accelerator-seconds per completed video, everything spent counted: the cost of a usable one."""
        return self.accelerator_seconds.total / self.completed if self.completed else None


class UsageLedger:
    """The ledger's reads; the class using it provides `engine` and `transient_retry_seconds`."""

    @retry_transient
    def usage_by_key(self, owner: str | None = None, *, all_keys: bool = False, start: float | None = None,
                     end: float | None = None) -> list[KeyUsage]:
        """Per key, sums over jobs that ended in [start, end). With `all_keys` every key (an
        operator's view); else only `owner`'s jobs (None: jobs made with auth off)."""
        sums = [sa.func.count(), sa.func.coalesce(sa.func.sum(usage.c.video_seconds), 0.0)] + [
            sa.func.coalesce(sa.func.sum(usage.c[f"{stage}_seconds"]), 0.0) for stage in STAGE_NAMES]
        query = sa.select(usage.c.owner, usage.c.status, *sums).group_by(usage.c.owner, usage.c.status)
        if not all_keys:
            query = query.where(usage.c.owner.is_(None) if owner is None else usage.c.owner == owner)
        if start is not None:
            query = query.where(usage.c.ended_at >= start)
        if end is not None:
            query = query.where(usage.c.ended_at < end)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        by_key: dict[str | None, list] = {}
        for key, status, count, video, *stages in rows:
            jobs, video_total, seconds = by_key.setdefault(key, [{}, 0.0, [0.0, 0.0, 0.0]])
            jobs[status] = int(count)
            by_key[key][1] = video_total + float(video)
            for i, value in enumerate(stages):
                seconds[i] += float(value)
        if not all_keys and not by_key:
            by_key[owner] = [{}, 0.0, [0.0, 0.0, 0.0]]
        return [KeyUsage(key, jobs, video, StageSeconds(*seconds))
                for key, (jobs, video, seconds) in sorted(by_key.items(), key=lambda item: item[0] or "")]


class AttemptUsage:
    """What one attempt of a job has used so far, on top of what its earlier attempts used:
    the Director adds each stage's measured seconds, and writes `fields()` with the job."""

    def __init__(self, before: StageSeconds):
        self.before = before
        self.spent = dict.fromkeys(STAGE_NAMES, 0.0)

    def add(self, stage: str, seconds: float) -> None:
        self.spent[stage] += max(0.0, seconds)

    def fields(self) -> dict[str, float]:
        return {f"used_{stage}_seconds": self.before.of(stage) + self.spent[stage] for stage in STAGE_NAMES}

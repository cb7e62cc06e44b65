"""What removes each file a job made, and its row: deletion, retention and the sweeps.

- Deleting a job (the API, or retention) tombstones its row first, so it is gone from the
  API at once and its driver stops; then removes its files; the row goes a day later (it
  holds the deleted video's place for list cursors until then). If the files cannot be
  removed, the tombstone says so and every sweep tries again: nothing is orphaned.
- A job's driver tidies its files when it stops driving it (`tidy_after_run`): a finished
  job keeps only its outputs (its checkpoint goes), a job deleted meanwhile keeps nothing.
- Retention (`storage.retention_hours`, off by default) ends every finished job, completed,
  failed or cancelled, `retention_hours` after it ended. `expires_at` is set when it ends
  and shown to the client, so nothing vanishes unannounced.
- The storage sweep lists the whole store now and then and removes what no live job
  accounts for: files of rows that are gone, scratch files of finished jobs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from serving.jobs.records import JobRecord, JobStatus, is_job_id
from serving.jobs.store import JobStore
from serving.storage import ArtifactStore, ArtifactStoreError

logger = logging.getLogger("ray.serve")

TOMBSTONE_KEEP_SECONDS = 24 * 3600.0  # a deleted video's list position outlives any paging session
ORPHAN_GRACE_SECONDS = 3600.0  # files this recent are left alone: their writer may still be at work
STORE_SWEEP_SECONDS = 3600.0  # listing a whole store is the sweep's one costly call


def expiry(retention_hours: float | None, ended_at: float) -> float | None:
    """`expires_at` of a job that ended at `ended_at` (None: kept until deleted)."""
    return ended_at + retention_hours * 3600 if retention_hours else None


def delete_job(store: JobStore, artifacts: ArtifactStore, job_id: str) -> bool | None:
    """Delete a job: hide it, then remove its files. True: all gone. False: the row is gone
    from the API but some files remain, retried by every sweep. None: no such job."""
    if store.tombstone(job_id) is None:
        return None
    return remove_files(store, artifacts, job_id)


def remove_files(store: JobStore, artifacts: ArtifactStore, job_id: str) -> bool:
    """Remove a tombstoned job's files and record it; False (and a warning) if they stay."""
    try:
        artifacts.delete_prefix(job_id)
    except ArtifactStoreError as exc:
        logger.warning("files of deleted job %s are not removed yet (%s); the storage sweep retries", job_id, exc)
        return False
    store.files_deleted(job_id)
    return True


def tidy_after_run(store: JobStore, artifacts: ArtifactStore, job_id: str) -> None:
    """After a driver stops driving a job, whatever the way out: a finished job keeps only
    its outputs; a job deleted meanwhile (its writes raced the delete) keeps nothing; a job
    that still runs elsewhere or waits for a retry keeps everything, its checkpoint above all."""
    job = store.get(job_id)
    if job is None:
        artifacts.delete_prefix(job_id)
    elif job.status.terminal:
        _keep_only_outputs(artifacts, job, artifacts.keys(job_id))


def _keep_only_outputs(artifacts: ArtifactStore, job: JobRecord, keys: list[str]) -> list[str]:
    outputs = {job.video_key, job.thumbnail_key} if job.status == JobStatus.COMPLETED else set()
    extra = [key for key in keys if key not in outputs]
    for key in extra:
        artifacts.remove(key)
    return extra


@dataclass
class SweepResult:
    expired: list[str] = field(default_factory=list)  # jobs deleted by retention
    files_deleted: list[str] = field(default_factory=list)  # tombstones whose files went this time
    tombstones_dropped: int = 0
    orphans: list[str] = field(default_factory=list)  # job prefixes with no live row, removed
    scratch: list[str] = field(default_factory=list)  # keys finished jobs no longer need, removed


class StorageSweeper:
    """Run by every Director on a timer (`run`); each step is safe to repeat or to race."""

    def __init__(self, store: JobStore, artifacts: ArtifactStore, retention_hours: float | None,
                 store_sweep_seconds: float = STORE_SWEEP_SECONDS):
        self.store, self.artifacts, self.retention_hours = store, artifacts, retention_hours
        self.store_sweep_seconds = store_sweep_seconds
        self.next_store_sweep = 0.0

    def run(self, now: float | None = None) -> SweepResult:
        now = time.time() if now is None else now
        result = SweepResult()
        if self.retention_hours:
            self.store.set_expiry(self.retention_hours * 3600, now=now)
            for job in self.store.expired(now=now):
                if delete_job(self.store, self.artifacts, job.id) is not None:
                    result.expired.append(job.id)
        for job_id in self.store.files_pending():
            if not remove_files(self.store, self.artifacts, job_id):
                break  # the store is likely down: the next sweep tries again, the claim loop waits not
            result.files_deleted.append(job_id)
        result.tombstones_dropped = self.store.drop_tombstones(now - TOMBSTONE_KEEP_SECONDS)
        if now >= self.next_store_sweep:
            self.next_store_sweep = now + self.store_sweep_seconds
            self.sweep_store(now, result)
        return result

    def sweep_store(self, now: float, result: SweepResult) -> None:
        """One pass over every key: a prefix with no live row (older than the grace period)
        goes whole; a finished job loses all but its outputs."""
        by_job: dict[str, list[str]] = {}
        for key in self.artifacts.keys():
            job_id = key.split("/", 1)[0]
            if is_job_id(job_id):  # anything else in the bucket is not ours to judge
                by_job.setdefault(job_id, []).append(key)
        # Rows are read after the listing. A prefix whose row is absent is an orphan, except
        # for an I2V job being created: its first frame is stored just before its row is
        # written, so orphans go only after ORPHAN_GRACE_SECONDS (a create that failed or lost
        # an idempotency race after storing its frame leaves one, removed then).
        live = self.store.get_many(by_job)
        for job_id, keys in by_job.items():
            job = live.get(job_id)
            try:
                if job is None:
                    if all(self.artifacts.modified(key) < now - ORPHAN_GRACE_SECONDS for key in keys):
                        self.artifacts.delete_prefix(job_id)
                        result.orphans.append(job_id)
                elif job.status.terminal:
                    result.scratch += _keep_only_outputs(self.artifacts, job, keys)
            except (ArtifactStoreError, FileNotFoundError) as exc:
                logger.warning("storage sweep: %s left for the next pass (%s)", job_id, exc)

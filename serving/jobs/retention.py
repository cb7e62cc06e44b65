"""Retention: delete videos older than the operator's `storage.retention_hours`.

Off unless configured: a video stays until its owner deletes it. When on, a job's
`expires_at` is set at completion and shown to the client, so nothing vanishes unannounced.
"""

from __future__ import annotations

import time

from serving.jobs.store import JobStore
from serving.storage import ArtifactStore


def sweep_expired(store: JobStore, artifacts: ArtifactStore, now: float | None = None) -> list[str]:
    """Delete every job past its `expires_at`, files first; return the deleted ids."""
    deleted = []
    for job in store.expired(now=now if now is not None else time.time()):
        artifacts.delete_prefix(job.id)
        if store.delete(job.id) is not None:
            deleted.append(job.id)
    return deleted

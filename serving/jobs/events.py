"""The event a finished job announces to its webhook, in OpenAI's webhook event shape.

Built when the job's terminal state is written (in the same transaction), so the event,
its id and its exact body exist before anyone is told and stay the same on every retry.
"""

from __future__ import annotations

import json
import secrets

from serving.jobs.records import JobRecord, JobStatus

EVENT_TYPES = {JobStatus.COMPLETED: "video.completed", JobStatus.FAILED: "video.failed",
               JobStatus.CANCELLED: "video.failed"}


def new_event_id() -> str:
    return "evt_" + secrets.token_hex(16)


def terminal_event(job: JobRecord, now: float) -> tuple[str, str, str]:
    """(event id, type, JSON body) for a job that just reached a terminal state."""
    event_id = new_event_id()
    kind = EVENT_TYPES[job.status]
    body = {"id": event_id, "object": "event", "created_at": int(now), "type": kind, "data": {"id": job.id}}
    return event_id, kind, json.dumps(body, separators=(",", ":"))

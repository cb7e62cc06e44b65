"""The webhook outbox: one row per event, written in the same transaction as the job's
terminal state (`queue_webhook`), then claimed, attempted and settled by the Director's
`WebhookSender`. `JobStore` carries these methods (it inherits `WebhookOutbox`)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import sqlalchemy as sa

from serving.jobs.events import terminal_event
from serving.jobs.records import JobRecord
from serving.jobs.tables import webhook_events
from serving.jobs.transient import retry_transient


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


class WebhookOutbox:
    """The outbox's methods; the class using it provides `engine` and `transient_retry_seconds`."""

    @retry_transient
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

    @retry_transient
    def webhook_attempted(self, event_id: str, *, delivered: bool, error: str | None = None,
                          retry_at: float | None = None) -> None:
        """Record an attempt: delivered, retry at `retry_at`, or (neither) given up."""
        values: dict[str, Any] = {"last_error": error, "next_attempt_at": None if delivered else retry_at}
        if delivered:
            values["delivered_at"] = time.time()
        with self.engine.begin() as conn:
            conn.execute(webhook_events.update().where(webhook_events.c.id == event_id).values(**values))

    @retry_transient
    def prune_webhook_events(self, older_than: float) -> int:
        """Forget events that are settled (delivered or given up) and older than `older_than`."""
        with self.engine.begin() as conn:
            return conn.execute(webhook_events.delete().where(webhook_events.c.next_attempt_at.is_(None),
                                                              webhook_events.c.created_at < older_than)).rowcount

    @retry_transient
    def webhook_events_of(self, job_id: str) -> list[WebhookEvent]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(webhook_events).where(webhook_events.c.job_id == job_id)
                                .order_by(webhook_events.c.seq)).mappings().all()
        return [_event_from_row(r) for r in rows]


def queue_webhook(conn, job: JobRecord) -> None:
    """Add the job's terminal event to the outbox, inside the caller's transaction."""
    if not job.webhook_url or not job.status.terminal:
        return
    now = time.time()
    event_id, kind, body = terminal_event(job, now)
    conn.execute(webhook_events.insert().values(id=event_id, job_id=job.id, url=job.webhook_url, owner=job.owner,
                                                type=kind, body=body, created_at=now, attempts=0, next_attempt_at=now))


def _event_from_row(row) -> WebhookEvent:
    return WebhookEvent(**{f.name: row[f.name] for f in dataclasses.fields(WebhookEvent)})

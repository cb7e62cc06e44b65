"""Webhooks: tell a job's `webhook_url` when it finishes, signed the Standard Webhooks way.

Each event is a row in the job store's outbox (written with the job's terminal state, see
`serving.jobs.events`). `WebhookSender` posts due events, signing `id.timestamp.body` with
HMAC-SHA256 (`standardwebhooks`), and retries failures with doubling backoff. The event id
and body never change between attempts, so receivers can drop duplicates: delivery is at
least once. Receivers verify with any Standard Webhooks library, or the openai SDK's
`client.webhooks.verify_signature(body, headers, secret=...)`.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import logging
import secrets
import time
from datetime import datetime, timezone
from urllib.parse import urlsplit

from standardwebhooks.webhooks import Webhook

from serving.config import WebhooksConfig
from serving.jobs.store import JobStore, WebhookEvent

logger = logging.getLogger("ray.serve")

MAX_URL_LENGTH = 2048


class WebhookURLError(ValueError):
    """A `webhook_url` this server will not call; the message says why."""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check_webhook_url(url: object, config: WebhooksConfig) -> str:
    if not isinstance(url, str):
        raise WebhookURLError(f"expected a URL string, found {type(url).__name__}")
    if config.secret is None:
        raise WebhookURLError("this server signs no webhooks (the operator has not set webhooks.secret)")
    if len(url) > MAX_URL_LENGTH:
        raise WebhookURLError(f"is {len(url)} characters; the limit is {MAX_URL_LENGTH}")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise WebhookURLError(f"is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise WebhookURLError(f"must be an absolute http:// or https:// URL, found {url!r}")
    if parts.username or parts.password:
        raise WebhookURLError("must not carry credentials; the payload is signed instead")
    if config.allowed_hosts and not any(fnmatch.fnmatch(host.lower(), p.lower()) for p in config.allowed_hosts):
        raise WebhookURLError(f"host {host!r} is not among the hosts this server may call "
                              f"(webhooks.allowed_hosts: {', '.join(config.allowed_hosts)})")
    return url


def signed_headers(signer: Webhook, event_id: str, body: str, now: float) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt (the timestamp is the attempt's)."""
    timestamp = datetime.fromtimestamp(int(now), tz=timezone.utc)
    return {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now)),
        "webhook-signature": signer.sign(event_id, timestamp, body),
        "user-agent": "ditserve-webhooks/1",
    }


def backoff_seconds(attempts: int, config: WebhooksConfig) -> float:
    """Wait before attempt `attempts + 1`: initial, doubling, capped."""
    return min(config.initial_backoff_seconds * 2 ** (attempts - 1), config.max_backoff_seconds)


class WebhookSender:
    """Delivers the outbox. Run `send_due()` periodically (the Director does)."""

    def __init__(self, store: JobStore, config: WebhooksConfig, on_attempt=None):
        self.store, self.config = store, config
        self.on_attempt = on_attempt  # called with "delivered" | "retry" | "gave_up"
        self._signer = Webhook(config.secret) if config.secret is not None else None
        self._session = None

    async def send_due(self, limit: int = 32) -> int:
        """Attempt every due event once; returns how many were attempted."""
        if self._signer is None:
            return 0
        hold = self.config.timeout_seconds + 30  # longer than one attempt can take
        events = await asyncio.to_thread(self.store.claim_webhooks, limit, hold)
        if events:
            await asyncio.gather(*(self._attempt(event) for event in events))
        return len(events)

    async def _attempt(self, event: WebhookEvent) -> None:
        import aiohttp  # comes with ray[serve]

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds))
        headers = signed_headers(self._signer, event.id, event.body, time.time())
        error = None
        try:
            # No redirects: a signed event goes only where the job asked.
            async with self._session.post(event.url, data=event.body.encode(), headers=headers,
                                          allow_redirects=False) as response:
                if not 200 <= response.status < 300:
                    error = f"HTTP {response.status}"
        except Exception as exc:  # unreachable, refused, timed out, ...
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            outcome, retry_at = "delivered", None
        elif event.attempts >= self.config.max_attempts:
            outcome, retry_at = "gave_up", None
            logger.warning("webhook %s for %s: giving up after %d attempts (%s)", event.id, event.job_id,
                           event.attempts, error)
        else:
            outcome, retry_at = "retry", time.time() + backoff_seconds(event.attempts, self.config)
        await asyncio.to_thread(self.store.webhook_attempted, event.id, delivered=error is None, error=error,
                                retry_at=retry_at)
        if self.on_attempt is not None:
            self.on_attempt(outcome)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

"""Webhooks: tell a job's `webhook_url` when it finishes, signed the Standard Webhooks way.

Each event is a row in the job store's outbox (written with the job's terminal state, see
`serving.jobs.events`). `WebhookSender` posts due events, signing `id.timestamp.body` with
HMAC-SHA256 (`standardwebhooks`), and retries failures with doubling backoff. The event id
and body never change between attempts, so receivers can drop duplicates: delivery is at
least once. Receivers verify with any Standard Webhooks library, or the openai SDK's
`client.webhooks.verify_signature(body, headers, secret=...)`.

Who signs: the job's API key's own `webhook_secret`, else `webhooks.secret` (`signing_secret`).
The outbox row names the key; the secret is looked up when sending, never stored.

Where to: public addresses only, unless the operator trusts a network (serving/egress.py).
`check_webhook_url` refuses at create time what it can see without DNS (bad URLs, addresses
in any spelling, `localhost`); the sender checks again before every attempt and resolves
names through `GuardedResolver`, so a name is judged by the address actually connected to.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import logging
import re
import secrets
import time
from datetime import datetime, timezone
from ipaddress import IPv4Address

from standardwebhooks.webhooks import Webhook
from yarl import URL

from serving.config import AuthConfig, WebhooksConfig
from serving.egress import AddressPolicy, ForbiddenAddress, GuardedResolver, is_loopback_name, literal_address
from serving.jobs.store import JobStore, WebhookEvent

logger = logging.getLogger("ray.serve")

MAX_URL_LENGTH = 2048
# Letters, digits, '-' and '_' in dot-separated labels: what DNS can answer for (IDNA names arrive as xn--).
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*")


class WebhookURLError(ValueError):
    """A `webhook_url` this server will not call; the message says why."""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def signing_secret(owner: str | None, webhooks: WebhooksConfig, auth: AuthConfig) -> str | None:
    """The secret that signs the events of `owner`'s jobs (an API key's name; None with auth
    off): the key's own `webhook_secret`, else `webhooks.secret`. Never another key's."""
    own = next((key.webhook_secret for key in auth.keys if key.name == owner), None) if owner is not None else None
    return own or webhooks.secret


def check_webhook_url(url: object, config: WebhooksConfig, secret: str | None) -> str:
    """The `webhook_url` of a new job, if this server will call it and has `secret` to sign
    with (see `signing_secret`); raises WebhookURLError saying why not. No DNS: names are
    checked by what they resolve to when the event is sent."""
    if not isinstance(url, str):
        raise WebhookURLError(f"expected a URL string, found {type(url).__name__}")
    if secret is None:
        raise WebhookURLError("this server has no webhook signing secret for this API key (the operator sets "
                              "webhooks.secret, or webhook_secret on the key in auth.keys)")
    webhook_target(url, config)
    return url


def webhook_target(url: str, config: WebhooksConfig) -> URL:
    """`url` parsed the way aiohttp will (yarl), if it passes every rule that needs no DNS."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookURLError(f"is {len(url)} characters; the limit is {MAX_URL_LENGTH}")
    try:
        parsed = URL(url)
        parsed.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise WebhookURLError(f"is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise WebhookURLError(f"must be an absolute http:// or https:// URL, found {url!r}")
    if parsed.user or parsed.password:
        raise WebhookURLError("must not carry credentials; the payload is signed instead")
    host = parsed.raw_host  # lower case, IDNA-encoded: what is resolved and connected to
    name = host.removesuffix(".")
    if config.allowed_hosts and not any(fnmatch.fnmatch(name, p.lower()) for p in config.allowed_hosts):
        raise WebhookURLError(f"host {host!r} is not among the hosts this server may call "
                              f"(webhooks.allowed_hosts: {', '.join(config.allowed_hosts)})")
    address = literal_address(parsed.host if ":" in host else name)
    if address is None and is_loopback_name(name):
        address = IPv4Address("127.0.0.1")
    elif address is None and not _HOST_NAME.fullmatch(name):
        raise WebhookURLError(f"host {host!r} is not a valid host name")
    reason = AddressPolicy(config.allowed_networks).refusal(address) if address is not None else None
    if reason is not None:
        raise WebhookURLError(f"host {host!r} is not an address this server calls: {reason}. Webhooks go to public "
                              "addresses only, unless the operator trusts the network (webhooks.allowed_networks)")
    return parsed


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


class Undeliverable(Exception):
    """An event no attempt could deliver (forbidden address, nothing to sign with): given up at once."""


class WebhookSender:
    """Delivers the outbox. Run `send_due()` periodically (the Director does). `dns` is the
    resolver behind the address check (default: the system's getaddrinfo)."""

    def __init__(self, store: JobStore, config: WebhooksConfig, auth: AuthConfig, on_attempt=None, dns=None):
        self.store, self.config, self.auth = store, config, auth
        self.on_attempt = on_attempt  # called with "delivered" | "retry" | "gave_up" | "refused"
        self.policy = AddressPolicy(config.allowed_networks)
        self._dns = dns
        self._signers: dict[str, Webhook] = {}
        self._session = None

    async def send_due(self, limit: int = 32) -> int:
        """Attempt every due event once; returns how many were attempted."""
        if self.config.secret is None and not any(key.webhook_secret for key in self.auth.keys):
            return 0  # nothing could be signed: leave the outbox for when a secret is set
        hold = self.config.timeout_seconds + 30  # longer than one attempt can take
        events = await asyncio.to_thread(self.store.claim_webhooks, limit, hold)
        if events:
            await asyncio.gather(*(self._attempt(event) for event in events))
        return len(events)

    def _signer(self, owner: str | None) -> Webhook:
        secret = signing_secret(owner, self.config, self.auth)
        if secret is None:
            raise Undeliverable(f"no webhook signing secret for API key {owner!r} (set its webhook_secret in "
                                "auth.keys, or webhooks.secret)")
        if secret not in self._signers:
            self._signers[secret] = Webhook(secret)
        return self._signers[secret]

    def _session_now(self):
        import aiohttp  # comes with ray[serve]

        if self._session is None:
            # Every name is resolved through the address check, and the connection goes to
            # the checked address; never through an environment proxy, which we could not check.
            resolver = GuardedResolver(self.policy, self._dns)
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver), trust_env=False,
                                                  timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds))
        return self._session

    async def _attempt(self, event: WebhookEvent) -> None:
        error, final = None, False
        try:
            signer = self._signer(event.owner)
            try:
                # Again at send time: the rules may have changed, and aiohttp connects to a
                # literal address without asking the resolver.
                webhook_target(event.url, self.config)
            except WebhookURLError as exc:
                raise Undeliverable(str(exc)) from None
            headers = signed_headers(signer, event.id, event.body, time.time())
            # No redirects: a signed event goes only where the job asked.
            async with self._session_now().post(event.url, data=event.body.encode(), headers=headers,
                                                allow_redirects=False) as response:
                if not 200 <= response.status < 300:
                    error = f"HTTP {response.status}"
        except (Undeliverable, ForbiddenAddress) as exc:
            error, final = f"refused: {exc}", True
        except Exception as exc:  # unreachable, refused, timed out, ...
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            outcome, retry_at = "delivered", None
        elif final:  # a forbidden target (SSRF attempt or tightened rules): never retried, counted apart
            outcome, retry_at = "refused", None
            logger.warning("webhook %s for %s: %s", event.id, event.job_id, error)
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

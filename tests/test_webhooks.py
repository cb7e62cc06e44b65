"""Webhooks against a receiver on loopback: a finished job's event is signed the Standard
Webhooks way (checked with the openai SDK and the standardwebhooks library), with its API
key's own secret; a failed post is retried with the same event id and body; a cancelled job
announces `video.failed`; and a URL whose host is, or turns out to resolve to, a forbidden
address is refused at send time without a connection.

The sender tests run `WebhookSender` on a real SQLite job store against a real HTTP receiver
on 127.0.0.1; only the live-service tests need the Ray cluster."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import requests
import yaml
from aiohttp.abc import AbstractResolver
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from conftest import WEBHOOK_SECRET, wait_for
from serving.auth import key_digest
from serving.config import ApiKey, AuthConfig, WebhooksConfig, config_from_dict, load_config
from serving.jobs.records import JobRecord, JobStatus, new_job_id
from serving.jobs.store import JobStore
from serving.jobs.videos import VideoJobs
from serving.pipeline.spec import SpecError
from serving.webhooks import WebhookSender, WebhookURLError, backoff_seconds, check_webhook_url, new_secret


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that records every post and answers from a script
    of status codes (then 200)."""

    def __init__(self, statuses: list[int]):
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.statuses = list(statuses)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/ditserve"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    found = Receiver([500])  # the first attempt fails: the event must come again
    yield found
    found.close()


def test_completed_job_is_posted_signed_and_retried_with_the_same_event_id(service, receiver):
    client = service.client()
    video = client.videos.create_and_poll(prompt="tell me when it is done", extra_body={"webhook_url": receiver.url},
                                          poll_interval_ms=200)
    assert video.status == "completed"
    assert video.model_extra["webhook_url"] == receiver.url
    wait_for(lambda: len(receiver.posts) >= 2, timeout=30)

    (first_headers, first_body), (headers, body) = receiver.posts[:2]
    assert first_headers["webhook-id"] == headers["webhook-id"]  # at least once, deduplicable
    assert first_body == body
    # The real SDK's verifier (what an OpenAI-webhook receiver already runs) accepts it...
    verifier = openai.OpenAI(api_key="unused", webhook_secret=WEBHOOK_SECRET)
    verifier.webhooks.verify_signature(body, headers)
    # ...and so does the reference library; a wrong secret does not.
    event = Webhook(WEBHOOK_SECRET).verify(body, headers)
    with pytest.raises(Exception):
        Webhook("whsec_" + "d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldC13cm9uZy0x").verify(body, headers)
    assert event["id"] == headers["webhook-id"] and event["id"].startswith("evt_")
    assert event["type"] == "video.completed" and event["object"] == "event"
    assert event["data"] == {"id": video.id}
    threading.Event().wait(1.5)  # several sender polls: a delivered event is not posted again
    assert len(receiver.posts) == 2


def test_cancelled_job_announces_video_failed(service, receiver):
    receiver.statuses.clear()
    client = service.client()
    video = client.videos.create(prompt="cancel me", seconds="1", size="128x128",
                                 extra_body={"num_inference_steps": 100, "webhook_url": receiver.url})
    client.post(f"/videos/{video.id}/cancel", cast_to=object)
    wait_for(lambda: len(receiver.posts) >= 1, timeout=60)
    event = json.loads(receiver.posts[0][1])
    assert (event["type"], event["data"]["id"]) == ("video.failed", video.id)
    assert client.videos.retrieve(video.id).error.code == "cancelled"


def test_bad_webhook_urls_are_refused_naming_the_field(service):
    for url, reason in [("ftp://example.com/x", "http"), ("http://user:pw@127.0.0.1/x", "credentials"),
                        ("not a url", "http"), ("http://127.0.0.1:99999/x", "valid URL"),
                        # The tests' service trusts 127.0.0.0/8 only, so IPv6 loopback (a closed port)
                        # is refused. Non-loopback ranges are never sent to a live server: they are
                        # checked on the address policy itself (tests/test_egress.py).
                        ("http://[::1]:9/x", "loopback")]:
        response = requests.post(f"{service.url}/v1/videos", json={"prompt": "p", "webhook_url": url})
        assert response.status_code == 400, (url, response.text)
        error = response.json()["error"]
        assert error["param"] == "webhook_url" and reason in error["message"], error


def test_webhook_url_rules_without_a_server():
    config = WebhooksConfig(secret=WEBHOOK_SECRET, allowed_hosts=["hooks.example.com", "*.internal"])
    assert check_webhook_url("https://hooks.example.com/a", config, WEBHOOK_SECRET)
    assert check_webhook_url("http://ci.internal:8080/a", config, WEBHOOK_SECRET)
    with pytest.raises(WebhookURLError, match="not among the hosts"):
        check_webhook_url("http://169.254.169.254/latest", config, WEBHOOK_SECRET)
    with pytest.raises(WebhookURLError, match="no webhook signing secret"):
        check_webhook_url("https://hooks.example.com/a", WebhooksConfig(), None)
    steps = WebhooksConfig(initial_backoff_seconds=5, max_backoff_seconds=60)
    assert [backoff_seconds(n, steps) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


# ---- the sender on its own: a real job store, a real receiver, no Ray --------------------


class TableDNS(AbstractResolver):
    """A name server fed by a table: each lookup of a name takes its next answer (the last
    one repeats), as a rebinding name server would. Answers only loopback addresses here."""

    def __init__(self, table: dict[str, list[list[str]]]):
        self.table, self.lookups = table, []

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        self.lookups.append(host)
        answers = self.table[host]
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        return [{"hostname": host, "host": address, "port": port, "proto": 0,
                 "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                 "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV} for address in addresses]

    async def close(self) -> None:
        pass


@pytest.fixture
def store(tmp_path):
    found = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    yield found
    found.close()


@pytest.fixture
def listener():
    found = Receiver([])
    yield found
    found.close()


def finished_job(store: JobStore, url: str, owner: str | None = None) -> str:
    """A job that was accepted with `url` and has just completed: its event is in the outbox."""
    now = time.time()
    job, _ = store.create(JobRecord(id=new_job_id(), created_at=now, status=JobStatus.QUEUED, model="tiny",
                                    spec={"prompt": "p"}, timestamps={"submitted_at": now}, owner=owner,
                                    webhook_url=url))
    store.update(job.id, None, status=JobStatus.COMPLETED)
    return job.id


def send_once(sender: WebhookSender) -> int:
    async def run():
        try:
            return await sender.send_due()
        finally:
            await sender.close()

    return asyncio.run(run())


def test_a_forbidden_target_at_send_time_is_given_up_without_connecting(store, listener):
    # Accepted when the operator trusted loopback; the rule is gone by the time it is sent.
    port = listener.server.server_address[1]
    urls = [f"http://localhost:{port}/hook", f"http://127.0.0.1:{port}/hook", f"http://[::ffff:7f00:1]:{port}/hook"]
    jobs = [finished_job(store, url) for url in urls]
    outcomes = []
    sender = WebhookSender(store, WebhooksConfig(secret=WEBHOOK_SECRET), AuthConfig(), on_attempt=outcomes.append)
    assert send_once(sender) == 3
    assert listener.posts == []
    assert outcomes == ["refused"] * 3  # a forbidden address stays forbidden: no retries, counted apart
    for job_id in jobs:
        [event] = store.webhook_events_of(job_id)
        assert (event.attempts, event.next_attempt_at, event.delivered_at) == (1, None, None)
        assert event.last_error.startswith("refused: ") and "loopback" in event.last_error, event.last_error


def test_the_checked_address_is_the_one_connected_to_and_a_rebound_name_is_refused(store, listener):
    port = listener.server.server_address[1]
    url = f"http://hooks.example.test:{port}/hook"
    # First lookup: the receiver's address, which the operator trusts; later ones: another loopback address.
    dns = TableDNS({"hooks.example.test": [["127.0.0.1"], ["127.0.0.2"]]})
    sender = WebhookSender(store, WebhooksConfig(secret=WEBHOOK_SECRET, allowed_networks=["127.0.0.1/32"]),
                           AuthConfig(), dns=dns)
    first = finished_job(store, url)
    assert send_once(sender) == 1
    assert dns.lookups == ["hooks.example.test"]  # one lookup: what was checked is what was connected to
    [(headers, _)] = listener.posts
    assert headers["host"] == f"hooks.example.test:{port}"  # the request keeps the name
    assert store.webhook_events_of(first)[0].delivered_at is not None

    second = finished_job(store, url)  # the name now resolves elsewhere (a new sender session)
    assert send_once(sender) == 1
    [event] = store.webhook_events_of(second)
    assert event.last_error.startswith("refused: hooks.example.test resolves only to addresses"), event.last_error
    assert "127.0.0.2 is loopback" in event.last_error and event.next_attempt_at is None
    assert len(listener.posts) == 1  # nothing was sent to the rebound address


def test_each_tenants_events_are_signed_with_its_own_secret(store, listener):
    own = {"alpha": new_secret(), "beta": new_secret()}
    auth = AuthConfig(enabled=True, keys=[
        ApiKey(name="alpha", sha256=key_digest("dsk-a"), webhook_secret=own["alpha"]),
        ApiKey(name="beta", sha256=key_digest("dsk-b"), webhook_secret=own["beta"]),
        ApiKey(name="gamma", sha256=key_digest("dsk-c")),  # no secret of its own: webhooks.secret signs
    ])
    signing = {**own, "gamma": WEBHOOK_SECRET}
    jobs = {owner: finished_job(store, listener.url, owner) for owner in signing}
    sender = WebhookSender(store, WebhooksConfig(secret=WEBHOOK_SECRET, allowed_networks=["127.0.0.0/8"]), auth)
    assert send_once(sender) == 3
    posts = {json.loads(body)["data"]["id"]: (headers, body) for headers, body in listener.posts}
    for owner, secret in signing.items():
        headers, body = posts[jobs[owner]]
        Webhook(secret).verify(body, headers)
        openai.OpenAI(api_key="unused", webhook_secret=secret).webhooks.verify_signature(body, headers)
        for other, other_secret in signing.items():
            if other != owner:  # no tenant's secret verifies (so could forge) another tenant's events
                with pytest.raises(WebhookVerificationError):
                    Webhook(other_secret).verify(body, headers)
    db = open(store.url.removeprefix("sqlite:///"), "rb").read()
    assert all(secret.encode() not in db for secret in signing.values())  # the outbox names the key only


def test_a_job_nobody_can_sign_for_may_not_ask_for_a_webhook(tmp_path):
    alpha_secret = new_secret()
    config = load_config(None, environ={
        "DITSERVE_STORAGE__JOB_STORE_URL": f"sqlite:///{tmp_path}/jobs.db",
        "DITSERVE_STORAGE__ARTIFACTS_URL": str(tmp_path / "artifacts"),
        "DITSERVE_AUTH__ENABLED": "true",
        "DITSERVE_AUTH__KEYS": f"[{{name: alpha, sha256: {key_digest('dsk-a')}, webhook_secret: '{alpha_secret}'}},"
                               f" {{name: gamma, sha256: {key_digest('dsk-c')}}}]",
    })
    jobs = VideoJobs(config)
    request = {"prompt": "p", "webhook_url": "https://hooks.example.com/h"}
    job, created = jobs.submit(request, owner="alpha")
    assert created and job.webhook_url == request["webhook_url"]
    with pytest.raises(SpecError) as refused:
        jobs.submit(request, owner="gamma")  # no secret of its own, and no webhooks.secret
    assert refused.value.field == "webhook_url" and "no webhook signing secret" in refused.value.message
    jobs.store.close()


def test_a_webhook_secret_is_one_tenants(tmp_path):
    shared = new_secret()
    entries = [{"name": name, "sha256": key_digest(f"dsk-{name}"), "webhook_secret": shared} for name in ("a", "b")]
    with pytest.raises(Exception, match="same webhook_secret"):
        config_from_dict({"auth": {"keys": entries}}, "test")


def test_keys_create_makes_a_key_and_its_webhook_secret_shown_once():
    result = subprocess.run([sys.executable, "-m", "serving.cli", "keys", "create", "alpha"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    config = config_from_dict(yaml.safe_load(result.stdout), "keys create output")
    [entry] = config.auth.keys
    shown = dict(line.lstrip("# ").split(":", 1) for line in result.stderr.splitlines() if line.startswith("#   "))
    key, secret = shown["API key"].split()[0], shown["webhook signing secret"].split()[0]
    assert (entry.name, entry.sha256, entry.webhook_secret) == ("alpha", key_digest(key), secret)
    assert key not in result.stdout  # the config keeps only the key's hash

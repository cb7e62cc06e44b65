"""Webhooks against a receiver on loopback: a finished job's event is signed the Standard
Webhooks way (checked with the openai SDK and the standardwebhooks library), a failed post
is retried with the same event id and body, and a cancelled job announces `video.failed`."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import requests
from standardwebhooks.webhooks import Webhook

from conftest import WEBHOOK_SECRET, wait_for
from serving.config import WebhooksConfig
from serving.webhooks import WebhookURLError, backoff_seconds, check_webhook_url


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
                        ("not a url", "http"), ("http://127.0.0.1:99999/x", "valid URL")]:
        response = requests.post(f"{service.url}/v1/videos", json={"prompt": "p", "webhook_url": url})
        assert response.status_code == 400, (url, response.text)
        error = response.json()["error"]
        assert error["param"] == "webhook_url" and reason in error["message"], error


def test_webhook_url_rules_without_a_server():
    config = WebhooksConfig(secret=WEBHOOK_SECRET, allowed_hosts=["hooks.example.com", "*.internal"])
    assert check_webhook_url("https://hooks.example.com/a", config)
    assert check_webhook_url("http://ci.internal:8080/a", config)
    with pytest.raises(WebhookURLError, match="not among the hosts"):
        check_webhook_url("http://169.254.169.254/latest", config)
    with pytest.raises(WebhookURLError, match="webhooks.secret"):
        check_webhook_url("https://hooks.example.com/a", WebhooksConfig())
    steps = WebhooksConfig(initial_backoff_seconds=5, max_backoff_seconds=60)
    assert [backoff_seconds(n, steps) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]

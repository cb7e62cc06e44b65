"""Limits of the create route on a live Gateway app (uvicorn, real HTTP, real SQLite; no Ray):
the cost budget, the priority a key may use, request bodies that stream past the size limit
(chunked JSON and multipart, refused with 413 before they end), bodies Python's parsers
cannot take (400, not 500), idempotency keys of any allowed length, rate limits the SDK's
own polling never trips, and the API docs closed while auth is on."""

from __future__ import annotations

import socket
import threading
import uuid

import openai
import pytest
import requests

from conftest import postgres_url
from live_api import config_for, live_api
from serving.auth import key_digest
from serving.jobs.store import jobs as jobs_table

KEYS = {"alpha": "dsk-alpha-limits-0001", "boss": "dsk-boss-limits-0002", "tight": "dsk-tight-limits-0003",
        "t" * 64: "dsk-long-name-limits-0004"}


def auth_env(**extra: str) -> dict[str, str]:
    entries = ", ".join([
        f"{{name: alpha, sha256: {key_digest(KEYS['alpha'])}}}",
        f"{{name: boss, sha256: {key_digest(KEYS['boss'])}, max_priority: 50}}",
        f"{{name: tight, sha256: {key_digest(KEYS['tight'])}, requests_per_minute: 3, reads_per_minute: 4}}",
        f"{{name: {'t' * 64}, sha256: {key_digest(KEYS['t' * 64])}}}",
    ])
    return {"auth__enabled": "true", "auth__keys": f"[{entries}]", **extra}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def error_of(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.fixture(scope="module")
def open_api(tmp_path_factory):
    with live_api(config_for(tmp_path_factory.mktemp("open"), server__max_body_bytes="16384")) as api:
        yield api


@pytest.fixture(scope="module")
def keyed_api(tmp_path_factory):
    with live_api(config_for(tmp_path_factory.mktemp("keyed"), **auth_env())) as api:
        yield api


# ---- cost budget (issue 15 item 3) ----------------------------------------------------


def test_a_request_over_the_cost_budget_is_400_saying_what_fits(open_api):
    body = {"prompt": "x", "size": "1280x720", "fps": 120, "seconds": "10", "num_inference_steps": 100}
    error = error_of(requests.post(f"{open_api.url}/v1/videos", json=body), 400)
    assert error["param"] == "size"  # 225x the preset's pixels: the field that grew the cost most
    assert "latent token-steps" in error["message"] and "a size up to" in error["message"]
    assert "at 64x64 and 16 fps with 8 steps, at most 10 s fits" in error["message"]
    # The preset's documented defaults, and the test suite's slow job, fit.
    for fits in ({"prompt": "x"}, {"prompt": "x", "size": "128x128", "seconds": "1", "num_inference_steps": 100}):
        assert requests.post(f"{open_api.url}/v1/videos", json=fits).status_code == 200


# ---- priority is the operator's to give (item 3) --------------------------------------------


def test_a_key_may_use_priorities_up_to_its_maximum(keyed_api):
    url = f"{keyed_api.url}/v1/videos"
    error = error_of(requests.post(url, json={"prompt": "x", "priority": 1}, headers=bearer("alpha")), 403)
    assert error["param"] == "priority" and error["code"] == "priority_not_allowed"
    assert "up to 0" in error["message"]
    assert requests.post(url, json={"prompt": "x", "priority": -10}, headers=bearer("alpha")).status_code == 200
    assert requests.post(url, json={"prompt": "x", "priority": 50}, headers=bearer("boss")).status_code == 200
    assert error_of(requests.post(url, json={"prompt": "x", "priority": 51}, headers=bearer("boss")),
                    403)["param"] == "priority"
    with pytest.raises(openai.PermissionDeniedError):
        client(keyed_api, "alpha").videos.create(prompt="x", extra_body={"priority": 5})


def test_with_auth_off_priorities_are_the_operators_own(open_api):
    response = requests.post(f"{open_api.url}/v1/videos", json={"prompt": "x", "priority": 100})
    assert response.status_code == 200 and response.json()["priority"] == 100


# ---- bodies streamed past the limit (item 8) ------------------------------------------------


def post_chunked(api, content_type: str, chunks: list[bytes], finish: bool) -> tuple[int, bytes]:
    """POST with Transfer-Encoding: chunked (no Content-Length) over a raw socket; without
    `finish` the body never ends, so an answer proves the server did not wait for the rest.
    (Sending much past the point of refusal would race the server's close.)"""
    port = int(api.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(f"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                     "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode())
        for chunk in chunks:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        if finish:
            sock.sendall(b"0\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            assert data, "connection closed without an answer"
            answer += data
        while True:  # the rest of the answer (Connection: close ends it)
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_a_chunked_json_body_is_refused_as_it_passes_the_limit(open_api):
    # Just past the 16 kB limit, then nothing more: the body never ends.
    padding = [b'{"prompt": "' + b"x" * 1000] + [b"x" * 1000] * 16
    status, body = post_chunked(open_api, "application/json", padding, finish=False)
    assert status == 413 and b"body_too_large" in body


def test_a_chunked_multipart_body_is_refused_as_it_passes_the_limit(open_api):
    head = (b'--XyZ\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n')
    status, body = post_chunked(open_api, "multipart/form-data; boundary=XyZ", [head] + [b"y" * 1000] * 17,
                                finish=False)
    assert status == 413 and b"body_too_large" in body


def test_a_chunked_body_within_the_limit_is_read(open_api):
    status, body = post_chunked(open_api, "application/json", [b'{"prompt": ', b'"a chunked request"}'], finish=True)
    assert status == 200, body


# ---- bodies Python's parsers cannot take (item 9) --------------------------------------------


@pytest.mark.parametrize("raw,words", [
    (b'{"prompt": "x", "seed": ' + b"1" * 5000 + b"}", "too long"),
    (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
])
def test_unreadable_json_is_400(open_api, raw, words):
    response = requests.post(f"{open_api.url}/v1/videos", data=raw, headers={"Content-Type": "application/json"})
    error = error_of(response, 400)
    assert error["code"] == "invalid_json" and words in error["message"]


def test_a_form_field_of_more_digits_than_python_converts_is_400(open_api):
    response = requests.post(f"{open_api.url}/v1/videos", files={"prompt": (None, "x"), "seed": (None, "9" * 4400)})
    error = error_of(response, 400)
    assert error["param"] == "seed" and len(error["message"]) < 500


# ---- idempotency keys of any allowed length (item 9) ---------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/jobs.db"
    return postgres_url("on Postgres")


def test_the_longest_idempotency_key_of_the_longest_key_name_fits(tmp_path, store_url):
    with live_api(config_for(tmp_path, storage__job_store_url=store_url, **auth_env())) as api:
        headers = {**bearer("t" * 64), "Idempotency-Key": "k" * 254 + uuid.uuid4().hex[:1]}
        first = requests.post(f"{api.url}/v1/videos", json={"prompt": "x", "seed": 1}, headers=headers)
        again = requests.post(f"{api.url}/v1/videos", json={"prompt": "x", "seed": 1}, headers=headers)
        assert first.status_code == 200, first.text
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        assert again.headers["Idempotent-Replayed"] == "true"
        stored = api.jobs.store.get(first.json()["id"]).idempotency_key
        assert len(stored) <= jobs_table.c.idempotency_key.type.length
        # The same key from a tenant of another name is another video.
        other = requests.post(f"{api.url}/v1/videos", json={"prompt": "x", "seed": 1},
                              headers={**bearer("alpha"), "Idempotency-Key": headers["Idempotency-Key"]})
        assert other.status_code == 200 and other.json()["id"] != first.json()["id"]


# ---- rate limits (item 9) -----------------------------------------------------------------------


def client(api, name: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEYS[name], max_retries=0)


def test_the_sdks_own_polling_of_a_full_quota_never_trips_the_default_rate(tmp_path):
    # At the default limits, with a short poll interval so the test takes seconds: the read
    # rate follows the interval the server advertises (the old flat 600/min tripped here).
    with live_api(config_for(tmp_path, server__poll_after_ms="100", **auth_env())) as api:
        sdk = client(api, "alpha")
        quota = api.config.auth.max_concurrent_jobs
        videos = [sdk.videos.create(prompt=f"poll me {i}") for i in range(quota)]
        failures: list[BaseException] = []

        def poll(video_id: str) -> None:
            try:
                assert sdk.videos.poll(video_id).status == "failed"  # cancelled below
            except BaseException as exc:
                failures.append(exc)

        pollers = [threading.Thread(target=poll, args=(v.id,)) for v in videos]
        for thread in pollers:
            thread.start()
        finished = threading.Event()
        finished.wait(8)  # 16 pollers at 10 polls/s each: well past 600 reads a minute
        for video in videos:
            sdk.post(f"/videos/{video.id}/cancel", cast_to=object)
        for thread in pollers:
            thread.join(timeout=30)
        assert not failures, failures[:1]


def test_reads_and_writes_have_their_own_rates(keyed_api):
    url = f"{keyed_api.url}/v1/videos"
    unknown = f"{url}/video_{'0' * 32}/cancel"
    assert [requests.post(unknown, headers=bearer("tight")).status_code for _ in range(4)] == [404, 404, 404, 429]
    # Writes spent; reads still have their own budget of 4.
    assert [requests.get(url, headers=bearer("tight")).status_code for _ in range(5)] == [200] * 4 + [429]
    response = requests.get(url, headers=bearer("tight"))
    assert response.json()["error"]["code"] == "rate_limit_exceeded" and 1 <= int(response.headers["Retry-After"]) <= 60


# ---- the API's docs (item 9) ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_docs_are_closed_while_auth_is_on(keyed_api, path):
    assert requests.get(f"{keyed_api.url}{path}").status_code == 404
    assert requests.get(f"{keyed_api.url}{path}", headers=bearer("alpha")).status_code == 404


def test_docs_open_when_the_operator_says_so_or_auth_is_off(open_api, tmp_path):
    assert requests.get(f"{open_api.url}/openapi.json").json()["info"]["title"] == "ditserve"
    with live_api(config_for(tmp_path, server__api_docs="public", **auth_env())) as api:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert requests.get(f"{api.url}{path}").status_code == 200

"""Progress streams (SSE) on a live Gateway app (uvicorn, real HTTP, real SQLite; no Ray):
many open streams cost one job-store query per interval, not one per stream; each still sees
its job change; streams are capped per key (and in all) with 429 + Retry-After; and a stream
ends after its maximum lifetime with an event telling the client to reconnect or poll."""

from __future__ import annotations

import contextlib
import json
import time

import requests
from sqlalchemy import event

from conftest import wait_for
from live_api import DRIVER, config_for, live_api
from serving.auth import key_digest
from serving.jobs.records import JobStatus, Stage

KEY = "dsk-events-test-key-0001"


def events(response: requests.Response):
    """(event name, data) pairs of an SSE response, as they arrive; keep-alive comments skipped."""
    name = None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            yield name, json.loads(line[len("data: "):])


def open_stream(api, video_id: str, headers=None) -> requests.Response:
    response = requests.get(f"{api.url}/v1/videos/{video_id}/events", headers=headers, stream=True, timeout=20)
    return response


@contextlib.contextmanager
def counted_statements(engine):
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_many_streams_cost_one_query_per_interval_and_each_sees_its_job(tmp_path):
    interval, window, streams = 0.2, 3.0, 8
    with live_api(config_for(tmp_path, server__event_poll_seconds=str(interval))) as api:
        ids = [requests.post(f"{api.url}/v1/videos", json={"prompt": f"watch {i}"}).json()["id"]
               for i in range(streams)]
        responses = [open_stream(api, video_id) for video_id in ids]
        readers = [events(r) for r in responses]
        try:
            assert all(next(reader)[0] == "video.progress" for reader in readers)  # the state at opening
            with counted_statements(api.jobs.store.engine) as statements:
                time.sleep(window)
            # One read of all watched jobs per interval (a stream that polled on its own
            # would make streams x window / its interval of them).
            assert 2 <= len(statements) <= window / interval + 2, statements
            assert all(" IN " in s for s in statements)
            # Each stream still follows its own job: a progress step on one, a cancel on another.
            assert api.jobs.store.claim(DRIVER, 60, 1)[0].id == ids[0]
            api.jobs.store.update(ids[0], DRIVER, status=JobStatus.IN_PROGRESS, stage=Stage.DENOISER, progress=40)
            name, video = next(readers[0])
            assert (name, video["status"], video["progress"]) == ("video.progress", "in_progress", 40)
            requests.post(f"{api.url}/v1/videos/{ids[1]}/cancel")
            name, video = next(readers[1])
            assert name == "video.failed" and video["error"]["code"] == "cancelled"
            assert next(readers[1], None) is None  # a finished video's stream ends
        finally:
            for response in responses:
                response.close()


def test_open_streams_are_capped_per_key_with_retry_after(tmp_path):
    keys = f"[{{name: viewer, sha256: {key_digest(KEY)}, max_event_streams: 2}}]"
    config = config_for(tmp_path, auth__enabled="true", auth__keys=keys, server__event_stream_max_seconds="300")
    headers = {"Authorization": f"Bearer {KEY}"}
    with live_api(config) as api:
        video_id = requests.post(f"{api.url}/v1/videos", json={"prompt": "watched"}, headers=headers).json()["id"]
        first, second = open_stream(api, video_id, headers), open_stream(api, video_id, headers)
        assert first.status_code == second.status_code == 200
        third = requests.get(f"{api.url}/v1/videos/{video_id}/events", headers=headers, timeout=20)
        assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_streams"
        assert 1 <= int(third.headers["Retry-After"]) <= 300
        first.close()  # the client hangs up: its slot comes back
        again = wait_for(lambda: (r := open_stream(api, video_id, headers)).status_code == 200 and r, timeout=10,
                         interval=0.2)
        again.close()
        second.close()


def test_with_auth_off_the_replica_caps_all_streams(tmp_path):
    with live_api(config_for(tmp_path, server__max_event_streams="1")) as api:
        video_id = requests.post(f"{api.url}/v1/videos", json={"prompt": "watched"}).json()["id"]
        with open_stream(api, video_id) as first:
            assert first.status_code == 200
            assert open_stream(api, video_id).status_code == 429


def test_a_stream_ends_after_its_lifetime_telling_the_client_to_reconnect(tmp_path):
    with live_api(config_for(tmp_path, server__event_stream_max_seconds="1", server__max_event_streams="1")) as api:
        video_id = requests.post(f"{api.url}/v1/videos", json={"prompt": "a long wait"}).json()["id"]
        with open_stream(api, video_id) as response:
            seen = list(events(response))  # ends on its own
        assert [name for name, _ in seen] == ["video.progress", "stream.expired"]
        assert seen[-1][1]["id"] == video_id and "reconnect" in seen[-1][1]["message"]
        # Its slot came back with it.
        wait_for(lambda: open_stream(api, video_id).status_code == 200, timeout=10, interval=0.2)

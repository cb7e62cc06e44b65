"""The API while its database is down for longer than the job store rides out: 503 with
Retry-After and a reference, never a 500 or a database host in the message; and back to
normal once the database is."""

from __future__ import annotations

import pytest
import requests

from conftest import PostgresOutage
from live_api import config_for, live_api

@pytest.fixture
def outage():
    database = PostgresOutage("an API during a database outage")
    yield database
    database.drop()


def test_a_database_outage_is_503_with_retry_after_and_no_host(tmp_path, outage):
    config = config_for(tmp_path, storage__job_store_url=outage.url)
    with live_api(config) as api:
        created = requests.post(f"{api.url}/v1/videos", json={"prompt": "a red circle moving right"}, timeout=30)
        assert created.status_code == 200, created.text
        outage.down()
        down = requests.get(f"{api.url}/v1/videos/{created.json()['id']}", timeout=60)
        assert down.status_code == 503, down.text
        error = down.json()["error"]
        assert error["code"] == "service_unavailable" and int(down.headers["Retry-After"]) >= 1
        assert down.headers["x-request-id"] in error["message"]
        assert "127.0.0.1" not in error["message"] and "postgres" not in error["message"].lower()
        outage.up()
        back = requests.get(f"{api.url}/v1/videos/{created.json()['id']}", timeout=60)
        assert back.status_code == 200 and back.json()["status"] == "queued"

"""The API while its database is down for longer than the job store rides out: 503 with
Retry-After and a reference, never a 500 or a database host in the message; and back to
normal once the database is."""

from __future__ import annotations

import os
import uuid

import pytest
import requests
import sqlalchemy as sa

from live_api import config_for, live_api

POSTGRES_ENV = "DITSERVE_TEST_POSTGRES_URL"


@pytest.fixture
def outage_database():
    admin_url = os.environ.get(POSTGRES_ENV)
    if not admin_url:
        if os.environ.get("CI"):
            pytest.fail(f"{POSTGRES_ENV} is not set: .ci/run must start PostgreSQL")
        pytest.skip(f"set {POSTGRES_ENV} (see .ci/postgres.sh) to test a database outage")
    name = f"ditserve_api_outage_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))

    def allow(allowed: bool) -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f"ALTER DATABASE {name} ALLOW_CONNECTIONS {str(allowed).lower()}"))
            if not allowed:
                conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db"),
                             {"db": name})

    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}", allow
    finally:
        allow(True)
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
        admin.dispose()


def test_a_database_outage_is_503_with_retry_after_and_no_host(tmp_path, outage_database):
    url, allow = outage_database
    config = config_for(tmp_path, storage__job_store_url=url)
    with live_api(config) as api:
        created = requests.post(f"{api.url}/v1/videos", json={"prompt": "a red circle moving right"}, timeout=30)
        assert created.status_code == 200, created.text
        allow(False)
        down = requests.get(f"{api.url}/v1/videos/{created.json()['id']}", timeout=60)
        assert down.status_code == 503, down.text
        error = down.json()["error"]
        assert error["code"] == "service_unavailable" and int(down.headers["Retry-After"]) >= 1
        assert down.headers["x-request-id"] in error["message"]
        assert "127.0.0.1" not in error["message"] and "postgres" not in error["message"].lower()
        allow(True)
        back = requests.get(f"{api.url}/v1/videos/{created.json()['id']}", timeout=60)
        assert back.status_code == 200 and back.json()["status"] == "queued"

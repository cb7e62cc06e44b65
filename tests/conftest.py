"""Shared fixtures: one tiny-preset pipeline per test session (building it costs seconds)."""

from __future__ import annotations

import os
import shutil

# Before anything imports triton (torch and diffusers may): without a GPU our Triton kernels
# run in Triton's CPU interpreter. Triton reads this when it is imported.
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must pass with no network at all
# The tests' autoscaled apps look back 2-3 s, so their replicas push metrics every second
# (serving/app.py passes the period to Serve; it must be shorter than the look-back).
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_config():
    from serving.config import load_config

    return load_config(None, environ={})


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_config):
    from serving.pipeline.local import LocalPipeline

    return LocalPipeline(tiny_config)


# ---- PostgreSQL (started by .ci/postgres.sh; CI always has it) ----------------------------

POSTGRES_ENV = "DITSERVE_TEST_POSTGRES_URL"


def postgres_url(purpose: str) -> str:
    """The test server's URL; without one skip the test (fail in CI, which must start it)."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"{POSTGRES_ENV} is not set: .ci/run must start PostgreSQL")
        pytest.skip(f"set {POSTGRES_ENV} (see .ci/postgres.sh) to test {purpose}")
    return url


class PostgresOutage:
    """A database of its own on the test server that can be taken away: `down()` refuses new
    connections and ends every open one (a failover, as clients see it), `up()` ends it."""

    def __init__(self, purpose: str):
        import uuid

        import sqlalchemy as sa

        admin_url = postgres_url(purpose)
        self.name = f"ditserve_outage_{uuid.uuid4().hex[:8]}"
        self.url = admin_url.rsplit("/", 1)[0] + f"/{self.name}"
        self._admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self._sql(f"CREATE DATABASE {self.name}")

    def _sql(self, statement: str, **params) -> None:
        import sqlalchemy as sa

        with self._admin.connect() as conn:
            conn.execute(sa.text(statement), params)

    def down(self) -> None:
        self._sql(f"ALTER DATABASE {self.name} ALLOW_CONNECTIONS false")
        self._sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db", db=self.name)

    def up(self) -> None:
        self._sql(f"ALTER DATABASE {self.name} ALLOW_CONNECTIONS true")

    def drop(self) -> None:
        self.up()
        self._sql(f"DROP DATABASE {self.name} WITH (FORCE)")
        self._admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    """A job store on each backend: an SQLite file, and PostgreSQL (skipped without one)."""
    from serving.jobs.store import JobStore, metadata

    if request.param == "sqlite":
        store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    else:
        store = JobStore(postgres_url("the Postgres job store"))
        metadata.drop_all(store.engine)  # a clean table per test on the shared server
        metadata.create_all(store.engine)
    yield store
    store.close()


# ---- the live service: one local Ray cluster and one app for the whole test session ------


class Service:
    def __init__(self, url: str, config, metrics_port: int):
        self.url = url
        self.config = config
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)


def wait_for(predicate, timeout=120, interval=0.05):
    """Poll until `predicate()` is truthy; return its value."""
    import time

    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval)
    return value


def wait_ready(url: str, timeout: float = 180, process=None) -> None:
    """Until GET /readyz is 200 (connection errors and slow answers count as not yet)."""
    import time

    import requests

    deadline = time.monotonic() + timeout
    while True:
        assert process is None or process.poll() is None, "ditserve serve exited early"
        try:
            if requests.get(f"{url}/readyz", timeout=10).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # up, but replicas still starting
            pass
        assert time.monotonic() < deadline, f"{url} not ready within {timeout:.0f} s"
        time.sleep(0.5)


def start_serve(tmp_path, port: int, metrics_port: int | None = None, **env_overrides: str):
    """`ditserve serve` as a user runs it, on its own Ray cluster (not the tests'), with its
    job store and videos under tmp_path (and Ray's Prometheus endpoint on metrics_port);
    returns the process once it is ready."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(DITSERVE_STORAGE__JOB_STORE_URL=f"sqlite:///{tmp_path}/jobs.db",
               DITSERVE_STORAGE__ARTIFACTS_URL=str(tmp_path / "artifacts"), **env_overrides)
    process = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--port", str(port),
                                "--metrics-port", str(metrics_port or _free_port())],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", process=process)
    except BaseException:
        process.kill()
        raise
    return process


WEBHOOK_SECRET = "whsec_" + "dGVzdC13ZWJob29rLXNpZ25pbmctc2VjcmV0LTMyYnl0ZQ=="


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def service(tmp_path_factory):
    """`ditserve serve`'s app on a real local Ray cluster, with a SQLite file and a local folder."""
    import ray
    from ray import serve

    from serving.app import run
    from serving.cluster_env import SERVE_CLUSTER_ENV
    from serving.config import load_config

    data = tmp_path_factory.mktemp("service")
    port = _free_port()
    # Fault-injection points the fault tests arm (serving/failpoints.py); replicas inherit it.
    os.environ["DITSERVE_FAILPOINTS_DIR"] = str(tmp_path_factory.mktemp("failpoints"))
    config = load_config(None, environ={
        "DITSERVE_STORAGE__JOB_STORE_URL": f"sqlite:///{data}/jobs.db",
        "DITSERVE_STORAGE__ARTIFACTS_URL": str(data / "artifacts"),
        "DITSERVE_SERVER__PORT": str(port),
        "DITSERVE_SERVER__DIRECTOR_POLL_SECONDS": "0.2",
        "DITSERVE_SERVER__LEASE_SECONDS": "6",  # a dead Director's jobs are taken over within seconds
        # An operator rule only the content-policy test's prompt trips.
        "DITSERVE_CONTENT_POLICY__ENABLED": "true",
        "DITSERVE_CONTENT_POLICY__RULES": '[{id: test-blocked-term, terms: [forbiddenword], message: "kept out by the tests"}]',
        # Webhooks signed with a test secret; a failed post is retried within a second.
        "DITSERVE_WEBHOOKS__SECRET": WEBHOOK_SECRET,
        "DITSERVE_WEBHOOKS__INITIAL_BACKOFF_SECONDS": "0.5",
        "DITSERVE_WEBHOOKS__ALLOWED_NETWORKS": "[127.0.0.0/8]",  # the tests' receivers listen on loopback
        # A decode hung this long is retried and its replica replaced (the hung-stage test).
        "DITSERVE_STAGES__VAE_DECODER__TIMEOUT_SECONDS": "20",
        "DITSERVE_SERVER__MAX_JOB_ATTEMPTS": "4",
    })
    metrics_port = _free_port()
    os.environ.update(SERVE_CLUSTER_ENV)  # as `ditserve serve` starts its cluster
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             _metrics_export_port=metrics_port)
    try:
        run(config)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        yield Service(url, config, metrics_port)
    finally:
        serve.shutdown()
        ray.shutdown()


# ---- a second app in the same cluster with API keys on ("secure") --------------------------

SECURE_APP = "secure"
KEYS = {"alpha": "dsk-alpha-test-key-0001", "beta": "dsk-beta-test-key-0002", "gamma": "dsk-gamma-test-key-0003",
        "delta": "dsk-delta-test-key-0004", "ops": "dsk-ops-test-key-0005"}


@pytest.fixture(scope="session")
def secure(service, tmp_path_factory):
    """The service's app again, with auth on, at /secure: keys alpha (defaults), beta (2
    concurrent jobs), gamma (5 requests a minute), delta (the usage tests' own) and ops (an
    operator's key). Returns (Service, its data folder)."""
    from ray import serve

    from serving.app import build_app
    from serving.auth import key_digest
    from serving.config import load_config

    data = tmp_path_factory.mktemp("secure")
    small = "{num_cpus: 0.05}"
    entries = ", ".join([
        f"{{name: alpha, sha256: {key_digest(KEYS['alpha'])}}}",
        f"{{name: beta, sha256: {key_digest(KEYS['beta'])}, max_concurrent_jobs: 2}}",
        f"{{name: gamma, sha256: {key_digest(KEYS['gamma'])}, requests_per_minute: 5, reads_per_minute: 5}}",
        f"{{name: delta, sha256: {key_digest(KEYS['delta'])}}}",
        f"{{name: ops, sha256: {key_digest(KEYS['ops'])}, operator: true}}",
    ])
    config = load_config(None, environ={
        "DITSERVE_STORAGE__JOB_STORE_URL": f"sqlite:///{data}/jobs.db",
        "DITSERVE_STORAGE__ARTIFACTS_URL": str(data / "artifacts"),
        "DITSERVE_SERVER__DIRECTOR_POLL_SECONDS": "0.2",
        "DITSERVE_SERVER__GATEWAY_NUM_CPUS": "0.05", "DITSERVE_SERVER__DIRECTOR_NUM_CPUS": "0.05",
        "DITSERVE_STAGES__TEXT_ENCODER": small, "DITSERVE_STAGES__VAE_DECODER": small, "DITSERVE_STAGES__DENOISER": small,
        "DITSERVE_AUTH__ENABLED": "true",
        "DITSERVE_AUTH__KEYS": f"[{entries}]",
    })
    serve.run(build_app(config), name=SECURE_APP, route_prefix=f"/{SECURE_APP}")
    url = f"{service.url}/{SECURE_APP}"
    wait_ready(url)
    yield Service(url, config, 0), data
    serve.delete(SECURE_APP)

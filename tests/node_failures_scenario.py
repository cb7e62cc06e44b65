"""Node failures on a real multi-node Ray cluster on this one machine.

Run by tests/test_node_failures.py in its own process (the pytest process already owns a Ray
cluster), or by hand: `python tests/node_failures_scenario.py --workdir DIR [--redis-server PATH]`.

It starts a head and worker raylets with Ray's own `ray.cluster_utils.Cluster` and deploys the
app with each part on a node it chose (custom resources; see NODES), then, each time with
fresh jobs mid-denoise:

  denoiser_node: removes the node holding the Denoiser replica, adds a replacement;
  director_node: removes the node holding the Director, adds a replacement;
  gcs_restart:   kills the head's GCS, whose tables live in an external redis-server, and
                 starts it again (only with --redis-server).

While each fault lasts it polls every job over HTTP and submits one more. It prints one JSON
object: per scenario, each job's final row, its terminal webhook events, whether its MP4
downloads, and every HTTP answer seen; or {"error": ...} when the run itself broke.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

# Where each part runs. The Gateway and the Director share `server.resources`
# ({"ditserve_head": 1}); the Director also asks for 2 CPUs, more than the head has, so it can
# only run on the director node, which joins after the Gateway took the head's unit.
NODES = {
    "head": {"num_cpus": 1, "resources": {"ditserve_head": 1, "ditserve_aux": 2}},
    "denoiser": {"num_cpus": 1, "resources": {"ditserve_denoiser": 1}},
    "director": {"num_cpus": 2, "resources": {"ditserve_head": 1}},
}
CHECKPOINT_EVERY = 3
LEASE_SECONDS = 4
# How long a dead node has no replacement (after the GCS noticed), and the GCS stays down:
# longer than a client's 10 s patience, so anything that waits for the missing part shows.
OUTAGE_SECONDS = 12
RESULT_PREFIX = "node-failures-result: "  # the line the test reads (Ray may print too)
# 128x128 and 60 steps: a job caught past its first checkpoint still has seconds of denoising
# left when the fault lands (at 64x64 x 40 steps one finished in between, run 2026-12-04).
JOB = {"prompt": "a red circle moving right", "seconds": "1", "size": "128x128", "num_inference_steps": 60}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_env(workdir: Path, port: int) -> dict[str, str]:
    """The ditserve config of the run, as DITSERVE_* variables."""
    return {
        "DITSERVE_STORAGE__JOB_STORE_URL": f"sqlite:///{workdir}/jobs.db",
        "DITSERVE_STORAGE__ARTIFACTS_URL": str(workdir / "artifacts"),
        "DITSERVE_SERVER__PORT": str(port),
        "DITSERVE_SERVER__LEASE_SECONDS": str(LEASE_SECONDS),
        "DITSERVE_SERVER__DIRECTOR_POLL_SECONDS": "0.2",
        "DITSERVE_SERVER__RESOURCES": "{ditserve_head: 1}",
        "DITSERVE_SERVER__GATEWAY_NUM_CPUS": "0.1",
        "DITSERVE_SERVER__DIRECTOR_NUM_CPUS": "2",
        "DITSERVE_STAGES__TEXT_ENCODER__NUM_CPUS": "0.25",
        "DITSERVE_STAGES__TEXT_ENCODER__RESOURCES": "{ditserve_aux: 1}",
        "DITSERVE_STAGES__VAE_DECODER__NUM_CPUS": "0.25",
        "DITSERVE_STAGES__VAE_DECODER__RESOURCES": "{ditserve_aux: 1}",
        "DITSERVE_STAGES__DENOISER__NUM_CPUS": "0.25",
        "DITSERVE_STAGES__DENOISER__RESOURCES": "{ditserve_denoiser: 1}",
        "DITSERVE_ENGINE__CHECKPOINT_EVERY": str(CHECKPOINT_EVERY),
        "DITSERVE_WEBHOOKS__SECRET": "whsec_" + "bm9kZS1mYWlsdXJlcy1zY2VuYXJpby1zZWNyZXQtMzJi",
        "DITSERVE_WEBHOOKS__INITIAL_BACKOFF_SECONDS": "0.5",
        "DITSERVE_WEBHOOKS__ALLOWED_NETWORKS": "[127.0.0.0/8]",  # the receiver below listens on loopback
    }


# ---- outside observers: a webhook receiver and an HTTP poller -------------------------------


class Hooks:
    """Receives the jobs' webhooks; keeps the distinct event ids per job and type."""

    def __init__(self):
        self.events: dict[str, set[tuple[str, str]]] = {}
        self.lock = threading.Lock()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with hooks.lock:
                    hooks.events.setdefault(body["data"]["id"], set()).add((body["id"], body["type"]))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, job_id: str) -> list[str]:
        with self.lock:
            return sorted(kind for _, kind in self.events.get(job_id, ()))


class Poller:
    """GETs every job once per half second while a fault lasts; records each answer."""

    def __init__(self, url: str, ids: list[str]):
        self.url, self.ids, self.answers = url, ids, []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping.is_set():
            for job_id in list(self.ids):
                self.answers.append(get_answer(f"{self.url}/v1/videos/{job_id}"))
            self.stopping.wait(0.5)

    def stop(self) -> list:
        self.stopping.set()
        self.thread.join(timeout=30)
        return self.answers


def get_answer(url: str) -> tuple[int | str, float]:
    """(the status code, or the name of the error when no answer came within 10 s; seconds taken)."""
    started = time.monotonic()
    try:
        code = requests.get(url, timeout=10).status_code
    except requests.RequestException as exc:
        code = type(exc).__name__
    return code, round(time.monotonic() - started, 2)


# ---- the service under test ------------------------------------------------------------------


class Run:
    def __init__(self, workdir: Path, redis_server: str | None, deadline: float):
        self.workdir, self.redis_server, self.deadline = workdir, redis_server, deadline
        self.redis = None
        self.cluster = None
        self.hooks = Hooks()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = service_env(workdir, self.port)
        self.db = workdir / "jobs.db"

    # -- cluster ---------------------------------------------------------------------------

    def start(self) -> None:
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster

        if self.redis_server:
            self._start_redis()
        head_args = dict(NODES["head"], include_dashboard=False, gcs_server_port=free_port(),
                         dashboard_agent_listen_port=free_port(), metrics_export_port=free_port(),
                         # A crashed node is declared dead within ~3 s instead of ~30 s.
                         _system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3})
        self.cluster = Cluster(initialize_head=True, head_node_args=head_args)
        self.denoiser_node = self.cluster.add_node(**NODES["denoiser"])
        ray.init(address=self.cluster.address, logging_level="WARNING", log_to_driver=False)

        from serving.app import APP_NAME, build_app
        from serving.config import load_config

        self.config = load_config(None, environ=self.env)
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": self.port})
        # serve.run would wait for the Director, which cannot be placed until its node joins;
        # _run (what serve.run calls) deploys without waiting.
        serve._run(build_app(self.config), name=APP_NAME, route_prefix="/", _blocking=False)
        self._wait(lambda: self.node_of("Gateway") == self.cluster.head_node.node_id, "the Gateway on the head", 240)
        self.director_node = self.cluster.add_node(**NODES["director"])
        self._wait_ready(240)
        placement = {part: self.node_of(part) for part in ("Gateway", "Director", "Denoiser")}
        expected = {"Gateway": self.cluster.head_node.node_id, "Director": self.director_node.node_id,
                    "Denoiser": self.denoiser_node.node_id}
        if placement != expected:
            raise RuntimeError(f"parts not on the nodes chosen for them: {placement} != {expected}")

    def _start_redis(self) -> None:
        port = free_port()
        self.redis = subprocess.Popen(
            [self.redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def pong() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    return sock.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        self._wait(pong, "redis-server to answer", 20)
        os.environ["RAY_REDIS_ADDRESS"] = f"127.0.0.1:{port}"  # read by the head Node: GCS tables in Redis

    def node_dead(self, node_id: str) -> bool:
        import ray

        return any(n["NodeID"] == node_id and not n["Alive"] for n in ray.nodes())

    def node_of(self, deployment: str) -> str | None:
        """The node id of the live replica of `deployment` (one replica each here)."""
        import ray

        for actor in ray._private.state.actors().values():
            if actor["ActorClassName"] == f"ServeReplica:ditserve:{deployment}" and actor["State"] == "ALIVE":
                return actor["Address"]["NodeID"]
        return None

    def stop(self) -> None:
        import ray

        try:
            ray.shutdown()
        finally:
            try:
                if self.cluster is not None:
                    self.cluster.shutdown()
            finally:
                if self.redis is not None:
                    self.redis.kill()
                    self.redis.wait(timeout=10)
                self.hooks.server.shutdown()

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self) -> tuple[tuple[int | str, float], str | None]:
        """((status code or error name, seconds taken), the job id when accepted)."""
        started = time.monotonic()
        try:
            response = requests.post(f"{self.url}/v1/videos", json={**JOB, "webhook_url": self.hooks.url},
                                     timeout=10)
        except requests.RequestException as exc:
            return (type(exc).__name__, round(time.monotonic() - started, 2)), None
        answer = (response.status_code, round(time.monotonic() - started, 2))
        return answer, response.json().get("id") if response.status_code == 200 else None

    def submit_jobs(self, count: int) -> list[str]:
        ids = [self.submit() for _ in range(count)]
        if any(job_id is None for _, job_id in ids):
            raise RuntimeError(f"a job was refused before any fault: {[answer for answer, _ in ids]}")
        return [job_id for _, job_id in ids]

    def rows(self, ids: list[str]) -> dict[str, dict]:
        with sqlite3.connect(self.db, timeout=30) as conn:
            conn.row_factory = sqlite3.Row
            marks = ",".join("?" * len(ids))
            found = conn.execute(f"SELECT id, status, stage, step, checkpoint_step, resumed_from_step, attempts, "
                                 f"error_code, error_message FROM jobs WHERE id IN ({marks})", ids).fetchall()
            counts = dict(conn.execute(f"SELECT id, count(*) FROM jobs WHERE id IN ({marks}) GROUP BY id", ids))
            outbox = {}
            for job_id, kind in conn.execute(f"SELECT job_id, type FROM webhook_events WHERE job_id IN ({marks})", ids):
                outbox.setdefault(job_id, []).append(kind)
        return {r["id"]: {**dict(r), "rows": counts[r["id"]], "outbox": sorted(outbox.get(r["id"], []))} for r in found}

    def wait_mid_denoise(self, ids: list[str]) -> dict[str, int]:
        """Until a job is denoising past a checkpoint; then the checkpoints of all denoising ones."""
        def past_checkpoint():
            rows = self.rows(ids).values()
            # Only jobs with at least half their steps to go: the others may end before the fault.
            at = {r["id"]: r["checkpoint_step"] for r in rows if r["stage"] == "denoiser" and r["checkpoint_step"] > 0
                  and r["step"] <= JOB["num_inference_steps"] // 2}
            return at or None

        return self._wait(past_checkpoint, "a job past a checkpoint", 120, interval=0.1)

    def finish(self, ids: list[str]) -> dict[str, dict]:
        self._wait(lambda: all(r["status"] in ("completed", "failed", "cancelled") for r in self.rows(ids).values()),
                   "every job to end", max(5, self.deadline - time.monotonic() - 30))
        time.sleep(1.5)  # let any late duplicate (a second completion, a second webhook) show itself
        rows = self.rows(ids)
        listed = requests.get(f"{self.url}/v1/videos", params={"limit": 100}, timeout=30).json()["data"]
        for job_id, row in rows.items():
            content = requests.get(f"{self.url}/v1/videos/{job_id}/content", timeout=30)
            row["mp4"] = content.status_code == 200 and content.content[4:8] == b"ftyp"
            row["listed"] = sum(1 for v in listed if v["id"] == job_id)
        self._wait(lambda: all(self.hooks.of(i) for i in ids), "every webhook", 20)
        for job_id, row in rows.items():
            row["webhooks"] = self.hooks.of(job_id)
        return rows

    # -- the faults ----------------------------------------------------------------------------

    def node_fault(self, which: str) -> dict:
        node = self.denoiser_node if which == "denoiser" else self.director_node
        ids = self.submit_jobs(3)
        at_kill = self.wait_mid_denoise(ids)
        poller = Poller(self.url, ids)
        self.cluster.remove_node(node, allow_graceful=False)  # SIGKILL: a crash, not a drain
        self._wait(lambda: self.node_dead(node.node_id), "the GCS to declare the node dead", 60, interval=0.2)
        # Serve now knows the replica is gone, and no replacement exists until the node joins.
        time.sleep(OUTAGE_SECONDS / 2)
        during_code, extra = self.submit()  # accepted while the node is gone: must complete too
        if extra is not None:
            ids.append(extra)
        time.sleep(OUTAGE_SECONDS / 2)
        replacement = self.cluster.add_node(**NODES[which])
        setattr(self, f"{which}_node", replacement)
        part = "Denoiser" if which == "denoiser" else "Director"
        self._wait(lambda: self.node_of(part) == replacement.node_id, f"the {part} on the replacement node", 120)
        jobs = self.finish(ids)
        return {"checkpoints_at_fault": at_kill, "submit_during_fault": during_code, "jobs": jobs,
                "http": poller.stop()}

    def gcs_restart(self) -> dict:
        head = self.cluster.head_node
        ids = self.submit_jobs(3)
        at_kill = self.wait_mid_denoise(ids)
        poller = Poller(self.url, ids)
        head.kill_gcs_server()
        outage_started = time.monotonic()
        during_code, extra = self.submit()
        if extra is not None:
            ids.append(extra)
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - outage_started)))
        head.start_gcs_server()
        jobs = self.finish(ids)
        return {"checkpoints_at_fault": at_kill, "submit_during_fault": during_code, "jobs": jobs,
                "http": poller.stop()}

    # -- helpers -------------------------------------------------------------------------------

    def _wait(self, predicate, what: str, timeout: float, interval: float = 0.5):
        deadline = min(time.monotonic() + timeout, self.deadline)
        while not (value := predicate()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(interval)
        return value

    def _wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            try:
                return requests.get(f"{self.url}/readyz", timeout=10).status_code == 200
            except requests.RequestException:
                return False

        self._wait(ready, "/readyz", timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="job store and videos go here")
    parser.add_argument("--redis-server", help="path of redis-server: also run the GCS restart")
    parser.add_argument("--timeout", type=float, default=420, help="seconds for the whole run")
    parser.add_argument("--keep-ray-logs", action="store_true", help="leave Ray's session folder (logs) behind")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    # Ray's sockets and its "current cluster" file under a private, short folder: a later
    # ray.init() elsewhere on this machine must never find (and join) this cluster.
    ray_tmp = tempfile.mkdtemp(prefix="dsn-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    run = Run(args.workdir.resolve(), args.redis_server, time.monotonic() + args.timeout)
    result: dict = {"scenarios": {}}
    try:
        run.start()
        result["scenarios"]["denoiser_node"] = run.node_fault("denoiser")
        result["scenarios"]["director_node"] = run.node_fault("director")
        if args.redis_server:
            result["scenarios"]["gcs_restart"] = run.gcs_restart()
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    finally:
        try:
            run.stop()
        except Exception as exc:
            result.setdefault("error", f"cleanup failed: {type(exc).__name__}: {exc}")
        if args.keep_ray_logs:
            result["ray_tmp"] = ray_tmp
        else:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())

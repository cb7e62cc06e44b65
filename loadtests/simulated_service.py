"""One arm's service: `ditserve serve --simulate` as a subprocess, started exactly as an
operator starts it, with the arm's config file; stopped with its whole process group (the
simulated nodes' raylets and workers are its children), so each arm gets a fresh cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from serving.simulate.cluster import free_port

BANNER_END = "Ctrl-C stops the service."
SCRAPE_LINE = "Prometheus scrape URL: "
START_TIMEOUT_S = 900  # a 32-GPU simulated cluster warms ~32 workers (torch imported) on 2 cores first


class SimulatedService:
    def __init__(self, folder: Path, config: Path, profile: str, gpus: int, nodes: int, time_scale: float,
                 node_autoscaling: bool = False):
        self.folder, self.config = folder, config
        self.args = ["--simulate", profile, "--gpus", str(gpus), "--nodes", str(nodes),
                     "--time-scale", f"{time_scale:g}", *(["--node-autoscaling"] if node_autoscaling else [])]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_urls: list[str] = []  # every node's Prometheus endpoint, the head's first
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a cluster of its own
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        log = open(self.folder / "serve.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "serve", *self.args, "--config", str(self.config),
             "--port", str(self.port), "--metrics-port", str(free_port())],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._banner_done():
            if self.process.poll() is not None:
                raise RuntimeError(f"ditserve serve exited with {self.process.returncode}; see {self.folder}/serve.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ditserve serve was not ready in {START_TIMEOUT_S} s; see {self.folder}/serve.log")
            time.sleep(1.0)
        requests.get(f"{self.url}/readyz", timeout=30).raise_for_status()

    def _banner_done(self) -> bool:
        text = (self.folder / "serve.log").read_text(errors="replace")
        if BANNER_END not in text:
            return False
        line = next(line for line in text.splitlines() if SCRAPE_LINE in line)
        self.metrics_urls = [url.strip() for url in line.split(SCRAPE_LINE, 1)[1].split(",")]
        return True

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)  # the clean path: Serve, then the simulated cluster
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        try:  # whatever of its group is left (a raylet that ignored the shutdown)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None

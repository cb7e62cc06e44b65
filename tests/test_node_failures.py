"""Node failures on a real multi-node Ray cluster on this machine: a crashed node holding the
Denoiser, a crashed node holding the Director, and the head's GCS killed and restarted over
Debian's redis-server (the prod overlay's GCS fault tolerance). Every accepted job completes
exactly once, interrupted ones resume from their checkpoint, and the API keeps answering.

The cluster runs in tests/node_failures_scenario.py, its own process: this pytest process may
already own a Ray cluster (the `service` fixture), and a process joins one cluster only."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).with_name("node_failures_scenario.py")
RESULT_PREFIX = "node-failures-result: "
REDIS_SERVER = shutil.which("redis-server")


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    """Runs every scenario once on one cluster (starting it is most of the cost)."""
    workdir = tmp_path_factory.mktemp("node-failures")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # not the tests' cluster
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, str(SCENARIO), "--workdir", str(workdir), "--timeout", "240"]
    if REDIS_SERVER:
        command += ["--redis-server", REDIS_SERVER]
    # Its own process group, so a run past its time leaves no raylet or redis-server behind.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"the scenario ran past its time; stderr ends:\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    assert lines, f"the scenario printed no result (exit {process.returncode}); stderr ends:\n{err[-3000:]}"
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    assert "error" not in result, f"{result['error']}\n{result.get('traceback', '')}\nstderr ends:\n{err[-3000:]}"
    return result["scenarios"]


def assert_survived(scenario: dict, resumed: bool) -> None:
    """Every job (the one submitted during the fault included) completed exactly once, and
    every HTTP request made during the fault was answered."""
    assert scenario["submit_during_fault"][0] == 200, scenario["submit_during_fault"]
    jobs = scenario["jobs"]
    assert len(jobs) == 4  # three running at the fault, one submitted during it
    for job in jobs.values():
        assert job["status"] == "completed", (job["id"], job["error_code"], job["error_message"])
        assert job["rows"] == job["listed"] == 1  # one job, listed once
        assert job["outbox"] == job["webhooks"] == ["video.completed"]  # finished once, announced once
        assert job["mp4"], job["id"]
    for job_id, checkpoint in scenario["checkpoints_at_fault"].items():
        if resumed:  # driven again after the fault, from its checkpoint rather than step 0
            assert jobs[job_id]["attempts"] >= 2, jobs[job_id]
            assert jobs[job_id]["resumed_from_step"] >= checkpoint, jobs[job_id]
    failed = [answer for answer in scenario["http"] if answer[0] != 200]
    assert scenario["http"] and not failed, f"{len(failed)} of {len(scenario['http'])} reads failed: {failed[:5]}"


def test_denoiser_node_crash_resumes_jobs_from_checkpoints(outcome):
    assert_survived(outcome["denoiser_node"], resumed=True)


def test_director_node_crash_jobs_taken_over_and_api_keeps_accepting(outcome):
    assert_survived(outcome["director_node"], resumed=True)


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server; "
                                                  ".ci/run installs it), so Ray's GCS cannot be made fault tolerant")
def test_gcs_restart_over_redis_loses_no_job_and_keeps_answering(outcome):
    assert_survived(outcome["gcs_restart"], resumed=False)

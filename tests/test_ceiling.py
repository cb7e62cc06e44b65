"""`ditserve loadtest ceiling` (issue 14, item 5), without Ray: a job's overhead from its own
timestamps, the config of a point, the closed loop against the real Gateway app (a test thread
plays the Director through the job store), the report, the CLI's checks, and a point's fresh
Postgres database. The measurement itself is a benchmark (docs/benchmarks.md), never a test."""

from __future__ import annotations

import re
import threading
import time
from collections import namedtuple

import pytest

from loadtests.ceiling_cluster import default_nodes, point_config, point_gpus
from loadtests.ceiling_report import render_ceiling, summarize_point
from loadtests.closed_loop import ClosedLoop
from loadtests.host_cpu import machine_busy_share
from loadtests.overhead import SEGMENTS, job_overhead
from loadtests.plan import default_job
from loadtests.report import JobLog
from loadtests.scratch_database import FreshDatabase
from serving.cli import main as cli_main
from serving.config import config_from_dict
from serving.cost_model import StageSeconds
from serving.jobs.records import JobStatus
from serving.simulate.profile import load_profile

PROFILE = "h100-wan2.1-1.3b"
IDEAL = StageSeconds(text_encoder=1.0, denoiser=40.0, vae_decoder=3.0)  # 44 s


def stamps(at: float, *gaps: float) -> dict[str, float]:
    """A completed job's timestamps, `gaps` (compressed seconds) between consecutive SEGMENTS' ends."""
    names = ["submitted_at", *(end for _, _, end, _ in SEGMENTS)]
    out, now = {}, at
    for name, gap in zip(names, (0.0, *gaps)):
        now += gap
        out[name] = now
    return out


# ---- a job's overhead ---------------------------------------------------------------------------


def test_overhead_is_latency_minus_the_profiles_device_seconds_uncompressed_and_split_by_segment():
    # At 10x: pickup 0.05, encode 0.11 (1 s device), routing 0.02, denoise 4.03 (40 s), decode 0.32 (3 s).
    job = stamps(1000.0, 0.05, 0.11, 0.02, 4.03, 0.0, 0.32, 0.0)
    overhead = job_overhead(job, IDEAL, 10.0)
    assert overhead.latency_s == pytest.approx(45.3)
    assert overhead.overhead_s == pytest.approx(1.3)
    assert overhead.share == pytest.approx(1.3 / 45.3)
    assert overhead.segments == pytest.approx({"pickup": 0.5, "text_encoder": 0.1, "to_denoiser": 0.2, "denoiser": 0.3,
                                               "to_vae_decoder": 0.0, "vae_decoder": 0.2, "to_completed": 0.0})
    assert sum(overhead.segments.values()) == pytest.approx(overhead.overhead_s)  # the segments add up


def test_a_job_that_did_not_complete_has_no_overhead_and_a_missing_stamp_no_segment():
    failed = {"submitted_at": 1.0, "text_encoder_started_at": 1.1, "failed_at": 2.0}
    assert job_overhead(failed, IDEAL, 10.0) is None
    job = stamps(0.0, 0.05, 0.11, 0.02, 4.03, 0.0, 0.32, 0.0)
    del job["denoiser_started_at"]  # e.g. a job resumed from a checkpoint by an older Director
    overhead = job_overhead(job, IDEAL, 10.0)
    assert overhead.segments["to_denoiser"] is None and overhead.segments["denoiser"] is None
    assert overhead.overhead_s == pytest.approx(1.3)  # the whole still comes from submitted -> completed


# ---- a point's cluster ------------------------------------------------------------------------


@pytest.mark.parametrize("replicas, helpers, gpus", [(1, 1, 2), (2, 1, 3), (5, 2, 7), (16, 4, 20)])
def test_a_point_has_a_quarter_as_many_encoders_and_decoders_as_denoisers_and_the_gpus_they_hold(replicas, helpers,
                                                                                                  gpus):
    profile = load_profile(PROFILE)
    config = point_config(replicas, "/tmp/ceiling-test", profile, None)
    stages = config["stages"]
    assert {name: stage["num_replicas"] for name, stage in stages.items()} == {
        "text_encoder": helpers, "denoiser": replicas, "vae_decoder": helpers}
    assert config["engine"]["max_batch"] == 1
    assert stages["denoiser"]["max_ongoing_requests"] == 1 and stages["vae_decoder"]["max_ongoing_requests"] == 1
    assert "max_ongoing_requests" not in stages["text_encoder"]
    assert config["storage"]["job_store_url"] == "sqlite:////tmp/ceiling-test/jobs.db"
    assert point_gpus(replicas) == gpus  # a Denoiser holds a GPU, an encoder or decoder half of one
    assert default_nodes(gpus) == -(-gpus // 8)
    config_from_dict(config, "ceiling config")  # the service accepts it


def test_a_point_on_postgres_uses_the_given_job_store_and_nothing_else_changes():
    profile = load_profile(PROFILE)
    url = "postgresql+psycopg://bench@127.0.0.1:5432/ditserve_ceiling_x4_0123abcd"
    on_postgres = point_config(4, "/tmp/ceiling-test", profile, url)
    on_sqlite = point_config(4, "/tmp/ceiling-test", profile, None)
    assert on_postgres["storage"]["job_store_url"] == url
    assert {**on_postgres, "storage": None} == {**on_sqlite, "storage": None}
    assert config_from_dict(on_postgres, "ceiling config").storage.job_store_url == url


# ---- the closed loop, against the real Gateway app --------------------------------------------


def play_director(store, stop: threading.Event, hold_s: float) -> None:
    """Drive every queued job through the stages' timestamps to completed, as the Director writes them."""
    while not stop.is_set():
        for job in store.claim("test-director", 60, 100):
            for names in (["text_encoder_started_at"], ["text_encoder_finished_at"], ["denoiser_started_at"],
                          ["denoiser_finished_at", "vae_decoder_started_at"]):
                store.stamp(job.id, "test-director", names, status=JobStatus.IN_PROGRESS)
                time.sleep(hold_s)
            store.stamp(job.id, "test-director", ["vae_decoder_finished_at", "completed_at"],
                        status=JobStatus.COMPLETED, progress=100, completed_at=time.time())
        stop.wait(0.02)


def test_each_client_keeps_one_job_in_flight_starts_staggered_and_every_job_is_followed_to_its_end(tmp_path):
    from live_api import config_for, live_api

    body = {"prompt": "a paper boat", "size": "64x64", "seconds": "1", "num_inference_steps": 2}
    with live_api(config_for(tmp_path)) as api:
        stop = threading.Event()
        director = threading.Thread(target=play_director, args=(api.jobs.store, stop, 0.02), daemon=True)
        director.start()
        log = JobLog(started_at=time.time())
        loop = ClosedLoop(api.url, body, clients=3, log=log, poll_s=0.05)
        try:
            loop.run(stagger_s=0.6, duration_s=1.5, drain_timeout_s=20)
        finally:
            stop.set()
            director.join(timeout=10)
        records = {job_id: api.jobs.store.get(job_id) for job_id in log.rows}

    assert log.rows and log.outstanding == 0 and not log.others
    assert all(row.outcome == "completed" for row in log.rows.values())
    assert set(loop.timestamps) == set(log.rows)  # the follower handed over every job's own timestamps
    by_client: dict[int, list] = {}
    for job_id, record in records.items():
        client = int(re.search(r"\(client (\d+), take \d+\)$", record.spec["prompt"]).group(1))
        by_client.setdefault(client, []).append(loop.timestamps[job_id])
    assert sorted(by_client) == [0, 1, 2]
    for client, jobs in by_client.items():
        jobs.sort(key=lambda t: t["submitted_at"])
        assert len(jobs) >= 2  # a job takes ~0.1 s plus a poll: several fit in 1.5 s
        # Closed loop: the next job is submitted only after the previous one ended.
        assert all(later["submitted_at"] >= earlier["completed_at"] for earlier, later in zip(jobs, jobs[1:]))
        assert jobs[0]["submitted_at"] - log.started_at == pytest.approx(0.6 * client / 3, abs=0.15)
    last_submission = max(t["submitted_at"] for t in loop.timestamps.values())
    assert last_submission - log.started_at < 1.5 + 0.2  # none after the duration, but the in-flight ones ended


# ---- the report ---------------------------------------------------------------------------------


def point_summary(time_scale: float, overheads_s: list[float], failed: int = 0) -> dict:
    profile = load_profile(PROFILE)
    job = default_job(profile)
    x = time_scale
    log, timestamps = JobLog(started_at=1000.0), {}
    for index, extra in enumerate(overheads_s):
        job_id = f"video_{x:g}_{index}"
        log.accepted(job_id, 1000.0)
        device = (job.seconds.text_encoder, 0.0, job.seconds.denoiser, 0.0, job.seconds.vae_decoder, 0.0)
        timestamps[job_id] = stamps(1000.0, extra / x, *(s / x for s in device))  # all the overhead in the pickup
        log.finished({"id": job_id, "status": "completed", "timestamps": timestamps[job_id]}, 0)
    for index in range(failed):
        job_id = f"failed_{x:g}_{index}"
        log.accepted(job_id, 1000.0)
        timestamps[job_id] = {"submitted_at": 1000.0, "failed_at": 1001.0}
        log.finished({"id": job_id, "status": "failed", "timestamps": timestamps[job_id]}, 0)
    overheads = {job_id: job_overhead(t, job.seconds, x) for job_id, t in timestamps.items()}
    return summarize_point(log, timestamps, overheads, job, profile=PROFILE, replicas=4, gpus=5, nodes=1,
                           time_scale=x, minutes=2.0, ended_at=2000.0, director_cpu=0.31, machine_cpu=0.8,
                           job_store="postgresql", store={"xact_commit": 1200, "tup_updated": 600})


def test_the_report_labels_the_run_simulated_and_says_which_points_stay_under_two_percent():
    job = default_job(load_profile(PROFILE))
    under = point_summary(4.0, [0.2, 0.3, 0.4])  # ~0.3 s over ~47.8 s: 0.6 %
    over = point_summary(16.0, [2.0, 3.0, 4.0], failed=1)  # ~3 s: 6 %
    assert under["under_budget"] and not over["under_budget"]
    assert under["equivalent_gpus"] == 16 and over["equivalent_gpus"] == 64
    assert over["completed"] == 3 and over["failed"] == 1
    assert over["overhead_share"]["p50"] == pytest.approx(3.0 / (job.seconds.total + 3.0), abs=1e-4)
    assert over["overhead_by_segment_s"]["pickup"]["p50"] == pytest.approx(3.0, abs=1e-3)
    # 3 jobs in the window: first submission -> the last end, uncompressed.
    end = 1000.0 + (4.0 + job.seconds.total) / 16.0
    assert over["window_s"] == pytest.approx((end - 1000.0) * 16.0, abs=0.1)
    assert over["jobs_per_min"] == pytest.approx(3 * 60.0 / over["window_s"], abs=0.01)
    assert over["job_store_per_completed_job"] == {"xact_commit": 400.0, "tup_updated": 200.0}

    text = render_ceiling([under, over], job, command="ditserve loadtest ceiling --simulate h100-wan2.1-1.3b",
                          minutes=2.0)
    assert text.startswith(f"# The control plane's ceiling — SIMULATED ({PROFILE}, time scales 4x, 16x)")
    assert "**SIMULATED accelerators" in text and "`ditserve loadtest ceiling --simulate h100-wan2.1-1.3b`" in text
    rows = [line for line in text.splitlines() if re.match(r"\| \d+x \| \d+ / \d+ / \d+ \|", line)]
    assert len(rows) == 2
    cells = [c.strip() for c in rows[1].strip("|").split("|")]
    assert cells[:6] == ["16x", "1 / 4 / 1", "64", f"{over['jobs_per_min']:g}", "3", "1"]
    assert cells[6] == f"{over['overhead_share']['p50'] * 100:.2f} %"
    assert cells[8:] == ["31 %", "80 %"]
    assert "Under the 2% budget (overhead p50): 4x (16 equivalent GPUs); over it: 16x (64 equivalent GPUs)." in text
    assert "pickup" in text and "xact_commit 400" in text


def test_machine_cpu_share_counts_every_core_and_leaves_out_idle_and_io_wait():
    Times = namedtuple("Times", "user nice system idle iowait irq softirq steal guest guest_nice")
    before = Times(100, 0, 50, 1000, 10, 0, 0, 0, 5, 0)
    after = Times(160, 0, 70, 1100, 30, 0, 0, 0, 25, 0)  # 80 busy (guest inside user), 120 idle or waiting
    assert machine_busy_share(before, after) == pytest.approx(80 / 200)


# ---- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--replicas", "0"], "--replicas must be at least 1"),
    (["--time-scales", "1,x"], "--time-scales: '1,x' is not a comma-separated list"),
    (["--time-scales", "0.5"], "--time-scales: Input should be greater than or equal to 1"),
    (["--minutes", "0"], "--minutes must be positive"),
    (["--job-store-url", "sqlite:///jobs.db"], "--job-store-url: give a Postgres server"),
    (["--nodes", "4", "--replicas", "2"], "gpus (3) is below nodes (4)"),
    (["--simulate", "no-such-profile"], "--simulate no-such-profile: no cost profile"),
])
def test_bad_arguments_are_refused_before_any_cluster_starts(tmp_path, capsys, args, message):
    code = cli_main(["loadtest", "ceiling", "--simulate", PROFILE, "--out", str(tmp_path / "out"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- a point's own Postgres database ----------------------------------------------------------


def test_each_point_gets_a_fresh_postgres_database_that_counts_its_writes_and_is_dropped():
    import sqlalchemy as sa
    from conftest import postgres_url

    from serving.jobs.store import JobStore

    server = postgres_url("the ceiling's database per point")
    database = FreshDatabase(server, "x4")
    database.create()
    try:
        store = JobStore(database.url)
        assert store.list(limit=10) == ([], False)  # fresh: no other run's jobs
        store.close()
        time.sleep(1.1)  # Postgres flushes a backend's counters at most once a second (and at its exit)
        assert database.stats()["xact_commit"] > 0
    finally:
        database.drop()
    with sa.create_engine(server).connect() as conn:
        names = conn.execute(sa.text("SELECT datname FROM pg_database")).scalars().all()
    assert database.name not in names

"""Usage: accelerator-seconds per job and per API key, failures included.

The ledger on both job-store backends (an ended job is entered once, in the transaction
that ends it, and stays when the job is deleted); GET /v1/usage on the Gateway's app alone
(a key sees its own, an operator's key every key's); and, on the live cluster, the seconds
the stages really measured: each video's `usage`, the key's sums, and the Prometheus counters.
"""

from __future__ import annotations

import time
import uuid

import pytest
import requests

from conftest import KEYS, wait_for
from live_api import DRIVER, config_for, live_api
from serving.auth import key_digest
from serving.jobs.records import JobRecord, JobStatus, new_job_id
from serving.jobs.store import JobStore


def queued(owner: str | None = "alice") -> JobRecord:
    now = time.time()
    spec = {"prompt": "a fox", "width": 64, "height": 64, "num_frames": 17, "fps": 16}
    return JobRecord(id=new_job_id(), created_at=now, status=JobStatus.QUEUED, model="tiny", spec=spec,
                     timestamps={"submitted_at": now}, owner=owner)


def run(store: JobStore, owner: str, status: JobStatus, used: tuple[float, float, float]) -> str:
    job_id = store.create(queued(owner))[0].id
    assert [j.id for j in store.claim(DRIVER, 60, 10)] == [job_id]
    store.update(job_id, DRIVER, used_text_encoder_seconds=used[0], used_denoiser_seconds=used[1])
    store.stamp(job_id, DRIVER, [f"{status.value}_at"], status=status, used_vae_decoder_seconds=used[2])
    return job_id


def test_every_ended_job_is_entered_once_and_outlives_its_deletion(store):
    done = run(store, "alice", JobStatus.COMPLETED, (0.5, 30.0, 2.0))
    run(store, "alice", JobStatus.FAILED, (0.5, 12.0, 0.0))
    cancelled = store.create(queued("alice"))[0].id
    store.request_cancel(cancelled)  # cancelled while queued: nothing used, still counted
    unfinished = store.create(queued("alice"))[0].id
    store.claim(DRIVER, 60, 10)
    store.update(unfinished, DRIVER, used_text_encoder_seconds=0.5, used_denoiser_seconds=4.0)
    store.tombstone(unfinished)  # deleted mid-run: what it used is spent
    store.tombstone(done)  # a finished job's deletion changes nothing in the ledger
    store.request_cancel(cancelled)
    run(store, "bob", JobStatus.COMPLETED, (1.0, 10.0, 1.0))

    [alice] = store.usage_by_key("alice")
    assert alice.jobs == {"completed": 1, "failed": 1, "cancelled": 1, "deleted": 1}
    assert alice.video_seconds == pytest.approx(1.0)  # 17 frames at 16 fps, of the completed job only
    seconds = alice.accelerator_seconds
    assert (seconds.text_encoder, seconds.denoiser, seconds.vae_decoder) == pytest.approx((1.5, 46.0, 2.0))
    assert alice.per_completed_video == pytest.approx(49.5)  # everything spent, one usable video

    everyone = store.usage_by_key(all_keys=True)
    assert [(k.key, k.completed) for k in everyone] == [("alice", 1), ("bob", 1)]
    assert store.usage_by_key("carol")[0].jobs == {} and store.usage_by_key("carol")[0].per_completed_video is None


def test_usage_counts_jobs_by_when_they_ended(store):
    before = time.time()
    run(store, "alice", JobStatus.COMPLETED, (0.1, 1.0, 0.1))
    after = time.time() + 0.001
    assert store.usage_by_key("alice", start=before)[0].completed == 1
    assert store.usage_by_key("alice", start=after)[0].completed == 0
    assert store.usage_by_key("alice", end=before)[0].completed == 0


OPS_KEY, ALICE_KEY = "dsk-ops-usage-0001", "dsk-alice-usage-0002"


def test_a_key_sees_its_own_usage_and_an_operator_every_keys(tmp_path):
    keys = f"[{{name: ops, sha256: {key_digest(OPS_KEY)}, operator: true}}, " \
           f"{{name: alice, sha256: {key_digest(ALICE_KEY)}}}]"
    with live_api(config_for(tmp_path, auth__enabled="true", auth__keys=keys)) as api:
        run(api.jobs.store, "alice", JobStatus.COMPLETED, (0.25, 8.0, 0.75))
        run(api.jobs.store, "ops", JobStatus.FAILED, (0.25, 3.0, 0.0))

        def usage(key, **params):
            return requests.get(f"{api.url}/v1/usage", params=params, headers={"Authorization": f"Bearer {key}"})

        mine = usage(ALICE_KEY).json()
        assert mine["object"] == "usage" and [k["key"] for k in mine["data"]] == ["alice"]
        [alice] = mine["data"]
        assert (alice["completed"], alice["failed"], alice["video_seconds"]) == (1, 0, 1.0)
        assert alice["accelerator_seconds"] == {"text_encoder": 0.25, "denoiser": 8.0, "vae_decoder": 0.75,
                                                "total": 9.0}
        assert alice["accelerator_seconds_per_completed_video"] == 9.0

        everyone = usage(OPS_KEY).json()["data"]
        assert [(k["key"], k["completed"], k["failed"]) for k in everyone] == [("alice", 1, 0), ("ops", 0, 1)]
        assert everyone[1]["accelerator_seconds_per_completed_video"] is None  # nothing usable yet

        assert usage(ALICE_KEY, start_time=time.time() + 60).json()["data"][0]["completed"] == 0
        empty = usage(ALICE_KEY, start_time=100, end_time=50)  # an empty period, not an error
        assert empty.status_code == 200 and empty.json()["data"][0]["completed"] == 0
        bad = usage(ALICE_KEY, start_time=-1)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "start_time"
        assert requests.get(f"{api.url}/v1/usage").status_code == 401


def test_the_stages_measured_usage_reaches_the_video_the_key_and_prometheus(service, secure):
    """Two videos by a key of its own on the live cluster: each video's usage is what the
    stages measured (every stage > 0: new prompts, as a cached prompt's encoding costs
    nothing), and the key's sums are exactly theirs."""
    app = secure[0]
    headers = {"Authorization": f"Bearer {KEYS['delta']}"}
    ids = []
    for seed in (1, 2):
        response = requests.post(f"{app.url}/v1/videos", headers=headers,
                                 json={"prompt": f"a green square, take {uuid.uuid4().hex}", "seconds": "1", "size": "64x64", "seed": seed,
                                       "num_inference_steps": 4})
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    videos = [wait_for(lambda i=i: (v := requests.get(f"{app.url}/v1/videos/{i}", headers=headers).json())
                       ["status"] in ("completed", "failed") and v, timeout=120) for i in ids]
    assert [v["status"] for v in videos] == ["completed", "completed"]
    for video in videos:
        usage = video["usage"]
        assert usage["text_encoder_seconds"] > 0 and usage["denoiser_seconds"] > 0 and usage["vae_decoder_seconds"] > 0
        assert usage["total_seconds"] == pytest.approx(usage["text_encoder_seconds"] + usage["denoiser_seconds"]
                                                       + usage["vae_decoder_seconds"], abs=1e-5)
    [delta] = requests.get(f"{app.url}/v1/usage", headers=headers).json()["data"]
    assert (delta["key"], delta["completed"], delta["failed"], delta["video_seconds"]) == ("delta", 2, 0, 2.0)
    spent = sum(v["usage"]["total_seconds"] for v in videos)
    assert delta["accelerator_seconds"]["total"] == pytest.approx(spent, abs=2e-3)
    assert delta["accelerator_seconds_per_completed_video"] == pytest.approx(spent / 2, abs=2e-3)

    def exported() -> float:
        text = requests.get(service.metrics_url).text  # the cluster's: both apps report there
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("ray_ditserve_usage_jobs") and 'key="delta"' in line
                   and 'ending="completed"' in line)

    wait_for(lambda: exported() >= 2.0, timeout=60, interval=1.0)  # Ray exports every few seconds
    assert exported() == 2.0


def test_the_ledger_takes_one_entry_per_job_whoever_writes_it(store):
    """Two enders racing (a Director's end and a delete, say) leave one entry: the database
    itself refuses the second (ON CONFLICT DO NOTHING), no error reaches the caller."""
    from serving.jobs.usage import record_usage

    job_id = run(store, "alice", JobStatus.COMPLETED, (0.1, 2.0, 0.1))
    job = store.get(job_id)
    with store.engine.begin() as conn:
        assert record_usage(conn, job) is False  # the completion already entered it
        assert record_usage(conn, job, "deleted") is False
    assert store.usage_by_key("alice")[0].jobs == {"completed": 1}

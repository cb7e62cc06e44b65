"""A gang as local processes (torch.multiprocessing, gloo on the CPU): what the correctness
tests and `ditserve bench parallel` run, without Ray. Rank 0 runs `work(pipeline, blocks)`
and returns its result; the other ranks follow its forwards until it dismisses them. In a
service the members are Ray actors instead (serving/parallel/workers.py); the gang is the same.
"""

from __future__ import annotations

import io
import socket
import time
from functools import partial
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from serving.config import ServiceConfig


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_gang(config: ServiceConfig, ulysses: int, cfg: int, work: Callable[[Any, Callable], Any],
             timeout_s: float = 600.0, policy: str = "split") -> Any:
    """Start ulysses x cfg processes, each loading `config`'s model (LocalPipeline), and
    return what `work(pipeline, blocks)` returned on rank 0. `policy` is the gang's layout
    policy (serving/parallel/layout.py): "split" runs every forward split, "by_load" lets the
    rows decide; rank 0's count of forwards per layout lands in `blocks.forwards`."""
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    port = free_port()
    members = [context.Process(target=_member, args=(rank, config, ulysses, cfg, port, work, results, policy), daemon=True)
               for rank in range(ulysses * cfg)]
    for m in members:
        m.start()
    try:
        # The result first (a child cannot exit while its result fills the pipe), then the exits.
        kind, value = _get(results, members, timeout_s)
        for m in members:
            m.join(timeout_s)
        failed = [(rank, m.exitcode) for rank, m in enumerate(members) if m.exitcode != 0]
        if kind == "error":
            raise RuntimeError(f"rank 0 failed: {value}")
        if failed:
            raise RuntimeError(f"gang members failed (rank, exit code): {failed}")
        return torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for m in members:
            if m.is_alive():
                m.kill()


def _get(results, members, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while results.empty():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gang gave no result in {timeout_s:.0f} s")
        if not members[0].is_alive():
            raise RuntimeError(f"rank 0 exited (code {members[0].exitcode}) without a result")
        time.sleep(0.05)
    return results.get()


def _member(rank: int, config: ServiceConfig, ulysses: int, cfg: int, port: int, work, results, policy: str) -> None:
    from serving.parallel.gang import Gang
    from serving.pipeline.local import LocalPipeline

    torch.set_num_threads(config.stages.denoiser.torch_threads)
    if config.model.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())  # one GPU per rank ("cuda" is the current one)
    pipeline = LocalPipeline(config)
    gang = Gang.form(ulysses, cfg, rank, "127.0.0.1", port, pipeline.transformer.device, policy=policy,
                     split_efficiency=config.stages.denoiser.parallel.split_efficiency)
    gang.install(pipeline.transformer, config.model.attention_backend)
    try:
        if rank == 0:
            try:
                buffer = io.BytesIO()  # bytes, not tensors: shared-memory handles die with this process
                blocks = partial(gang.lead, pipeline.transformer)
                blocks.forwards = gang.forwards  # live: what work() sees after its forwards
                torch.save(work(pipeline, blocks), buffer)
                results.put(("ok", buffer.getvalue()))
            except Exception as exc:
                results.put(("error", repr(exc)))
            gang.dismiss()
        else:
            while gang.follow(pipeline.transformer):
                pass
    finally:
        gang.leave()

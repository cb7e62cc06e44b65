"""The Ray side of a gang: a Denoiser replica whose Serve placement group holds one bundle
per rank (serving/app.py asks for them, packed on one node). The replica is rank 0 in
bundle 0; it starts one `GangWorker` actor in each other bundle, so Ray, not we, decides
where the gang's devices are and holds them for the replica's lifetime. The workers are the
replica's children: when the replica dies, Ray ends them with it.

A member that dies takes the replica with it (`GangLeader.blocks` exits the process; an idle
gang's loss is found by the replica's health check, `check_members`): to
Serve and the Director that is a dead replica like any other, so Serve starts a new one (and
a new gang) and the Director resumes its jobs from their checkpoints on another replica.
"""

from __future__ import annotations

import logging
import os

import ray
import torch

from serving.config import ServiceConfig
from serving.parallel.gang import Gang, GangError

logger = logging.getLogger("ray.serve")


@ray.remote
class GangWorker:
    """Rank 1..n of a Denoiser replica's gang: the whole DiT, running its share of each forward."""

    def __init__(self, config: ServiceConfig, rank: int):
        from serving.deployments._replica import prepare_replica
        from serving.models.loading import load_transformer

        prepare_replica(config.stages.denoiser)
        self.config, self.rank = config, rank
        self.transformer = load_transformer(config.model)
        self.gang: Gang | None = None

    def join(self, address: str, port: int, timeout_s: float) -> int:
        parallel = self.config.stages.denoiser.parallel
        self.gang = Gang.form(parallel.ulysses, parallel.cfg, self.rank, address, port, self.transformer.device,
                              timeout_s=timeout_s, policy=parallel.layout, split_efficiency=parallel.split_efficiency)
        self.gang.install(self.transformer, self.config.model.attention_backend)
        return os.getpid()

    def follow(self) -> None:
        """Take part in the leader's forward that is starting now."""
        self.gang.follow(self.transformer)

    def ping(self) -> int:
        return os.getpid()


class GangLeader:
    """Rank 0: the replica itself. `blocks` is what its engine runs the DiT's blocks through."""

    def __init__(self, config: ServiceConfig, transformer: torch.nn.Module, timeout_s: float):
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from serving.parallel.processes import free_port

        stage, parallel = config.stages.denoiser, config.stages.denoiser.parallel
        group = get_current_placement_group()
        if group is None:
            raise GangError("stages.denoiser.parallel needs the replica's placement group (serving/app.py sets it)")
        self.transformer, self.timeout_s = transformer, timeout_s
        self.workers = [
            GangWorker.options(
                num_cpus=stage.num_cpus, num_gpus=stage.num_gpus, resources=stage.resources,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=rank),
            ).remote(config, rank)
            for rank in range(1, parallel.degree)]
        address = ray.util.get_node_ip_address()
        port = free_port(address)
        joined = [w.join.remote(address, port, timeout_s) for w in self.workers]
        self.gang = Gang.form(parallel.ulysses, parallel.cfg, 0, address, port, transformer.device, timeout_s=timeout_s,
                              policy=parallel.layout, split_efficiency=parallel.split_efficiency)
        self.gang.install(transformer, config.model.attention_backend)
        self.pids = ray.get(joined, timeout=timeout_s)
        self.pings: list | None = None  # the last check_members' pings, one per worker
        logger.info("gang formed: ulysses %d x cfg %d, worker pids %s", parallel.ulysses, parallel.cfg, self.pids)

    def describe(self) -> dict:
        return {"ulysses": self.gang.ulysses, "cfg": self.gang.cfg, "ranks": self.gang.degree, "worker_pids": self.pids,
                "layout": self.gang.policy, "forwards": dict(self.gang.forwards)}

    def blocks(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
               image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        followed = [w.follow.remote() for w in self.workers]
        try:
            y = self.gang.lead(self.transformer, hidden_states, timestep, encoder_hidden_states, image_embeds)
            ray.get(followed, timeout=self.timeout_s)
            return y
        except Exception as exc:  # GangError, a dead worker (RayActorError), a timeout
            self._broken(exc)
            raise

    def check_members(self) -> None:
        """Raise GangError if a worker has died, between forwards too (the Denoiser's health
        check calls this, so Serve replaces an idle broken replica before a job finds it).
        Never waits: each call reads the answers to the previous call's pings and sends new
        ones once all are in (a worker inside a long forward answers after it)."""
        if self.pings is not None:
            ready, _ = ray.wait(self.pings, num_returns=len(self.pings), timeout=0)
            for rank, ping in enumerate(self.pings, start=1):
                if ping in ready:
                    try:
                        ray.get(ping)
                    except Exception as exc:  # RayActorError: the worker's process is gone
                        raise GangError(f"gang rank {rank} (pid {self.pids[rank - 1]}) is gone: "
                                        f"{type(exc).__name__}") from exc
            if len(ready) < len(self.pings):
                return
        self.pings = [w.ping.remote() for w in self.workers]

    def _broken(self, exc: BaseException) -> None:
        # No forward can run on this gang any more, and its collectives may be half done: end
        # the replica the way a lost GPU would, so its jobs resume elsewhere from checkpoints.
        logger.error("a member of this replica's gang failed (%s: %s); ending the replica so Serve replaces it",
                     type(exc).__name__, exc)
        os._exit(1)

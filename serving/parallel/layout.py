"""How one forward of a gang spreads its rows: the degree per request, chosen by load.

A gang of D = U x C devices can run a forward of R rows (a guided request is two rows) in
two ways:

- "split": every row across the gang (CFG groups take a share of the rows, Ulysses splits
  each row's tokens). One request finishes up to D times sooner, but the all-to-alls and
  smaller per-device kernels cost: the gang runs at `split_efficiency` of D devices (the
  published 4-GPU figure, 358 s -> 114 s, is 3.14 / 4 = 0.79; `ditserve bench parallel`
  measures yours).
- "rows": each device runs whole rows of its own (R / D each, no communication inside the
  blocks, one gather at the end): a batch of many requests runs as fast as D separate
  single-device replicas, each request at degree 1.

Low load leaves a replica with one or two requests: "split" gives them the gang's latency.
At peak the engine batches several requests per step: "rows" gives the gang's throughput,
where "split" would spend (1 - efficiency) of every device on communication. This is the
step-level choice TetriServe and GF-DiT argue for, made per forward from the rows at hand,
so it follows the load without a separate signal: each forward takes the layout whose
slowest device has the least work.
"""

from __future__ import annotations

import math
from typing import Literal

Layout = Literal["split", "rows"]


def split_work(rows: int, ulysses: int, cfg: int, split_efficiency: float) -> float:
    """The busiest device's work under "split", in single-device row-forwards."""
    return math.ceil(rows / cfg) / ulysses / split_efficiency


def rows_work(rows: int, degree: int) -> int:
    """The busiest device's work under "rows", in single-device row-forwards."""
    return math.ceil(rows / degree)


def choose_layout(rows: int, ulysses: int, cfg: int, policy: str = "by_load",
                  split_efficiency: float = 0.8) -> Layout:
    """The layout of one forward of `rows` rows (ties go to "rows": no communication)."""
    degree = ulysses * cfg
    if policy == "split" or degree == 1:
        return "split"
    return "rows" if rows_work(rows, degree) <= split_work(rows, ulysses, cfg, split_efficiency) else "split"

"""What the machine spent during a point of `ditserve loadtest ceiling` (loadtests/ceiling.py): the
CPU of the Director's process (as a share of one core) and of the whole machine (of all cores)."""

from __future__ import annotations

import time

DIRECTOR_PROCESS = "ServeReplica:ditserve:Director"  # Ray's title of the Director replica's process


class CpuMeter:
    """CPU seconds per wall second between `start()` and `stop()`: of the Director's process
    (among `root_pid`'s descendants: other clusters on this machine have Directors too), as a
    share of one core; and of the whole machine, as a share of all its cores."""

    def __init__(self, root_pid: int):
        import psutil

        self._psutil = psutil
        root = psutil.Process(root_pid)
        self.directors = [p for p in root.children(recursive=True) if _is_director(p)]
        self._started: tuple[float, float, object] | None = None

    def start(self) -> None:
        self._started = (time.monotonic(), self._director_seconds(), self._psutil.cpu_times())

    def stop(self) -> tuple[float | None, float]:
        wall = time.monotonic() - self._started[0]
        director = None
        if self.directors:
            director = (self._director_seconds() - self._started[1]) / wall
        return director, machine_busy_share(self._started[2], self._psutil.cpu_times())

    def _director_seconds(self) -> float:
        total = 0.0
        for process in self.directors:
            try:
                times = process.cpu_times()
            except self._psutil.Error:  # gone (restarted): what it spent before is lost
                continue
            total += times.user + times.system
        return total


def _is_director(process) -> bool:
    import psutil

    try:
        return DIRECTOR_PROCESS in " ".join(process.cmdline()) or DIRECTOR_PROCESS in process.name()
    except psutil.Error:
        return False


def machine_busy_share(before, after) -> float:
    """From two `psutil.cpu_times()`: the share of all cores' time not idle (nor waiting on I/O)."""
    spent = {name: getattr(after, name) - getattr(before, name) for name in after._fields}
    total = sum(spent.values()) - spent.get("guest", 0.0) - spent.get("guest_nice", 0.0)  # already in user/nice
    idle = spent["idle"] + spent.get("iowait", 0.0)
    return (total - idle) / total if total > 0 else 0.0

"""Fault injection for tests: named points in the code that an armed file makes misbehave.

Inert unless `DITSERVE_FAILPOINTS_DIR` is set (the test suite sets it; a deployment never
should). A point NAME is armed by writing the file `$DITSERVE_FAILPOINTS_DIR/NAME` with the
action inside: `hang` (the call blocks, as a stuck kernel would), `raise`, or `slow:S:N` (the
next N calls each take S seconds longer, as on a loaded device). The file is consumed when it
fires (a `slow` one once its N calls have fired), so exactly the calls asked for misbehave,
and a replica that is restarted afterwards does not trip over it again. This is how the tests make a stage
hang while its replica stays alive, a fault nothing outside the process can cause.
"""

from __future__ import annotations

import os
import time

ENV = "DITSERVE_FAILPOINTS_DIR"
HANG_SECONDS = 24 * 3600.0


class FailpointError(RuntimeError):
    """Raised by a point armed with `raise`."""


def arm(folder: str | os.PathLike, name: str, action: str) -> None:
    """Arm a point (what a test calls). Written whole, then renamed into place."""
    if action not in ("hang", "raise") and not _slow(action):
        raise ValueError(f"unknown failpoint action {action!r}; expected hang, raise or slow:SECONDS:CALLS")
    path = os.path.join(folder, name)
    with open(path + ".tmp", "w") as out:
        out.write(action)
    os.replace(path + ".tmp", path)


def hit(name: str) -> None:
    """Misbehave here if the point is armed; otherwise return at once."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    path = os.path.join(folder, name)
    try:
        with open(path) as armed:
            action = armed.read().strip()
        os.remove(path)  # only the caller whose remove succeeds fires
    except FileNotFoundError:
        return
    if action == "hang":
        time.sleep(HANG_SECONDS)
    slow = _slow(action)
    if slow is not None:
        seconds, calls = slow
        if calls > 1:  # the rest stay armed for the next callers
            arm(folder, name, f"slow:{seconds:g}:{calls - 1}")
        time.sleep(seconds)
        return
    raise FailpointError(f"failpoint {name} fired")


def _slow(action: str) -> tuple[float, int] | None:
    """`slow:S:N` -> (S, N); anything else -> None."""
    parts = action.split(":")
    if len(parts) != 3 or parts[0] != "slow":
        return None
    try:
        seconds, calls = float(parts[1]), int(parts[2])
    except ValueError:
        return None
    return (seconds, calls) if seconds >= 0 and calls >= 1 else None

"""Time compression: one function derives the config a simulated run uses from the one it was given.

`--time-scale X` makes a simulated hour pass in 60/X minutes. For the compressed run to behave
like the uncompressed one, every profile time (the stand-ins divide by X) and every period,
delay, target and timeout of the control plane must shrink by the same X, and every rate grow
by it. `scale_config` does that for the whole `ServiceConfig`, by field name, so a duration
added to the config later is compressed too:

- a field ending in `_seconds`, `_s` or `_ms` is divided by X (except `NOT_SERVICE_TIME`:
  video lengths, and webhook timing, which belongs to the receiver's real clock);
- a field ending in `_per_minute` is multiplied by X;
- a polling period is kept at or above `FLOORS` so 16+ replicas still fit on 2 cores, and the
  lease at or above its floor so CPU contention never looks like a dead Director; each
  floored field is reported as such.

Ray Serve's own autoscaling-metric push periods (10 s) are environment variables, returned
in `ray_env` for the cluster's processes. Ray 2.60 does not read them yet (its replicas and
handles push at the deployment's `metrics_interval_s`), so `build_app` passes the compressed
period there too (serving/app.py); before that, simulated runs pushed every 10 s of wall time. The returned `TimeScale` lists every change, so a
report can state the factor and convert any measured time back to uncompressed seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.config import ServiceConfig
from serving.cost_model import STAGE_NAMES

DURATION_SUFFIXES = ("_seconds", "_s", "_ms")
RATE_SUFFIX = "_per_minute"
NOT_SERVICE_TIME = {
    "generation.seconds", "generation.max_seconds",  # the length of the video asked for
    "webhooks.timeout_seconds", "webhooks.initial_backoff_seconds", "webhooks.max_backoff_seconds",
    "simulation.time_scale",
}
# Lowest compressed value (in the field's own unit) of periods the service polls at.
FLOORS = {
    "server.director_poll_seconds": 0.05,
    "server.event_poll_seconds": 0.1,
    "server.poll_after_ms": 50,
    "server.lease_seconds": 3.0,
}
# Ray Serve's periods that are environment variables, with their defaults (ray/serve/_private/constants.py).
RAY_SERVE_PERIODS = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": 10.0,
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": 10.0,
}
RAY_SERVE_FLOOR_S = 0.25
# A look-back must hold one of those pushes (serving/app.py refuses it otherwise), floored or not.
FLOORS.update({f"stages.{stage}.autoscaling.look_back_period_s": 2 * RAY_SERVE_FLOOR_S for stage in STAGE_NAMES})


@dataclass(frozen=True)
class Change:
    path: str
    unscaled: float
    scaled: float
    floored: bool = False


@dataclass
class TimeScale:
    factor: float
    changes: list[Change] = field(default_factory=list)
    ray_env: dict[str, str] = field(default_factory=dict)

    def uncompressed(self, seconds: float) -> float:
        """A time measured in the compressed run, in the seconds it stands for."""
        return seconds * self.factor

    def describe(self) -> list[str]:
        return [f"{c.path}: {c.unscaled:g} -> {c.scaled:g}" + (" (floor)" if c.floored else "")
                for c in self.changes]


def scale_config(config: ServiceConfig) -> tuple[ServiceConfig, TimeScale]:
    """The config a simulated run uses (compressed by `config.simulation.time_scale`) and what changed."""
    factor = config.simulation.time_scale if config.simulation is not None else 1.0
    scale = TimeScale(factor)
    if factor == 1.0:
        return config, scale
    data = config.model_dump()
    _walk(data, "", factor, scale.changes)
    for name, default in RAY_SERVE_PERIODS.items():
        value = max(default / factor, RAY_SERVE_FLOOR_S)
        scale.ray_env[name] = f"{value:g}"
        scale.changes.append(Change(f"env {name}", default, value, value == RAY_SERVE_FLOOR_S))
    return ServiceConfig.model_validate(data), scale


def _walk(node, path: str, factor: float, changes: list[Change]) -> None:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in list(items):
        here = f"{path}.{key}" if path else str(key)
        if isinstance(value, (dict, list)):
            _walk(value, here, factor, changes)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not isinstance(key, str):
            continue
        general = _general(here)
        if general in NOT_SERVICE_TIME:
            continue
        if key.endswith(DURATION_SUFFIXES):
            scaled = value / factor
        elif key.endswith(RATE_SUFFIX):
            scaled = value * factor
        else:
            continue
        floor = FLOORS.get(general)
        floored = floor is not None and scaled < floor
        scaled = max(scaled, floor) if floor is not None else scaled
        if isinstance(value, int):
            scaled = max(1, round(scaled))
        node[key] = scaled
        changes.append(Change(here, value, scaled, floored))


def _general(path: str) -> str:
    """'auth.keys.3.requests_per_minute' -> 'auth.keys.requests_per_minute' (list items share rules)."""
    return ".".join(part for part in path.split(".") if not part.isdigit())

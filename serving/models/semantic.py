"""Does a generated clip show what was asked? A pixel-level check for the `tiny` preset.

`judge` looks at decoded frames (uint8 (T, H, W, 3), as `decode` and
`LocalPipeline.generate(...).frames` return them): it estimates the plain background from
the frame borders, takes the pixels that differ from it, names the dominant one of the
synthetic palette's colours (serving/models/synthetic.py), and follows the centroid of the
pixels of that colour from the first frames to the last.

`held_out_score` runs the combinations held out of training (synthetic.HELD_OUT) through
`LocalPipeline` with the preset's default sampler settings and returns the fraction judged
correct (colour right AND motion right).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

import torch

from serving.models import synthetic

# A pixel is foreground when its RGB distance from the background is above this.
FOREGROUND_DISTANCE = 60.0
# ...and it counts as a palette colour when it is within this distance of that colour.
PALETTE_DISTANCE = 110.0
# The dominant colour needs at least this many pixels per frame on average (an object of
# the smallest training radius covers ~150).
MIN_PIXELS_PER_FRAME = 20.0
# Moving: the centroid travels at least MIN_TRAVEL px along the asked axis, the right way,
# and more along it than across it. Staying: it travels less than MAX_STAY px in all.
# (Training clips travel 22-32 px over the clip, or 0.)
MIN_TRAVEL = 8.0
MAX_STAY = 6.0
# Centroids are averaged over this many frames at each end of the clip.
END_FRAMES = 3


@dataclass(frozen=True)
class Judgement:
    colour: str  # asked
    direction: str  # asked
    dominant: str | None  # the dominant palette colour seen, None when there is no object
    displacement: tuple[float, float] | None  # (dx, dy) in pixels, x right and y down
    colour_ok: bool
    direction_ok: bool

    @property
    def ok(self) -> bool:
        return self.colour_ok and self.direction_ok


def _background(frames: torch.Tensor) -> torch.Tensor:
    border = torch.cat([frames[:, :2].reshape(-1, 3), frames[:, -2:].reshape(-1, 3),
                        frames[:, :, :2].reshape(-1, 3), frames[:, :, -2:].reshape(-1, 3)])
    return border.median(dim=0).values


def palette_labels(frames: torch.Tensor) -> torch.Tensor:
    """Per pixel: the index into synthetic.COLOURS of its colour, or -1 (background/other)."""
    frames = frames.float()
    background = _background(frames)
    palette = torch.tensor(list(synthetic.COLOURS.values()), dtype=torch.float32)  # (K, 3)
    foreground = (frames - background).norm(dim=-1) > FOREGROUND_DISTANCE
    distance = (frames.unsqueeze(-2) - palette).norm(dim=-1)  # (T, H, W, K)
    nearest, label = distance.min(dim=-1)
    return torch.where(foreground & (nearest < PALETTE_DISTANCE), label, torch.full_like(label, -1))


def judge(frames: torch.Tensor, colour: str, direction: str) -> Judgement:
    """Is the clip's dominant object colour `colour`, and does it move `direction`
    ("left", "right", "up", "down" or "staying")?"""
    if colour not in synthetic.COLOURS:
        raise ValueError(f"unknown colour {colour!r}; the palette is {list(synthetic.COLOURS)}")
    if direction not in synthetic.MOTION:
        raise ValueError(f"unknown direction {direction!r}; expected one of {list(synthetic.MOTION)}")
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (T, H, W, 3), found {tuple(frames.shape)}")
    names = list(synthetic.COLOURS)
    labels = palette_labels(frames)
    num_frames = frames.shape[0]
    counts = torch.stack([(labels == k).sum() for k in range(len(names))])
    if counts.max().item() < MIN_PIXELS_PER_FRAME * num_frames:
        return Judgement(colour, direction, None, None, False, False)
    dominant = names[int(counts.argmax())]
    mask = (labels == names.index(dominant)).float()  # (T, H, W)
    ys = torch.arange(frames.shape[1], dtype=torch.float32).view(1, -1, 1)
    xs = torch.arange(frames.shape[2], dtype=torch.float32).view(1, 1, -1)
    per_frame = mask.sum(dim=(1, 2))
    valid = per_frame >= 5
    cx = (mask * xs).sum(dim=(1, 2)) / per_frame.clamp(min=1)
    cy = (mask * ys).sum(dim=(1, 2)) / per_frame.clamp(min=1)
    first = [t for t in range(num_frames) if valid[t]][:END_FRAMES]
    last = [t for t in range(num_frames) if valid[t]][-END_FRAMES:]
    if not first or first[0] > num_frames // 4 or last[-1] < num_frames - 1 - num_frames // 4:
        # The object is missing at one end of the clip: no motion can be read.
        return Judgement(colour, direction, dominant, None, dominant == colour, False)
    dx = (cx[last].mean() - cx[first].mean()).item()
    dy = (cy[last].mean() - cy[first].mean()).item()
    mx, my = synthetic.MOTION[direction]
    if (mx, my) == (0, 0):
        direction_ok = (dx * dx + dy * dy) ** 0.5 < MAX_STAY
    else:
        along, across = dx * mx + dy * my, abs(dx * my) + abs(dy * mx)
        direction_ok = along >= MIN_TRAVEL and along > across
    return Judgement(colour, direction, dominant, (dx, dy), dominant == colour, direction_ok)


@dataclass(frozen=True)
class Score:
    correct: int
    total: int
    colour_correct: int
    direction_correct: int
    results: list[dict]

    @property
    def fraction(self) -> float:
        return self.correct / self.total if self.total else 0.0


def held_out_prompts(phrasings: Iterable[int] = (0,),
                     combos: Iterable[tuple[str, str, str]] | None = None) -> list[tuple[str, str, str, str]]:
    """(prompt, colour, shape, direction) for each held-out combination and phrasing."""
    combos = synthetic.held_out_combos() if combos is None else list(combos)
    return [(synthetic.caption(c, s, d, v), c, s, d) for c, s, d in combos for v in phrasings]


def score_pipeline(pipeline, prompts: list[tuple[str, str, str, str]], seeds: Iterable[int] = (0, 1, 2),
                   **spec_overrides) -> Score:
    """Generate every prompt at every seed with `pipeline` (a LocalPipeline) and judge it."""
    results = []
    for prompt, colour, shape, direction in prompts:
        for seed in seeds:
            spec = pipeline.spec(prompt, seed=seed, **spec_overrides)
            verdict = judge(pipeline.generate(spec).frames, colour, direction)
            results.append(dict(prompt=prompt, seed=seed, shape=shape, **asdict(verdict), ok=verdict.ok))
    return Score(
        correct=sum(r["ok"] for r in results), total=len(results),
        colour_correct=sum(r["colour_ok"] for r in results),
        direction_correct=sum(r["direction_ok"] for r in results), results=results,
    )


def held_out_score(environ: Mapping[str, str] | None = None, seeds: Iterable[int] = (0, 1, 2),
                   phrasings: Iterable[int] = (0,), **spec_overrides) -> Score:
    """Score the held-out prompts on the model that `environ` configures, e.g.
    {"DITSERVE_MODEL__PRESET": "tiny", "DITSERVE_MODEL__PATH": "serving/models/weights/tiny"};
    sampler settings are the preset's defaults unless overridden."""
    from serving.config import load_config
    from serving.pipeline.local import LocalPipeline

    config = load_config(None, environ=dict(environ or {"DITSERVE_MODEL__PRESET": "tiny"}))
    pipeline = LocalPipeline(config)
    return score_pipeline(pipeline, held_out_prompts(phrasings), seeds=seeds, **spec_overrides)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Held-out semantic score of a tiny model")
    parser.add_argument("--path", default=None, help="diffusers folder (default: the preset built in code)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--phrasings", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    environ = {"DITSERVE_MODEL__PRESET": args.preset, "DITSERVE_MODEL__DEVICE": "cpu"}
    if args.path:
        environ["DITSERVE_MODEL__PATH"] = args.path
    score = held_out_score(environ, seeds=args.seeds, phrasings=args.phrasings)
    if args.verbose:
        for r in score.results:
            print(f"{'ok  ' if r['ok'] else 'FAIL'} seed={r['seed']} {r['prompt']!r}: dominant={r['dominant']} "
                  f"displacement={r['displacement'] and tuple(round(v, 1) for v in r['displacement'])}")
    print(f"held-out score: {score.correct}/{score.total} = {score.fraction:.1%} "
          f"(colour {score.colour_correct}/{score.total}, motion {score.direction_correct}/{score.total})")


if __name__ == "__main__":
    main()

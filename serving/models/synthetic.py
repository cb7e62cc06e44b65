"""Synthetic captioned clips for training the `tiny` preset: one coloured shape moving on a
plain background, 64x64, 17 frames (the preset's default 1 s at 16 fps).

Everything is a pure function of a seed. A clip is described by a (colour, shape,
direction) combination; each combination has several phrasings of its caption. Some
combinations are held out of training on purpose (HELD_OUT) so the semantic score
(serving/models/semantic.py) measures whether the model composes words it has seen in
other combinations, rather than recalling training captions.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

SIZE = 64
NUM_FRAMES = 17

# Object colours (RGB). Kept far apart so a blurry tiny VAE still shows which one it is.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 200, 60),
    "blue": (45, 85, 235),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
}
# Plain, dark, neutral backgrounds: every object colour stands out on each of them, and a
# VAE this small reconstructs them without tinting (lighter grays came back tinted).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "dark gray": (32, 32, 32),
}
SHAPES = ("circle", "square", "triangle", "diamond")
DIRECTIONS = ("left", "right", "up", "down", "staying")

# Unit motion per direction in image coordinates (x to the right, y downwards).
MOTION: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "staying": (0, 0)}

# (colour, shape, direction) combinations never shown in training, in any phrasing. Every
# colour, shape and direction still appears in training in other combinations; each colour
# is held out with 2 or 3 directions and each direction with 2 or 3 colours.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "triangle", "left"),
    ("red", "square", "down"),
    ("green", "circle", "up"),
    ("green", "diamond", "right"),
    ("green", "square", "staying"),
    ("blue", "square", "left"),
    ("blue", "triangle", "staying"),
    ("yellow", "circle", "right"),
    ("yellow", "diamond", "down"),
    ("white", "triangle", "up"),
    ("white", "circle", "left"),
    ("red", "diamond", "staying"),
)

_DIRECTION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("moving left", "moves to the left", "going left", "slides left", "heading left"),
    "right": ("moving right", "moves to the right", "going right", "slides right", "heading right"),
    "up": ("moving up", "moves upward", "going up", "slides up", "heading up"),
    "down": ("moving down", "moves downward", "going down", "slides down", "heading down"),
    "staying": ("staying still", "stays in place", "not moving", "sits still", "standing still"),
}
# Each phrasing pairs a sentence pattern (an opening word and a connector before the
# direction phrase) with one of the direction phrases above.
_PATTERNS: tuple[tuple[str, str], ...] = (("a", ""), ("a", "that "), ("", ""), ("the", ""), ("one", ""))
NUM_PHRASINGS = len(_PATTERNS)


def caption(colour: str | None, shape: str | None, direction: str | None, variant: int = 0) -> str:
    """Phrasing `variant` (0..NUM_PHRASINGS-1) of a combination; variant 0 is the plain one,
    e.g. "a red circle moving right". An attribute given as None is left unsaid
    ("a red shape", "a circle moving right", "a shape moving up"), for train-tiny's
    optional partial captions."""
    i = variant % NUM_PHRASINGS
    opening, connector = _PATTERNS[i]
    motion = connector + _DIRECTION_WORDS[direction][i] if direction else None
    return " ".join(word for word in (opening, colour, shape or "shape", motion) if word)


def captions(colour: str, shape: str, direction: str) -> list[str]:
    return [caption(colour, shape, direction, v) for v in range(NUM_PHRASINGS)]


def all_combos() -> list[tuple[str, str, str]]:
    return list(itertools.product(COLOURS, SHAPES, DIRECTIONS))


def train_combos() -> list[tuple[str, str, str]]:
    held = set(HELD_OUT)
    return [c for c in all_combos() if c not in held]


def held_out_combos() -> list[tuple[str, str, str]]:
    return list(HELD_OUT)


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int, supersample: int = 3) -> torch.Tensor:
    """Coverage in [0, 1] of `shape` centred at (cx, cy) with radius r, anti-aliased."""
    n = size * supersample
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / supersample
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        half = 0.85 * r
        inside = (dx.abs() <= half) & (dy.abs() <= half)
    elif shape == "diamond":
        inside = dx.abs() + dy.abs() <= 1.2 * r
    elif shape == "triangle":  # pointing up: apex at the top, flat base at the bottom
        top, base = -r, 0.8 * r
        frac = (dy - top) / (base - top)  # 0 at the apex, 1 at the base
        inside = (dy >= top) & (dy <= base) & (dx.abs() <= frac * 1.0 * r)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.float().view(size, supersample, size, supersample).mean(dim=(1, 3))


@dataclass(frozen=True)
class Clip:
    colour: str
    shape: str
    direction: str
    frames: torch.Tensor  # (T, H, W, 3) uint8


def render_clip(colour: str, shape: str, direction: str, generator: torch.Generator,
                num_frames: int = NUM_FRAMES, size: int = SIZE) -> torch.Tensor:
    """One clip as uint8 (T, H, W, 3): random radius, start, travel, background and slight
    colour jitter, all drawn from `generator`."""

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    def jitter(rgb: tuple[int, int, int], amount: int) -> torch.Tensor:
        noise = (torch.rand(3, generator=generator) * 2 - 1) * amount
        return (torch.tensor(rgb, dtype=torch.float32) + noise).clamp(0, 255)

    r = uniform(7.0, 11.0)
    mx, my = MOTION[direction]
    travel = uniform(22.0, 32.0) if direction != "staying" else 0.0
    margin = r + 2.0
    # Start so that the whole path stays inside the frame.
    lo_x, hi_x = margin - min(0.0, mx * travel), size - margin - max(0.0, mx * travel)
    lo_y, hi_y = margin - min(0.0, my * travel), size - margin - max(0.0, my * travel)
    x0, y0 = uniform(lo_x, hi_x), uniform(lo_y, hi_y)
    background_names = list(BACKGROUNDS)
    background = jitter(BACKGROUNDS[background_names[int(torch.randint(len(background_names), (), generator=generator))]], 4)
    fg = jitter(COLOURS[colour], 12)
    frames = torch.empty(num_frames, size, size, 3)
    for t in range(num_frames):
        k = t / (num_frames - 1)
        alpha = _shape_mask(shape, x0 + mx * travel * k, y0 + my * travel * k, r, size).unsqueeze(-1)
        frames[t] = background * (1 - alpha) + fg * alpha
    return frames.round().to(torch.uint8)


def make_clips(count: int, seed: int, combos: list[tuple[str, str, str]] | None = None,
               num_frames: int = NUM_FRAMES, size: int = SIZE) -> list[Clip]:
    """`count` clips cycling through `combos` (default: the training combinations) in a
    seeded order, so every combination gets count/len(combos) clips give or take one."""
    combos = train_combos() if combos is None else combos
    generator = torch.Generator().manual_seed(seed)
    clips: list[Clip] = []
    while len(clips) < count:
        for i in torch.randperm(len(combos), generator=generator).tolist():
            if len(clips) == count:
                break
            c, s, d = combos[i]
            clips.append(Clip(c, s, d, render_clip(c, s, d, generator, num_frames, size)))
    return clips


def to_model_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (3, T, H, W) in [-1, 1], the VAE's input range."""
    return frames.permute(3, 0, 1, 2).float() / 127.5 - 1.0

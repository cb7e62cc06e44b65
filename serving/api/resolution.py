"""Hosted-API video sizes ("480p", "720p", "4K" and an aspect ratio) in the model's pixels.

A named resolution fixes the short side (480p: 480 lines) and the aspect ratio the long one,
rounded to the model's size multiple; where the preset's own size is of that class and
shape (Wan2.1's 832x480 for 480p at 16:9) that size is used, as the model was trained on
it. "WxH" passes through. What the model cannot make is refused by name, with the
resolutions that it can make at that aspect ratio and duration.
"""

from __future__ import annotations

import math
import re
from typing import Callable

from serving.config import parse_size
from serving.models.presets import Preset
from serving.pipeline.spec import SpecError

# Named resolution -> lines (the short side).
NAMED = {"360p": 360, "480p": 480, "540p": 540, "720p": 720, "1080p": 1080, "1440p": 1440, "2160p": 2160,
         "2k": 1440, "4k": 2160}
SHOWN = ("360p", "480p", "540p", "720p", "1080p", "1440p", "4K")  # offered in messages, in order
ASPECT = re.compile(r"^\s*([0-9]{1,3})\s*:\s*([0-9]{1,3})\s*$")
# How close the preset's own size must be to the asked shape to stand in for it.
SAME_SHAPE = 0.05


def aspect_of(text: str | None, preset: Preset) -> tuple[int, int]:
    """"16:9" as (16, 9); None: the preset's default size's shape."""
    if text is None:
        w, h = parse_size(preset.defaults.size)
    else:
        match = ASPECT.match(text)
        if not match or int(match.group(1)) == 0 or int(match.group(2)) == 0:
            raise SpecError("aspect_ratio", f"expected width:height such as \"16:9\", \"9:16\" or \"1:1\", "
                                            f"found {text!r}")
        w, h = int(match.group(1)), int(match.group(2))
    common = math.gcd(w, h)
    return w // common, h // common


def named_size(lines: int, aspect: tuple[int, int], preset: Preset) -> tuple[int, int]:
    """The WxH of a named resolution at an aspect ratio, for this preset."""
    w, h = aspect
    own_w, own_h = parse_size(preset.defaults.size)
    if min(own_w, own_h) == lines and (own_w >= own_h) == (w >= h) \
            and abs((own_w / own_h) / (w / h) - 1) <= SAME_SHAPE:
        return own_w, own_h
    m = preset.geometry.spatial_multiple
    long_side = max(m, round(lines * max(w, h) / min(w, h) / m) * m)
    return (long_side, lines) if w >= h else (lines, long_side)


def size_for(resolution: str | None, aspect_ratio: str | None, preset: Preset,
             fits: Callable[[str], bool]) -> str | None:
    """The "WxH" a task request asks for (None: the server's default size). `fits(size)` says
    whether the model makes that size for the rest of the request, to list what it can."""
    aspect = aspect_of(aspect_ratio, preset)
    if resolution is None:
        if aspect_ratio is None:
            return None
        lines = min(parse_size(preset.defaults.size))
        return "{}x{}".format(*named_size(lines, aspect, preset))
    lines = NAMED.get(resolution.strip().lower())
    if lines is None:
        try:
            width, height = parse_size(resolution)
        except ValueError:
            raise SpecError("resolution", f"expected one of {', '.join(SHOWN)} or WIDTHxHEIGHT, found {resolution!r}") \
                from None
        return f"{width}x{height}"
    size = "{}x{}".format(*named_size(lines, aspect, preset))
    if not fits(size):
        can = [f"{name} ({'{}x{}'.format(*named_size(NAMED[name.lower()], aspect, preset))})" for name in SHOWN
               if fits("{}x{}".format(*named_size(NAMED[name.lower()], aspect, preset)))]
        offer = f"at {aspect[0]}:{aspect[1]} it makes {', '.join(can)}" if can else \
            f"it makes none of the named resolutions at {aspect[0]}:{aspect[1]}"
        raise SpecError("resolution", f"{resolution} is {size}, which this model cannot make for this request; "
                                      f"{offer}, or WIDTHxHEIGHT in multiples of {preset.geometry.spatial_multiple} "
                                      f"(default {preset.defaults.size})")
    return size

"""A create request's first frame (`input_reference`), read and checked before the job exists.

The OpenAI SDK uploads it as a multipart file; JSON clients send `{"image_url": "data:..."}`.
Either way the bytes are untrusted: the size is checked as sent, the pixel count from the
header before anything is decoded (a small file can claim a huge canvas), the format and mode
against what the model can take, and the pixels are decoded whole, so a truncated file is
refused here rather than failing a job later. What is stored is a plain RGB PNG of the frame
(EXIF rotation applied, metadata dropped), the same bytes whatever the client sent.

A remote `image_url` (http/https) reaches here only as the bytes the Gateway fetched, where
the operator allows it (serving/api/image_fetch.py); as a URL it is refused with a way out.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from typing import Any

from serving.pipeline.spec import SpecError

FIELD = "input_reference"
FORMATS = ("PNG", "JPEG", "WEBP")  # the only decoders a client's bytes reach
# Modes Pillow converts to RGB without guessing (8-bit grey, palette, RGB, alpha, CMYK JPEGs).
MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}
DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?:;[\w-]+=[^;,]*)*(?P<base64>;base64)?,(?P<data>.*)$", re.S)


@dataclass(frozen=True)
class Upload:
    """A file part of a multipart body, as read (the body limit bounded it)."""

    data: bytes
    filename: str = ""
    content_type: str = ""


@dataclass(frozen=True)
class ReferenceImage:
    png: bytes  # the frame as an RGB PNG
    width: int
    height: int


def image_url_of(value: Any) -> Any:
    """The URL in a JSON input_reference, as clients spell it: {"image_url": URL},
    {"image_url": {"url": URL}} (as chat messages do), or URL alone; not checked here."""
    url = value.get("image_url") if isinstance(value, dict) else value
    return url.get("url") if isinstance(url, dict) else url


def reference_bytes(value: Any, max_bytes: int) -> bytes:
    """The image's bytes from what the client sent: an uploaded file, or {"image_url": a
    base64 data: URL} (a bare data: URL string too)."""
    if isinstance(value, Upload):
        data = value.data
    else:
        url = image_url_of(value)
        if not isinstance(url, str):
            raise SpecError(FIELD, 'expected an image file (multipart) or {"image_url": "data:image/png;base64,..."}')
        data = _from_data_url(url, max_bytes)
    if len(data) > max_bytes:
        raise SpecError(FIELD, f"the image is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise SpecError(FIELD, "the image is empty")
    return data


def _from_data_url(url: str, max_bytes: int) -> bytes:
    if url.lower().startswith(("http://", "https://")):
        raise SpecError(FIELD, "remote image URLs are not fetched by this server; send the image itself, as a "
                               "multipart file or a data: URL")
    found = DATA_URL.match(url[:200]) and DATA_URL.match(url)
    if not found or not found.group("base64"):
        raise SpecError(FIELD, "image_url must be a base64 data: URL (data:image/png;base64,...)")
    encoded = found.group("data")
    if len(encoded) > (max_bytes + 2) // 3 * 4 + 4:
        raise SpecError(FIELD, f"the image is over {max_bytes} bytes (the limit)")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise SpecError(FIELD, "image_url's base64 data is not valid base64") from None


def read_reference(data: bytes, max_pixels: int) -> ReferenceImage:
    """Check and normalize the image (SpecError naming `input_reference` for anything wrong)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # Only these three decoders ever see the bytes (not Pillow's dozens of others).
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
        except UnidentifiedImageError:
            raise SpecError(FIELD, "is not a PNG, JPEG or WebP image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise SpecError(FIELD, f"the image claims more pixels than the limit ({max_pixels})") from None
        with image:
            width, height = image.size
            if width * height > max_pixels:  # from the header: nothing decoded yet
                raise SpecError(FIELD, f"the image is {width}x{height} pixels; the limit is {max_pixels} pixels")
            if getattr(image, "n_frames", 1) > 1:
                raise SpecError(FIELD, "is an animated image; send a single still frame")
            if image.mode not in MODES:
                raise SpecError(FIELD, f"has pixel mode {image.mode} (e.g. 16-bit or floating point); send an 8-bit "
                                       "RGB or greyscale image")
            try:
                image.load()
                frame = ImageOps.exif_transpose(image).convert("RGB")
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
                raise SpecError(FIELD, f"the image data is truncated or corrupt ({exc})") from None
    out = io.BytesIO()
    frame.save(out, format="PNG")
    return ReferenceImage(png=out.getvalue(), width=frame.width, height=frame.height)

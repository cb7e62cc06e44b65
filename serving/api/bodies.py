"""Reading a create request's body (JSON, multipart or urlencoded form) into plain data.

The size limit is counted on the bytes as they arrive, so a chunked body (no
Content-Length) or a multipart upload is refused with 413 the moment it passes the limit,
never read whole into memory first. Bodies Python's own parsers cannot take (integers of
more digits than Python converts, nesting deeper than its recursion limit) are 400s.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser

from serving.api.errors import APIError
from serving.jobs.reference import Upload

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
MAX_FORM_FIELDS = 64  # the create body has a dozen fields; more is not a create request


async def read_create_body(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request's fields as a dict, or an APIError (413, 415 or 400) saying what is wrong."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(f"request body is {declared} bytes", max_bytes)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        raw = bytearray()
        async for chunk in limited_stream(request, max_bytes):
            raw += chunk
        return parse_json_object(bytes(raw))
    if content_type in FORM_TYPES:
        return await _read_form(request, content_type, max_bytes)
    found = content_type or "none"
    raise APIError(415, f"Content-Type must be application/json or multipart/form-data, found {found}",
                   code="unsupported_media_type")


async def limited_stream(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive; 413 as soon as their total passes `max_bytes`."""
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(f"request body passed {max_bytes} bytes before it ended", max_bytes)
        yield chunk


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding") from None
    except json.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                       code="invalid_json") from None
    except ValueError as exc:  # an integer literal past Python's digit limit (4300 by default)
        raise APIError(400, f"request body has a number too long to read: {exc}".split(";")[0],
                       code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply to read", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, found {type(data).__name__}", code="invalid_json")
    return data


async def _read_form(request: Request, content_type: str, max_bytes: int) -> dict[str, Any]:
    stream = limited_stream(request, max_bytes)
    try:
        if content_type == "multipart/form-data":
            parser = MultiPartParser(request.headers, stream, max_files=1, max_fields=MAX_FORM_FIELDS,
                                     max_part_size=max_bytes)
        else:
            parser = FormParser(request.headers, stream, max_fields=MAX_FORM_FIELDS, max_part_size=max_bytes)
        form = await parser.parse()
    except MultiPartException as exc:
        raise APIError(400, f"could not read the form body: {exc.message}", code="invalid_form") from None
    finally:
        await stream.aclose()
    data: dict[str, Any] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name == "input_reference":  # the first frame: read whole (the body limit bounds it)
                    data[name] = Upload(await value.read(), value.filename or "", value.content_type or "")
                    continue
                raise APIError(400, f"{name}: file uploads are not accepted here", param=name, code="invalid_value")
            data[name] = value
    finally:
        await form.close()  # an uploaded part may sit in a temporary file
    return data


def create_body_limit(config) -> int:
    """A create body's byte limit: room for a first frame (as a base64 data: URL at most a
    third larger) where the model takes one."""
    from serving.models.presets import PRESETS

    extra = config.server.max_image_bytes * 4 // 3 + 1024 if PRESETS[config.model.preset].takes_image else 0
    return config.server.max_body_bytes + extra


def _too_large(what: str, max_bytes: int) -> APIError:
    return APIError(413, f"{what}; the limit is {max_bytes}", code="body_too_large")

"""Errors of the Videos API: every one leaves in OpenAI's envelope
`{"error": {"message", "type", "param", "code"}}`, with the offending field in `param`, so a
client (or a person) knows what to fix."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.jobs.store import is_transient

logger = logging.getLogger("ray.serve")

UNAVAILABLE_RETRY_AFTER_SECONDS = 5


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure, ours or the framework's, into the envelope."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.type, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p not in ("query", "path", "body"))
        return error_response(400, f"{param}: {describe(first)}", param=param or None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        # The client gets a reference, never the error's text (it may hold hosts, paths or
        # URLs); the operator finds the traceback in the log under the same reference.
        reference = "req_" + secrets.token_hex(8)
        headers = {"x-request-id": reference}
        from serving.storage import ArtifactStoreError

        # The job database down past the store's own retries, or the file storage down (e.g.
        # storing an I2V job's frame): nothing about the request, so 503 and try again.
        down = "database" if is_transient(exc) else "file storage" if isinstance(exc, ArtifactStoreError) else None
        if down is not None:
            logger.warning("request %s: the service's %s is unavailable (%r)", reference, down, exc)
            headers["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER_SECONDS)
            return error_response(503, f"the service's {down} is unavailable; retry in "
                                       f"{UNAVAILABLE_RETRY_AFTER_SECONDS} s (reference {reference})",
                                  type="server_error", code="service_unavailable", headers=headers)
        logger.exception("request %s: unhandled error in the API", reference)
        return error_response(500, f"internal error; the server log has the details under {reference}",
                              type="server_error", code="internal_error", headers=headers)


def body_error(exc: ValidationError) -> APIError:
    """A request body that does not fit its model, named by its first bad field."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"])
    code = {"extra_forbidden": "unknown_parameter", "missing": "missing_required_parameter"}.get(first["type"],
                                                                                                 "invalid_value")
    return APIError(400, f"{param}: {describe(first)}", param=param, code=code)


_KIND = {"int_parsing": "an integer", "int_type": "an integer", "int_from_float": "a whole number",
         "float_parsing": "a number", "float_type": "a number", "string_type": "a string"}
_SHOWN_CHARS = 80  # of a bad value echoed back: enough to recognise it, not the whole body again


def describe(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown parameter"
    if kind == "missing":
        return "is required"
    if kind in _KIND:
        return f"expected {_KIND[kind]}, found {shown(error.get('input'))}"
    if kind == "value_error":  # our own validators' words, without pydantic's prefix
        return str(error["msg"]).removeprefix("Value error, ")
    return str(error["msg"])


def shown(value: Any) -> str:
    """A bad value as the error message shows it, cut short."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int past Python's digit limit, or deep nesting
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…"

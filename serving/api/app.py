"""FastAPI routes of the Videos API. Thin: parse, call `VideoJobs`, shape the answer.

Every error leaves in OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`
with the offending field in `param`, so a client (or a person) knows what to fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from typing import Any, Awaitable, Callable, Literal

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.admission import WaitEstimate
from serving.auth import ApiKeys, AuthError, Caller
from serving.api.schemas import CreateVideoBody, ErrorEnvelope, Video, VideoDeleted, VideoList, video_from_job
from serving.config import ServiceConfig
from serving.jobs.records import JobRecord
from serving.jobs.store import IdempotencyConflict
from serving.jobs.videos import NotReady, QuotaExceeded, VideoJobs
from serving.pipeline.spec import SpecError
from serving.policy import PolicyViolation

logger = logging.getLogger("ray.serve")

POLL_HEADER = "openai-poll-after-ms"
SSE_POLL_SECONDS = 0.1


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_api(config: ServiceConfig, jobs: VideoJobs,
               on_submitted: Callable[[str], Awaitable[Any]] | None = None,
               stages_ready: Callable[[], Awaitable[dict[str, bool]]] | None = None,
               estimate: Callable[[], Awaitable[WaitEstimate | None]] | None = None,
               on_rejected: Callable[[str], None] | None = None) -> FastAPI:
    """The Videos API over `jobs`. The callables connect it to the rest of the service
    (the Director's wake-up, readiness and wait estimate; the rejection metric) without
    the HTTP layer knowing what is behind them."""
    keys = ApiKeys(config.auth)
    errors = {400: {"model": ErrorEnvelope, "description": "Bad input; `error.param` names the field."}}
    if keys.enabled:
        errors[401] = {"model": ErrorEnvelope, "description": "Missing or unknown API key."}
        errors[429] = {"model": ErrorEnvelope, "description": "Over the key's rate or job quota; see Retry-After."}
    app = FastAPI(title="ditserve", version="0.1.0",
                  description="OpenAI-compatible Videos API for self-hosted text-to-video models.")
    poll_ms = str(config.server.poll_after_ms)
    not_found_doc = {404: {"model": ErrorEnvelope, "description": "No such video (or not this key's)."}}

    if keys.enabled:
        async def caller(request: Request, _: Any = Security(HTTPBearer(auto_error=False))) -> Caller | None:
            try:
                who = keys.authenticate(request.headers.get("authorization"))
            except AuthError as exc:
                raise APIError(401, str(exc), code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}) from None
            wait = keys.retry_after(who)
            if wait is not None:
                raise APIError(429, f"this API key is over its rate of {who.requests_per_minute} requests per minute; "
                                    f"retry in {wait} s", type="rate_limit_error", code="rate_limit_exceeded",
                               headers={"Retry-After": str(wait)})
            return who
    else:
        async def caller() -> Caller | None:
            return None

    def owner_of(who: Caller | None) -> str | None:
        return who.name if who is not None else None

    # One create at a time per key in this replica, so two racing creates cannot both pass
    # the concurrent-job quota.
    quota_locks: dict[str, asyncio.Lock] = {}

    def quota_lock(who: Caller | None):
        if who is None:
            return contextlib.nullcontext()
        return quota_locks.setdefault(who.name, asyncio.Lock())

    async def quota_retry_after() -> int:
        """When the work running now should be done, freeing a slot (1 s to 10 min)."""
        wait = await current_estimate()
        seconds = wait.start_in(0) if wait is not None else config.server.poll_after_ms / 1000
        return min(600, max(1, math.ceil(seconds)))

    def not_found(video_id: str) -> APIError:
        return APIError(404, f"no video with id {video_id!r}", param="video_id", code="video_not_found")

    async def current_estimate() -> WaitEstimate | None:
        try:
            return await estimate() if estimate is not None else None
        except Exception:  # an estimate is advice; its absence must not fail a request
            logger.exception("wait estimate unavailable")
            return None

    async def shaped(job: JobRecord) -> Video:
        ahead = await asyncio.to_thread(jobs.queue_ahead, job)
        if ahead is None:
            return video_from_job(job)
        position, steps_ahead = ahead
        wait = await current_estimate()
        start = time.time() + wait.start_in(steps_ahead) if wait is not None else None
        return video_from_job(job, queue_position=position, estimated_start_at=start)

    # ---- errors -------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.type, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p not in ("query", "path", "body"))
        return error_response(400, f"{param}: {_describe(first)}", param=param or None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        logger.exception("unhandled error in the API")
        return error_response(500, "internal error; the server log has the details", type="server_error",
                              code="internal_error")

    # ---- videos ---------------------------------------------------------------------------

    create_responses = {**errors, 409: {"model": ErrorEnvelope, "description": "Idempotency-Key reused."},
                        413: {"model": ErrorEnvelope}, 415: {"model": ErrorEnvelope},
                        429: {"model": ErrorEnvelope, "description": "Queue full or over a limit; see Retry-After."}}
    body_schema = request_body_schema(config)

    @app.post("/v1/videos", response_model=Video, responses=create_responses, openapi_extra={"requestBody": {
        "required": True,
        "content": {"application/json": {"schema": body_schema}, "multipart/form-data": {"schema": body_schema}}}})
    async def create_video(request: Request, who: Caller | None = Depends(caller)):
        data = await _read_body(request, config.server.max_body_bytes)
        try:
            body = CreateVideoBody.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            raise APIError(400, f"{param}: {_describe(first)}", param=param, code=_code(first)) from None
        if body.input_reference is not None:
            raise APIError(400, "input_reference is not supported: this server generates video from text only",
                           param="input_reference", code="unsupported_parameter")
        max_wait = config.admission.max_queue_wait_seconds
        wait = await current_estimate() if max_wait is not None else None
        if wait is not None and wait.wait_seconds > max_wait:
            if on_rejected is not None:
                on_rejected("queue_wait")
            retry = wait.retry_after(max_wait)
            raise APIError(429, f"the queue is full: a new job would wait about {wait.wait_seconds:.0f} s to start, "
                                f"over this server's limit of {max_wait:.0f} s; retry in {retry} s",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry)})
        key = request.headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= 255:
            raise APIError(400, "Idempotency-Key must be 1 to 255 characters", param="Idempotency-Key")
        try:
            async with quota_lock(who):
                job, created = await asyncio.to_thread(
                    jobs.submit, body.model_dump(exclude={"input_reference"}), key, owner_of(who),
                    who.max_concurrent_jobs if who is not None else None)
        except QuotaExceeded as exc:
            retry = await quota_retry_after()
            raise APIError(429, f"{exc}; retry in {retry} s, or cancel one", type="rate_limit_error",
                           code="concurrent_jobs_exceeded", headers={"Retry-After": str(retry)}) from None
        except SpecError as exc:
            raise APIError(400, f"{exc.field}: {exc.message}", param=exc.field, code="invalid_value") from None
        except PolicyViolation as exc:
            raise APIError(400, str(exc), param=exc.violation.field, code="content_policy_violation") from None
        except IdempotencyConflict:
            raise APIError(409, "this Idempotency-Key was already used with a different request body",
                           param="Idempotency-Key", code="idempotency_key_reused") from None
        if created and on_submitted is not None:
            await on_submitted(job.id)
        headers = {POLL_HEADER: poll_ms}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse((await shaped(job)).model_dump(mode="json"), headers=headers)

    @app.get("/v1/videos", response_model=VideoList, responses={**errors, **not_found_doc})
    async def list_videos(after: str | None = Query(default=None, pattern=r"^video_[0-9a-f]{32}$",
                                                    description="A video id: the page starts after it."),
                          limit: int = Query(default=20, ge=1, le=100),
                          order: Literal["asc", "desc"] = "desc", who: Caller | None = Depends(caller)):
        if after is not None and not await asyncio.to_thread(jobs.is_cursor, after, owner_of(who)):
            raise APIError(404, f"after: no video with id {after!r}", param="after", code="video_not_found")
        records, has_more = await asyncio.to_thread(jobs.list, after, limit, order, owner_of(who))
        data = [video_from_job(job) for job in records]
        return VideoList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                         has_more=has_more)

    @app.get("/v1/videos/{video_id}", response_model=Video, responses={**errors, **not_found_doc})
    async def retrieve_video(video_id: str, who: Caller | None = Depends(caller)):
        job = await asyncio.to_thread(jobs.get, video_id, owner_of(who))
        if job is None:
            raise not_found(video_id)
        headers = {} if job.status.terminal else {POLL_HEADER: poll_ms}
        video = await shaped(job)
        return JSONResponse(video.model_dump(mode="json"), headers=headers)

    pending = {202: {"model": VideoDeleted, "description": "Deleted; some files are removed in the background."}}

    @app.delete("/v1/videos/{video_id}", response_model=VideoDeleted, responses={**errors, **not_found_doc, **pending})
    async def delete_video(video_id: str, who: Caller | None = Depends(caller)):
        files_gone = await asyncio.to_thread(jobs.delete, video_id, owner_of(who))
        if files_gone is None:
            raise not_found(video_id)
        return JSONResponse(VideoDeleted(id=video_id).model_dump(mode="json"), status_code=200 if files_gone else 202)

    @app.post("/v1/videos/{video_id}/cancel", response_model=Video, responses={**errors, **not_found_doc})
    async def cancel_video(video_id: str, who: Caller | None = Depends(caller)):
        job = await asyncio.to_thread(jobs.cancel, video_id, owner_of(who))
        if job is None:
            raise not_found(video_id)
        return await shaped(job)

    media = {"video/mp4": {}, "image/webp": {}}
    content_responses = {**errors, **not_found_doc,
                         200: {"content": media, "description": "The MP4 (or WebP thumbnail)."},
                         206: {"content": media, "description": "The requested byte range."},
                         409: {"model": ErrorEnvelope, "description": "The video is not completed yet."},
                         416: {"model": ErrorEnvelope, "description": "Range not satisfiable."}}

    @app.get("/v1/videos/{video_id}/content", response_class=Response, responses=content_responses)
    async def download_content(request: Request, video_id: str,
                               variant: Literal["video", "thumbnail"] = "video",
                               who: Caller | None = Depends(caller)):
        try:
            found = await asyncio.to_thread(jobs.content_key, video_id, variant, owner_of(who))
        except NotReady as exc:
            raise APIError(409, str(exc), param="video_id", code="video_not_ready") from None
        if found is None:
            raise not_found(video_id)
        key, media_type = found
        size = await asyncio.to_thread(jobs.artifacts.size, key)
        span = _parse_range(request.headers.get("range"), size)
        headers = {"Accept-Ranges": "bytes", "Content-Disposition": f'inline; filename="{video_id}.{key.rsplit(".", 1)[-1]}"'}
        if span is None:
            data = await asyncio.to_thread(jobs.artifacts.read, key)
            return Response(data, media_type=media_type, headers=headers)
        start, end = span
        data = await asyncio.to_thread(jobs.artifacts.read, key, start, end + 1)
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return Response(data, status_code=206, media_type=media_type, headers=headers)

    @app.get("/v1/videos/{video_id}/events", response_class=StreamingResponse,
             responses={**errors, **not_found_doc, 200: {"content": {"text/event-stream": {}},
                                                         "description": "Server-sent events."}})
    async def stream_events(video_id: str, who: Caller | None = Depends(caller)):
        """Server-sent events: the video object on every change, until it is finished."""
        owner = owner_of(who)
        job = await asyncio.to_thread(jobs.get, video_id, owner)
        if job is None:
            raise not_found(video_id)

        async def events():
            last = None
            current = job
            while True:
                state = (current.status, current.stage, current.progress)
                if state != last:
                    last = state
                    video = await shaped(current)
                    name = f"video.{video.status}" if current.status.terminal else "video.progress"
                    yield f"event: {name}\ndata: {video.model_dump_json()}\n\n"
                    if current.status.terminal:
                        return
                await asyncio.sleep(SSE_POLL_SECONDS)
                current = await asyncio.to_thread(jobs.get, video_id, owner)
                if current is None:
                    yield f"event: video.deleted\ndata: {json.dumps({'id': video_id})}\n\n"
                    return

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- health -------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        checks: dict[str, bool] = {}
        try:
            await asyncio.to_thread(jobs.ping)
            checks["storage"] = True
        except Exception:
            checks["storage"] = False
        if stages_ready is not None:
            try:
                checks.update(await asyncio.wait_for(stages_ready(), timeout=10))
            except Exception:
                checks["stages"] = False
        ready = all(checks.values())
        return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                            status_code=200 if ready else 503)

    return app


def request_body_schema(config: ServiceConfig) -> dict[str, Any]:
    """CreateVideoBody's JSON schema plus the limits `build_spec` enforces from the config, so
    the OpenAPI document tells clients (and schemathesis) the truth. Rules that span fields
    (size multiples, seconds x fps, pixel budget) stay in the error messages."""
    schema = CreateVideoBody.model_json_schema()
    g = config.generation
    limits = {
        "prompt": {"minLength": 1, "maxLength": g.max_prompt_chars},
        "model": {"enum": sorted({config.server.model_name or config.model.preset, config.model.preset})},
        "negative_prompt": {"maxLength": g.max_prompt_chars},
        "size": {"pattern": r"^[0-9]+x[0-9]+$"},
        "num_inference_steps": {"minimum": 1, "maximum": g.max_steps},
        "guidance_scale": {"minimum": 0, "maximum": 50},
        "fps": {"minimum": 1, "maximum": 120},
        "seed": {"minimum": 0, "maximum": 2**63 - 1},
        "priority": {"minimum": -100, "maximum": 100},
        "webhook_url": {"maxLength": 2048},
    }
    for name, rules in limits.items():
        field = schema["properties"][name]
        for option in field.get("anyOf", [field]):
            if option.get("type") in ("string", "integer", "number"):
                option.update({k: v for k, v in rules.items()
                               if option["type"] == "string" or k in ("minimum", "maximum")})
    # Image-to-video is not served: the field exists only so the SDK's requests parse.
    schema["properties"]["input_reference"] = {"type": "null", "description": "Not supported (text-to-video only)."}
    schema["properties"]["seconds"]["anyOf"] = [{"type": "number", "exclusiveMinimum": 0,
                                                 "maximum": g.max_seconds},
                                                {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                                {"type": "null"}]
    return schema


async def _read_body(request: Request, max_bytes: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body is {declared} bytes; the limit is {max_bytes}", code="body_too_large")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        raw = await request.body()
        if len(raw) > max_bytes:
            raise APIError(413, f"request body is {len(raw)} bytes; the limit is {max_bytes}", code="body_too_large")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding") from None
        except json.JSONDecodeError as exc:
            raise APIError(400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                           code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, f"request body must be a JSON object, found {type(data).__name__}", code="invalid_json")
        return data
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_part_size=max_bytes)
        except Exception as exc:
            raise APIError(400, f"could not read the form body: {exc}", code="invalid_form") from None
        data: dict[str, Any] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name == "input_reference":
                    data[name] = value.filename or "upload"
                    continue
                raise APIError(400, f"{name}: file uploads are not accepted here", param=name, code="invalid_value")
            data[name] = value
        return data
    found = content_type or "none"
    raise APIError(415, f"Content-Type must be application/json or multipart/form-data, found {found}",
                   code="unsupported_media_type")


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """An inclusive byte span from a single-range `Range` header, or None for the whole file."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec or "-" not in spec:
        raise _unsatisfiable(size)
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":  # the last N bytes
            start, end = max(0, size - int(last)), size - 1
        else:
            start, end = int(first), (int(last) if last else size - 1)
    except ValueError:
        raise _unsatisfiable(size) from None
    end = min(end, size - 1)
    if start > end or start >= size:
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> APIError:
    return APIError(416, f"Range not satisfiable; the file has {size} bytes", param="Range",
                    code="range_not_satisfiable", headers={"Content-Range": f"bytes */{size}"})


_KIND = {"int_parsing": "an integer", "int_type": "an integer", "int_from_float": "a whole number",
         "float_parsing": "a number", "float_type": "a number", "string_type": "a string"}


def _describe(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown parameter"
    if kind == "missing":
        return "is required"
    if kind in _KIND:
        return f"expected {_KIND[kind]}, found {error.get('input')!r}"
    return str(error["msg"])


def _code(error: dict[str, Any]) -> str:
    return {"extra_forbidden": "unknown_parameter", "missing": "missing_required_parameter"}.get(error["type"],
                                                                                                 "invalid_value")

"""The API's own description: where /docs, /redoc and /openapi.json are served (if at all),
and the create bodies' schemas with the limits the config sets.

The create routes read their bodies themselves (JSON or form, size-limited as it arrives:
serving/api/bodies.py), so FastAPI cannot see them: `describe` adds each one's schema to
the document, and drops the key scheme when auth is off."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from serving.api.schemas import CreateVideoBody
from serving.config import ServiceConfig

LANGUAGE = {"maxLength": 35, "pattern": r"^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8}){0,4}$"}


def describe(app: FastAPI, config: ServiceConfig) -> None:
    """Make `app.openapi()` tell the truth about bodies and keys (built once, on first use)."""
    from serving.api.tasks import CreateTaskBody

    build = app.openapi
    video_body = request_body_schema(config)
    task_body = task_body_schema(config, CreateTaskBody.model_json_schema())
    bodies = {("/v1/videos", "post"): (video_body, True), ("/v1/videos/sync", "post"): (video_body, True),
              ("/v1/videos/generations", "post"): (task_body, True)}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for (path, method), (body, forms) in bodies.items():
            operation = schema["paths"].get(path, {}).get(method)
            if operation is None:
                continue
            content = {"application/json": {"schema": body}}
            if forms:
                content["multipart/form-data"] = {"schema": body}
            operation["requestBody"] = {"required": True, "content": content}
        if not config.auth.enabled:
            schema.get("components", {}).pop("securitySchemes", None)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.pop("security", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def task_body_schema(config: ServiceConfig, schema: dict[str, Any]) -> dict[str, Any]:
    """CreateTaskBody's JSON schema with the config's limits (as `request_body_schema`)."""
    g = config.generation
    limits = {"prompt": {"minLength": 1, "maxLength": g.max_prompt_chars},
              "negative_prompt": {"maxLength": g.max_prompt_chars},
              "model": {"enum": model_names(config)},
              "seed": {"minimum": 0, "maximum": 2**63 - 1}, "language": LANGUAGE,
              "callback_url": {"maxLength": 2048}, "aspect_ratio": {"pattern": r"^[1-9][0-9]{0,2}:[1-9][0-9]{0,2}$"},
              "resolution": {"pattern": r"^([0-9]{1,5}x[0-9]{1,5}|[0-9]{3,4}[pP]|[24][kK])$"}}
    apply_limits(schema, limits)
    schema["properties"]["duration"]["anyOf"] = [{"type": "number", "exclusiveMinimum": 0, "maximum": g.max_seconds},
                                                 {"type": "null"}]
    return schema


def model_names(config: ServiceConfig) -> list[str]:
    """What `model` may say: the served name, the preset, or "" (the one served, as omitted)."""
    return sorted({"", config.server.model_name or config.model.preset, config.model.preset})


def docs_urls(config: ServiceConfig) -> dict[str, str | None]:
    """FastAPI's docs arguments. With auth on the docs are closed unless the operator opens
    them: they map every route and limit, which is for the operator to publish."""
    mode = config.server.api_docs
    public = mode == "public" or (mode == "auto" and not config.auth.enabled)
    if public:
        return {"docs_url": "/docs", "redoc_url": "/redoc", "openapi_url": "/openapi.json"}
    return {"docs_url": None, "redoc_url": None, "openapi_url": None}


def request_body_schema(config: ServiceConfig) -> dict[str, Any]:
    """CreateVideoBody's JSON schema plus the limits `build_spec` enforces from the config, so
    the OpenAPI document tells clients (and schemathesis) the truth. Rules that span fields
    (size multiples, seconds x fps, pixel and cost budgets) stay in the error messages."""
    schema = CreateVideoBody.model_json_schema()
    g = config.generation
    limits = {
        "prompt": {"minLength": 1, "maxLength": g.max_prompt_chars},
        "model": {"enum": model_names(config)},
        "negative_prompt": {"maxLength": g.max_prompt_chars},
        "size": {"pattern": r"^[0-9]+x[0-9]+$"},
        "num_inference_steps": {"minimum": 1, "maximum": g.max_steps},
        "guidance_scale": {"minimum": 0, "maximum": 50},
        "fps": {"minimum": 1, "maximum": 120},
        "seed": {"minimum": 0, "maximum": 2**63 - 1},
        "priority": {"minimum": -100, "maximum": 100},
        "webhook_url": {"maxLength": 2048},
        "language": LANGUAGE,
        "cache": {"minimum": 0, "maxLength": 16},
        "width": {"minimum": 16, "maximum": 8192}, "height": {"minimum": 16, "maximum": 8192},
        "num_frames": {"minimum": 5, "maximum": 1201},
    }
    apply_limits(schema, limits)
    # The first frame: JSON carries it as a base64 data: URL (multipart, as the SDK sends it, as a
    # file part); only an image-to-video preset takes it, and then requires it.
    from serving.models.presets import PRESETS

    if PRESETS[config.model.preset].takes_image:
        schema["properties"]["input_reference"] = {
            "type": "object", "required": ["image_url"], "description": "The first frame: PNG, JPEG or WebP, at "
            f"most {config.server.max_image_bytes} bytes and {config.server.max_image_pixels} pixels.",
            "properties": {"image_url": {"type": "string", "pattern": (
                "^(data:image/[a-z]+;base64,|https?://)" if config.server.fetch_image_urls
                else "^data:image/[a-z]+;base64,")}}}
        schema.setdefault("required", []).append("input_reference")
    else:
        schema["properties"]["input_reference"] = {"type": "null", "description": "Text-to-video model: no image."}
    schema["properties"]["seconds"]["anyOf"] = [{"type": "number", "exclusiveMinimum": 0,
                                                 "maximum": g.max_seconds},
                                                {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                                {"type": "null"}]
    return schema


def apply_limits(schema: dict[str, Any], limits: dict[str, dict[str, Any]]) -> None:
    """Add each field's limits to its JSON schema (and to each typed option of an anyOf):
    string rules to strings, minimum and maximum to numbers."""
    for name, rules in limits.items():
        field = schema["properties"][name]
        for option in field.get("anyOf", [field]):
            if option.get("type") in ("string", "integer", "number"):
                option.update({k: v for k, v in rules.items()
                               if option["type"] == "string" or k in ("minimum", "maximum")})

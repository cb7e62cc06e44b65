"""The API's own description: where /docs, /redoc and /openapi.json are served (if at all),
and the create body's schema with the limits the config sets."""

from __future__ import annotations

from typing import Any

from serving.api.schemas import CreateVideoBody
from serving.config import ServiceConfig


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

"""GET /v1/models: the model this service serves, as OpenAI lists models (benchmark clients,
TensorRT-LLM's among them, read the id from here to name their requests)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from serving.api.context import APIContext, caller, context
from serving.auth import Caller

router = APIRouter(tags=["models"])


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "ditserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


@router.get("/v1/models", response_model=ModelList)
async def list_models(ctx: APIContext = Depends(context), _: Caller | None = Depends(caller)):
    return ModelList(data=[Model(id=ctx.jobs.model_name)])

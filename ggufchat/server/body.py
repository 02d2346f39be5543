"""Request bodies, parsed and validated off the event loop when they are big.

FastAPI parses and validates a declared body on the event loop before the route runs, and a body near
the size limit held every other client (and /health) for a large part of a second (the measurements:
docs/benchmarks.md, costs behind design choices). So the routes that take a body
read it themselves with `await parse(request, Model, srv.pool)`: a small body is parsed in place (a hop
to a thread would cost more than the parse), a big one on the server's preparation threads. Their
OpenAPI entry still names the model (`openapi_extra=documented(Model)`, and `add_schemas` puts the
models into the document's components), so /docs and schema-driven clients see no difference.
"""

from __future__ import annotations

import email.message
import json
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException
from starlette.requests import Request

from ggufchat.errors import InvalidParameter

M = TypeVar("M", bound=BaseModel)

INLINE_BYTES = 32 * 1024  # about a millisecond of parsing: cheaper in place than a hop to a thread
_REF = "#/components/schemas/{model}"

if TYPE_CHECKING:
    from ggufchat.server.pool import ModelPool


def documented(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for a route that parses `model` itself."""
    ref = {"$ref": _REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def add_schemas(openapi: dict[str, Any], models: list[type[BaseModel]]) -> None:
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    openapi.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


async def parse(request: Request, model: type[M], pool: ModelPool, *,
                max_items: dict[str, int] | None = None) -> M:
    """The body as `model`. `max_items`: top-level list fields and their longest length, refused before
    validation (validating a huge list only to refuse it would hold the GIL for a long time)."""
    # JSON only (as FastAPI's strict default): a browser page elsewhere can send text/plain without a
    # CORS preflight, and must not be able to spend this server's model that way.
    if not _is_json(request.headers.get("content-type")):
        raise HTTPException(415, "send the request body as JSON, with the header Content-Type: application/json")
    raw = await request.body()
    if len(raw) <= INLINE_BYTES:
        return _parse(raw, model, max_items)
    return await pool.off_loop(lambda: _parse(raw, model, max_items))


def _parse(raw: bytes, model: type[M], max_items: dict[str, int] | None) -> M:
    try:
        # bytes: the JSON module decodes UTF-8 with surrogatepass, and Text (protocol.py) turns lone
        # surrogates into U+FFFD; other invalid UTF-8 is a UnicodeDecodeError, a ValueError.
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": str(exc)[:200]}}]) from None
    for key, limit in (max_items or {}).items():
        if isinstance(data, dict) and isinstance(items := data.get(key), list) and len(items) > limit:
            raise InvalidParameter(f"{key} has {len(items)} items; this server takes at most {limit}", param=key)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None

"""The server's one error table: every exception becomes an OpenAI-style error body with its status.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ggufchat.errors import (
    ContextOverflow,
    DecodeError,
    EngineStopped,
    GgufchatError,
    InvalidParameter,
    ModelLoadError,
    ModelNotFound,
    NoRoom,
    QueueFull,
    RequestTimeout,
    TemplateError,
    Unsupported,
)

log = logging.getLogger(__name__)

_HTTP_TYPES = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "queue_full"),
    503: ("server_error", "unavailable"),
}


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) for an exception. The order matters: subclasses first."""
    if isinstance(exc, ContextOverflow):
        return 400, error_body(str(exc), "invalid_request_error", param="messages",
                               code="context_length_exceeded"), {}
    if isinstance(exc, Unsupported):
        return 400, error_body(str(exc), "invalid_request_error", param=exc.param, code="unsupported"), {}
    if isinstance(exc, InvalidParameter):
        return 400, error_body(str(exc), "invalid_request_error", param=exc.param, code="invalid_value"), {}
    if isinstance(exc, TemplateError):
        return 400, error_body(f"the chat template could not render these messages: {exc}",
                               "invalid_request_error", param="messages", code="template_error"), {}
    if isinstance(exc, QueueFull):
        return 429, error_body(str(exc), "rate_limit_error", code="queue_full"), \
            {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, ModelNotFound):
        return 404, error_body(str(exc), "invalid_request_error", param="model", code="model_not_found"), {}
    if isinstance(exc, NoRoom):
        return 503, error_body(str(exc), "server_error", code="no_room"), {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, RequestTimeout):
        return 504, error_body(str(exc), "timeout_error", code="timeout"), {}
    if isinstance(exc, (EngineStopped, ModelLoadError)):
        return 503, error_body(str(exc), "server_error", code="unavailable"), {}
    if isinstance(exc, DecodeError):
        return 500, error_body(str(exc), "server_error", code="decode_failed"), {}
    if isinstance(exc, GgufchatError):
        return 500, error_body(str(exc), "server_error"), {}
    if isinstance(exc, HTTPException):
        type_, code = _HTTP_TYPES.get(exc.status_code, ("invalid_request_error" if exc.status_code < 500
                                                         else "server_error", None))
        return exc.status_code, error_body(str(exc.detail), type_, code=code), dict(exc.headers or {})
    log.error("unexpected error", exc_info=exc)
    return 500, error_body("internal server error; see the server log", "server_error"), {}


def validation_body(exc: RequestValidationError) -> dict[str, Any]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ())][1:]  # drop "body" / "query" / "path"
    if first.get("type") == "json_invalid":
        return error_body("the request body is not valid JSON", "invalid_request_error", code="invalid_json")
    param = ".".join(loc) or None
    what = f"{param}: " if param else ""
    return error_body(f"{what}{first.get('msg', 'invalid request')}", "invalid_request_error", param=param,
                      code="invalid_value" if param else "invalid_request")


def response_for(exc: BaseException) -> JSONResponse:
    status, body, headers = describe(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_body(exc), status_code=400)

    async def on_any(request: Request, exc: Exception) -> JSONResponse:
        return response_for(exc)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_any)
    app.add_exception_handler(GgufchatError, on_any)
    app.add_exception_handler(Exception, on_any)

"""The ASGI middleware in front of every PixelLM Serve route: request id, auth, body cap, catch-all.

``RequestGuard`` reads the limits of this process's replica from ``set_limits`` (one replica per
process). The state lives in this module, imported by reference everywhere: Serve pickles the
deployment class by value, so a global of ``app.py`` would be a copy on the replica.

- Request id: Ray Serve's proxy puts one in the ``X-Request-ID`` header of the request and of the
  response; the guard reuses it (or makes one) and every error body carries it.
- Auth: with a token, every path but ``OPEN_PATHS`` needs ``Authorization: Bearer <token>``
  (``/docs``, ``/redoc``, ``/openapi.json`` included) → 401 JSON.
- Body cap: a ``Content-Length`` over ``Limits.max_body_bytes`` is refused before anything is read,
  and a streamed body as soon as it crosses the cap → 413 JSON.
- Any exception escaping a route → 500 JSON naming the exception type and the request id (the
  traceback goes to the replica log only).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi.responses import JSONResponse

from pixellm.config import ServeConfig
from pixellm.serve.api import ErrorResponse, Limits, RequestError, check_bearer, clean_message

__all__ = ["OPEN_PATHS", "RequestGuard", "current_limits", "json_error", "set_limits"]

logger = logging.getLogger("ray.serve")

OPEN_PATHS = ("/healthz",)  # answered without a token (liveness probes)
_LIMITS: dict[str, Limits] = {"current": Limits.from_config(ServeConfig())}


def set_limits(limits: Limits) -> None:
    """Install the replica's limits and token (called by the deployment)."""
    _LIMITS["current"] = limits


def current_limits() -> Limits:
    """The limits the guard applies now."""
    return _LIMITS["current"]


def json_error(
    status: int, message: str, request_id: str | None, headers: dict | None = None
) -> JSONResponse:
    """``{"error", "request_id"}`` with ``status`` (``WWW-Authenticate`` on 401)."""
    body = ErrorResponse(error=clean_message(message), request_id=request_id).model_dump()
    hdrs = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    return JSONResponse(body, status_code=status, headers={**hdrs, **(headers or {})})


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """ASGI middleware: request id, auth, body size cap, catch-all JSON 500 (see module doc)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits = current_limits()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        from_proxy = "x-request-id" in headers  # Serve's proxy adds it to the response too
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope["path"][len(scope.get("root_path", "")) :] or "/"
        started = False

        async def send_with_id(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not from_proxy:
                    extra = [(b"x-request-id", request_id.encode())]
                    message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        async def reply(response: JSONResponse) -> None:
            await response(scope, receive, send_with_id)

        if path not in OPEN_PATHS and limits.bearer_token is not None:
            try:
                check_bearer(headers.get("authorization"), limits.bearer_token)
            except RequestError as err:
                await reply(json_error(err.status, err.message, request_id))
                return
        cap = limits.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            await reply(
                json_error(
                    413, f"body of {declared} bytes is over the limit of {cap} bytes", request_id
                )
            )
            return
        seen = 0

        async def capped_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, capped_receive, send_with_id)
        except _BodyTooLarge:
            if not started:
                await reply(json_error(413, f"body is over the limit of {cap} bytes", request_id))
        except Exception as err:  # noqa: BLE001 - the catch-all: log it, answer JSON
            logger.exception("request %s failed: %s", request_id, type(err).__name__)
            if not started:
                await reply(
                    json_error(
                        500,
                        f"internal error ({type(err).__name__}); quote request id {request_id}",
                        request_id,
                    )
                )

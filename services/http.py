"""HTTP plumbing: the one error-to-status mapping, the body-size limit, request metrics.

Every error leaves as `{"error": {"message", "type", "code"}}` (OpenAI's shape, so its
client raises the right exception class). Messages are the library's own one-liners with
file paths blanked; unexpected errors say only "internal error" (the traceback goes to the
replica's log). Errors raised inside another deployment arrive wrapped in a RayTaskError
and are unwrapped first, so a NotFound in the retrieval replica is a 404 here too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ntkmirror.errors import (AuthError, ConfigError, ControllerError, DataError, ModelLoadError, NotFound,
                              NtkMirrorError, QuotaError, StoreError)

log = logging.getLogger("ray.serve")

# (status, type) by error class; the first match in order wins (subclasses before bases).
STATUS: list[tuple[type, int, str]] = [
    (AuthError, 401, "authentication_error"),
    (NotFound, 404, "not_found"),
    (QuotaError, 429, "rate_limit_exceeded"),
    (DataError, 422, "invalid_request_error"),
    (ConfigError, 422, "invalid_request_error"),
    (ControllerError, 422, "invalid_request_error"),  # also ModelMismatchError
    (StoreError, 503, "service_unavailable"),
    (ModelLoadError, 503, "service_unavailable"),
    (NtkMirrorError, 400, "invalid_request_error"),
    (ConnectionError, 503, "service_unavailable"),
    (asyncio.TimeoutError, 504, "timeout"),
]

_PATH = re.compile(r"(?<![\w.:/])(?!/v\d+/)(?:~|\.{1,2})?(?:/[\w.@+~-]+){2,}/?")  # not API routes (/v1/...)
_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|[\x00-\x1f\x7f]")  # terminal colour codes and control characters


def clean(message: str, limit: int = 500) -> str:
    """A message safe to return: no file paths, no newlines (tracebacks), no control characters, bounded length."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else ""
    return _PATH.sub("<path>", _CONTROL.sub("", first))[:limit]


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind Ray's task/actor wrappers."""
    from ray.exceptions import RayTaskError

    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    return exc


class Raised:
    """An expected error (404, 422, 429...) carried back from another deployment as a value,
    so the replica does not log it as a failed request with a traceback."""

    def __init__(self, exc: NtkMirrorError):
        self.exc = exc


def expected(method):
    """Decorate a deployment method whose NtkMirrorErrors are answers, not failures."""

    @functools.wraps(method)
    async def wrapper(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except NtkMirrorError as e:
            return Raised(e)

    return wrapper


async def result(response):
    """Await a deployment call; re-raise an expected error it returned."""
    value = await response
    if isinstance(value, Raised):
        raise value.exc
    return value


def _is_unavailable(exc: BaseException) -> bool:
    """A replica died, is restarting or is overloaded: the client may retry."""
    from ray import exceptions as rx
    from ray.serve import exceptions as sx

    kinds = (rx.RayActorError, rx.ActorUnavailableError, rx.ObjectLostError, sx.BackPressureError,
             sx.DeploymentUnavailableError)
    if isinstance(exc, kinds):
        return True
    try:
        import redis

        return isinstance(exc, redis.RedisError)
    except ImportError:
        return False


def error_response(exc: BaseException) -> JSONResponse:
    exc = unwrap(exc)
    headers = {}
    for cls, status, kind in STATUS:
        if isinstance(exc, cls):
            message = clean(exc) or kind
            break
    else:
        if _is_unavailable(exc):
            status, kind, message = 503, "service_unavailable", "a backend replica is unavailable; retry shortly"
        else:
            status, kind, message = 500, "internal_error", "internal error"
            log.error("unhandled error in request", exc_info=exc)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="ntkmirror"'
    if status == 429 and getattr(exc, "retry_after", None):
        headers["Retry-After"] = str(exc.retry_after)
    if status in (503, 504):
        headers.setdefault("Retry-After", "1")
    return error_json(status, kind, message, headers)


def error_json(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


def install(app: FastAPI, max_body_bytes: int) -> None:
    """Wire the error mapping and the body limit into a FastAPI app."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        ctype = request.headers.get("content-type", "")
        if request.method in ("POST", "PUT", "PATCH") and not _is_json(ctype) and any(
                tuple(e.get("loc", ())) == ("body",) for e in exc.errors()):
            # FastAPI does not parse a body sent as another type: say that, not "not a valid object"
            message = f"the request body must be JSON sent with Content-Type: application/json (got {ctype or 'none'!r})"
            return error_json(422, "invalid_request_error", clean(message))
        errors = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()[:10]]
        return error_json(422, "invalid_request_error", clean("; ".join(errors), 2000))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "request_too_large" if exc.status_code == 413 else "http_error"
        detail = exc.detail
        if exc.status_code == 400 and detail == "There was an error parsing the body":  # e.g. invalid UTF-8
            detail = "the request body could not be parsed: send UTF-8 JSON"
        return error_json(exc.status_code, kind, clean(detail), getattr(exc, "headers", None))

    app.add_middleware(Guard, max_body_bytes=max_body_bytes)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class BodyTooLarge(StarletteHTTPException):
    """Raised while reading the body; an HTTPException so FastAPI's body parser passes it on."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over the limit of {limit} bytes")


class Guard:
    """Outermost ASGI layer: rejects oversized bodies (413, by Content-Length and by counting
    the streamed bytes), maps any escaped exception to its status, and records metrics."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.limit = app, int(max_body_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, started, status, seen = time.perf_counter(), False, 500, 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message):
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
            await send(message)

        try:
            length = dict(scope.get("headers") or []).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                raise BodyTooLarge(self.limit)
            await self.app(scope, limited_receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - everything becomes a JSON error
            if started:  # too late to change the status; the log has it
                log.error("error after the response started", exc_info=exc)
                return
            if isinstance(exc, StarletteHTTPException):
                response = error_json(exc.status_code, "request_too_large" if exc.status_code == 413 else
                                      "http_error", clean(exc.detail))
            else:
                response = error_response(exc)
            await response(scope, receive, tracking_send)
        finally:
            route = scope.get("route")
            observe(getattr(route, "path", "unmatched"), scope.get("method", ""), status, time.perf_counter() - t0)


_metrics = None


def observe(route: str, method: str, status: int, seconds: float) -> None:
    """Prometheus metrics through Ray (tags: route template, method, status)."""
    global _metrics
    try:
        if _metrics is None:
            from ray.serve.metrics import Counter, Histogram

            _metrics = (
                Counter("ntkmirror_http_requests", "HTTP requests by route and status",
                        tag_keys=("route", "method", "status")),
                Histogram("ntkmirror_http_latency_s", "HTTP request latency in seconds",
                          boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
                          tag_keys=("route", "method")),
            )
        tags = {"route": route, "method": method}
        _metrics[0].inc(tags={**tags, "status": str(status)})
        _metrics[1].observe(seconds, tags=tags)
    except Exception:  # metrics must never fail a request
        pass

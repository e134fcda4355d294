"""Daytona's error bodies: ``{"statusCode", "message", "code", "source", "path", "method", "timestamp"}``,
as the SDK parses them (``daytona._utils.errors``): ``message`` becomes the exception text, ``code`` and
``source`` its attributes, and the status picks the exception class (404 -> DaytonaNotFoundError...)."""

from __future__ import annotations

import datetime
from http import HTTPStatus

from aiohttp import web

SOURCE_API, SOURCE_DAEMON, SOURCE_PROXY = "DAYTONA_API", "DAYTONA_DAEMON", "DAYTONA_PROXY"
_CODES = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 408: "REQUEST_TIMEOUT",
          409: "CONFLICT", 429: "TOO_MANY_REQUESTS", 500: "INTERNAL_SERVER_ERROR", 502: "BAD_GATEWAY",
          503: "SERVICE_UNAVAILABLE"}


class ApiError(Exception):
    """Raised anywhere in the emulator; the error middleware turns it into Daytona's error body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, source: str = SOURCE_API,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.source = status, message, source
        self.code = code or _CODES.get(status, "ERROR")
        self.headers = headers or {}


def now_iso(timestamp: float | None = None) -> str:
    moment = (datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc) if timestamp is not None
              else datetime.datetime.now(datetime.timezone.utc))
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error_response(request: web.Request, error: ApiError) -> web.Response:
    body = {
        "statusCode": error.status,
        "message": error.message,
        "code": error.code,
        "error": HTTPStatus(error.status).phrase if error.status in HTTPStatus._value2member_map_ else "Error",
        "source": error.source,
        "path": request.path,
        "method": request.method,
        "timestamp": now_iso(),
    }
    return web.json_response(body, status=error.status, headers=error.headers)

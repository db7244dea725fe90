"""Errors in OpenAI's shape: every error response is {"error": {"message", "type", "param", "code"}}.

Clients (the openai package among them) read ``message`` and ``code``; ``type`` is one of OpenAI's
categories and ``param`` names the request field at fault, where there is one.
"""

from __future__ import annotations

from typing import Any

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable"
# Set when the client went away before its answer: nginx's number for it, for the logs and /metrics
# (the client never sees it).
CLIENT_CLOSED = 499


class APIError(Exception):
    """An error answer: status, OpenAI error body, and extra headers (Retry-After)."""

    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = INVALID_REQUEST, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def retry_later(status: int, message: str, code: str, retry_after: int) -> APIError:
    """429 (busy) or 503 (loading, shutting down), with the Retry-After header clients honour."""
    kind = RATE_LIMIT if status == 429 else UNAVAILABLE
    return APIError(status, message, kind, None, code, {"Retry-After": str(retry_after)})

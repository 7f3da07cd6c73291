"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""
from __future__ import annotations

import msgspec

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    417: "invalid_request_error",
    429: "rate_limit_exceeded",
    431: "invalid_request_error",
    502: "server_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: int | str | None


class ErrorBody(msgspec.Struct):
    error: ErrorInfo


def error_body(status: int, message: str, param: str | None = None, code: int | str | None = None) -> bytes:
    info = ErrorInfo(message, _TYPES.get(status, "invalid_request_error"), param,
                     code if code is not None else status)
    return msgspec.json.encode(ErrorBody(info))


class ApiError(Exception):
    """Raised anywhere in request handling; turned into an OpenAI error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: int | str | None = None,
                 headers: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.param, self.code)

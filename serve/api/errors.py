"""The API layer's one error type: a gRPC status code and a one-line message for the client.

Raised anywhere in ``serve/api`` before a response starts; the gRPC servicer turns it into the
call's status, the HTTP gateway into an OpenAI-style error body with the matching HTTP status.
"""

from __future__ import annotations

import grpc

# gRPC status -> HTTP status, as in google.api's mapping (https://cloud.google.com/apis/design/errors).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
}

# OpenAI's error `type` strings by HTTP status.
OPENAI_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                     429: "rate_limit_error", 503: "server_error", 500: "server_error"}


class ApiError(Exception):
    """A request the API refuses.

    Args:
      code: the gRPC status code.
      message: one line for people, naming the field at fault.
      retry_after_s: for RESOURCE_EXHAUSTED/UNAVAILABLE: when trying again makes sense.
    """

    def __init__(self, code: grpc.StatusCode, message: str, *, retry_after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


def invalid(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, message)

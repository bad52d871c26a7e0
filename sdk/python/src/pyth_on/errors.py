"""What the SDK raises."""

from __future__ import annotations

# gRPC status codes to the HTTP statuses the edge answers them with (DESIGN.md §1), for errors that
# arrive inside a stream after its 200 has been sent.
HTTP_STATUS_OF_GRPC_CODE = {
    3: 400,  # INVALID_ARGUMENT
    5: 404,  # NOT_FOUND
    6: 409,  # ALREADY_EXISTS
    7: 403,  # PERMISSION_DENIED
    8: 429,  # RESOURCE_EXHAUSTED
    9: 400,  # FAILED_PRECONDITION
    12: 501,  # UNIMPLEMENTED
    14: 503,  # UNAVAILABLE
    4: 504,  # DEADLINE_EXCEEDED
    16: 401,  # UNAUTHENTICATED
}
# The gRPC code an HTTP status stands for, when an answer carries no JSON error (a proxy's page).
_GRPC_CODE_OF_HTTP_STATUS = {
    400: 3,
    401: 16,
    403: 7,
    404: 5,
    409: 6,
    429: 8,
    501: 12,
    503: 14,
    504: 4,
}
UNKNOWN = 2


class PythOnError(Exception):
    """Anything the SDK raises: an answer of the API (ApiError) or no answer at all (TransportError)."""


class ApiError(PythOnError):
    """The API refused or failed a call.

    `status` is the HTTP status, `code` the gRPC status code of the error body (3 invalid argument,
    5 not found, 8 rate limited, 14 unavailable, ...), `message` what the server said. `retry_after`
    is the server's Retry-After in seconds, when it sent one; `request_id` names the call in the
    server's logs and audit log.
    """

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        *,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.request_id = request_id

    @classmethod
    def in_band(cls, error: object, request_id: str | None = None) -> ApiError:
        """An error that arrived as a stream's `{"error": {code, message}}` line."""
        code, message = UNKNOWN, "the stream ended with an error"
        if isinstance(error, dict):
            if isinstance(error.get("code"), int):
                code = error["code"]
            if isinstance(error.get("message"), str):
                message = error["message"]
        return cls(HTTP_STATUS_OF_GRPC_CODE.get(code, 500), code, message, request_id=request_id)

    @staticmethod
    def code_for_status(status: int) -> int:
        return _GRPC_CODE_OF_HTTP_STATUS.get(status, UNKNOWN)


class TransportError(PythOnError):
    """The server could not be reached, or the connection broke before a whole answer arrived."""

"""Domain errors that logic raises, and the one place they become gRPC status codes."""

from __future__ import annotations

import grpc


class DomainError(Exception):
    """An expected refusal, with a message safe to show to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # The status of the internal call this error came from, when it came from one (for logs:
    # both UNAVAILABLE and DEADLINE_EXCEEDED become Unavailable).
    upstream_code: grpc.StatusCode | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Internal(DomainError):
    """Something failed that the caller can neither fix nor learn more about."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(DomainError):
    """Too many requests; the caller may retry after `retry_after` seconds."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))

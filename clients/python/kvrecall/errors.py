"""Typed exceptions of the kvrecall client, mapped from gRPC status codes.

Every exception carries the daemon's message (``str(e)``) and the gRPC code
(``e.code``); docs/errors.md lists which request gets which code.
"""

import grpc

__all__ = [
    "KvrecallError", "CancelledError", "InvalidArgumentError", "DeadlineExceededError",
    "NotFoundError", "AlreadyExistsError", "PermissionDeniedError", "ResourceExhaustedError",
    "FailedPreconditionError", "UnavailableError", "DataLossError", "InternalError",
    "UnauthenticatedError", "from_rpc_error",
]


class KvrecallError(Exception):
    """Base class: a call to kvrecalld failed."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class CancelledError(KvrecallError):
    code = grpc.StatusCode.CANCELLED


class InvalidArgumentError(KvrecallError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(KvrecallError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(KvrecallError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(KvrecallError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(KvrecallError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(KvrecallError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(KvrecallError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class UnavailableError(KvrecallError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(KvrecallError):
    code = grpc.StatusCode.DATA_LOSS


class InternalError(KvrecallError):
    code = grpc.StatusCode.INTERNAL


class UnauthenticatedError(KvrecallError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE = {cls.code: cls for cls in (
    CancelledError, InvalidArgumentError, DeadlineExceededError, NotFoundError,
    AlreadyExistsError, PermissionDeniedError, ResourceExhaustedError, FailedPreconditionError,
    UnavailableError, DataLossError, InternalError, UnauthenticatedError)}


def from_rpc_error(error: grpc.RpcError) -> KvrecallError:
    """The typed exception for a gRPC error."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    cls = _BY_CODE.get(code, KvrecallError)
    return cls(details or code.name, code)


def from_code(code: int, message: str) -> KvrecallError:
    """The typed exception for a canonical status code number (e.g. the
    error_code of a BatchAttend response or of a failed operation)."""
    status = next((s for s in grpc.StatusCode if s.value[0] == code), grpc.StatusCode.UNKNOWN)
    cls = _BY_CODE.get(status, KvrecallError)
    return cls(message or status.name, status)

"""Exceptions raised by libaios: one class per :class:`ErrorCode`.

The kernel answers every failure with the error envelope of
:mod:`libaios.protocol`; :func:`from_envelope` turns it into the matching
exception here, so an agent catches the same class the kernel raised.
"""

from __future__ import annotations

from typing import Any

from .protocol import RETRIABLE, ErrorCode


class AIOSError(Exception):
    """Base class of every error a system call can raise."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, retriable: bool | None = None,
                 details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.retriable = self.code in RETRIABLE if retriable is None else retriable
        self.details = details or {}

    def to_body(self) -> dict[str, Any]:
        """The error envelope's body for this exception."""
        body = {
            "code": int(self.code),
            "name": self.code.name,
            "message": self.message,
            "retriable": self.retriable,
        }
        if self.details:
            body["details"] = self.details
        return body


class BadFrame(AIOSError):
    code = ErrorCode.BAD_FRAME


class BadVersion(AIOSError):
    code = ErrorCode.BAD_VERSION


class UnknownType(AIOSError):
    code = ErrorCode.UNKNOWN_TYPE


class TooLarge(AIOSError):
    code = ErrorCode.TOO_LARGE


class InvalidArgument(AIOSError):
    code = ErrorCode.INVALID_ARGUMENT


class NotFound(AIOSError):
    code = ErrorCode.NOT_FOUND


class PermissionDenied(AIOSError):
    code = ErrorCode.PERMISSION_DENIED


class Unauthenticated(AIOSError):
    code = ErrorCode.UNAUTHENTICATED


class Timeout(AIOSError):
    code = ErrorCode.TIMEOUT


class Cancelled(AIOSError):
    code = ErrorCode.CANCELLED


class Unavailable(AIOSError):
    code = ErrorCode.UNAVAILABLE


class WorkerLost(AIOSError):
    code = ErrorCode.WORKER_LOST


class Overloaded(AIOSError):
    code = ErrorCode.OVERLOADED


class ShuttingDown(AIOSError):
    code = ErrorCode.SHUTTING_DOWN


class NotRunning(AIOSError):
    code = ErrorCode.NOT_RUNNING


class QuotaExceeded(AIOSError):
    code = ErrorCode.QUOTA_EXCEEDED


class ApprovalRequired(AIOSError):
    code = ErrorCode.APPROVAL_REQUIRED


class Conflict(AIOSError):
    code = ErrorCode.CONFLICT


class BackendError(AIOSError):
    code = ErrorCode.BACKEND


class ToolCallIncomplete(AIOSError):
    """A call whose ``tool_choice`` required a tool call got none that
    completed within its tokens (``details`` names the tools and the budget)."""

    code = ErrorCode.TOOL_CALL_INCOMPLETE


class InternalError(AIOSError):
    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[AIOSError]] = {
    cls.code: cls for cls in AIOSError.__subclasses__()
}


def error_class(code: ErrorCode) -> type[AIOSError]:
    """The exception class for ``code``."""
    return _BY_CODE[code]


def from_envelope(body: dict[str, Any]) -> AIOSError:
    """The exception for an error envelope received from the kernel."""
    try:
        code = ErrorCode(body.get("code"))
    except ValueError:
        code = ErrorCode.INTERNAL
    message = str(body.get("message", "unknown error"))
    retriable = body.get("retriable")
    details = body.get("details")
    return _BY_CODE[code](
        message, retriable if isinstance(retriable, bool) else None,
        details if isinstance(details, dict) else None,
    )

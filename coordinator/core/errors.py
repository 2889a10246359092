"""The domain's errors: one root, one subclass per condition; the transport maps them to JSON-RPC codes."""

from __future__ import annotations


class CoordinatorError(Exception):
    """Something the coordinator refuses."""

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or "error").strip().splitlines()[0]
        super().__init__(self.message)


class NotFound(CoordinatorError):
    """No such record."""


class TasksetNotFound(NotFound):
    """No such taskset."""


class TaskNotFound(NotFound):
    """No such task."""


class TrialNotFound(NotFound):
    """No such trial."""


class SlaveNotFound(NotFound):
    """No such slave."""


class WorkerLogNotFound(NotFound):
    """No such worker log."""


class Conflict(CoordinatorError):
    """The state forbids it."""


class RsyncNameBusy(Conflict):
    """That rsync_name already has an active taskset."""


class IllegalTransition(Conflict):
    """That status change is not allowed."""


class InvalidArgument(CoordinatorError):
    """A value is out of range or malformed."""


class Refused(InvalidArgument):
    """The store cannot hold a value of this call."""


class Unavailable(CoordinatorError):
    """The store could not be reached; try again."""

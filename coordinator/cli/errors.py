"""The client's one error root: every failure it reports in a line and exits 2 for."""

from __future__ import annotations


class CliError(Exception):
    """The client could not do what it was asked."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__)

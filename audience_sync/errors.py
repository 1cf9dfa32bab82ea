"""One exception tree. The docstring of each class is its default message."""

from __future__ import annotations

import sqlite3


class AudienceSyncError(Exception):
    """audience-sync failed."""

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(AudienceSyncError):
    """The configuration is invalid."""

    exit_code = 2

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)


class UsageError(AudienceSyncError):
    """Bad command-line usage."""

    exit_code = 2


class StoreError(AudienceSyncError):
    """The state database could not be used."""


class SourceError(AudienceSyncError):
    """A source database query failed."""


class RunHeld(AudienceSyncError):
    """The run would remove too many members and was held; run it with --force to apply."""


class LeaseLost(AudienceSyncError):
    """The lease on this audience was lost; the run did not commit."""


class LeaseBusy(AudienceSyncError):
    """Another process holds the lease on this audience."""


class DestinationError(AudienceSyncError):
    """A destination refused or failed a delivery."""


READ_ONLY_REFUSAL = "the source is read-only: the statement was refused (it would write " \
    "or attach a database)"


def describe_db_error(exc: BaseException) -> str:
    """One line from a driver error (source or state database), without the SQL statement or
    its parameters."""
    orig = getattr(exc, "orig", None)
    # What sqlite3 says when the source's authorizer refused a statement (ATTACH, or a
    # statement that runs one, like VACUUM INTO).
    if isinstance(orig if orig is not None else exc, sqlite3.DatabaseError) and str(
            orig if orig is not None else exc) in ("not authorized", "authorization denied"):
        return READ_ONLY_REFUSAL
    lines = str(orig if orig is not None else exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__

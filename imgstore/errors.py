"""The exception hierarchy. Each class carries its exit code; docs/exit-codes.md lists them.

Every error is one line naming what broke, plus a hint naming the command or change that fixes it.
"""

from __future__ import annotations


class ImgstoreError(Exception):
    """Something went wrong."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def __reduce__(self) -> tuple[type[ImgstoreError], tuple[str, str | None]]:
        return type(self), (self.message, self.hint)  # with its hint, from a forked worker (forkjoin)


class UsageError(ImgstoreError):
    """The command line or an argument is wrong."""

    exit_code = 2


class NotFound(ImgstoreError):
    """A generation, profile, node, path or chroot does not exist."""

    exit_code = 3


class ConfigError(ImgstoreError):
    """A profile or the store configuration is invalid."""

    exit_code = 4


class StoreError(ImgstoreError):
    """The store is missing, of an unknown format, or its database is unusable."""

    exit_code = 5


class IntegrityError(ImgstoreError):
    """Stored data is missing or damaged, or a manifest is hostile."""

    exit_code = 6


class Busy(ImgstoreError):
    """Another imgstore command holds the store lock."""

    exit_code = 7


class Conflict(ImgstoreError):
    """The requested change collides with existing state (non-empty destination, duplicate MAC, ...)."""

    exit_code = 8


class NoSpace(ImgstoreError):
    """A filesystem ran out of space."""

    exit_code = 9


class ChangedWhileReading(ImgstoreError):
    """A file kept changing while commit read it."""

    exit_code = 10


EXIT_CODES: list[tuple[int, str, str]] = [
    (0, "ok", "success (also: commit of an unchanged tree, verify of a clean store)"),
    (1, "error", "an unexpected error; the message says what failed"),
    (UsageError.exit_code, "usage", UsageError.__doc__ or ""),
    (NotFound.exit_code, "not-found", NotFound.__doc__ or ""),
    (ConfigError.exit_code, "config", ConfigError.__doc__ or ""),
    (StoreError.exit_code, "store", StoreError.__doc__ or ""),
    (IntegrityError.exit_code, "integrity", IntegrityError.__doc__ or ""),
    (Busy.exit_code, "busy", Busy.__doc__ or ""),
    (Conflict.exit_code, "conflict", Conflict.__doc__ or ""),
    (NoSpace.exit_code, "no-space", NoSpace.__doc__ or ""),
    (ChangedWhileReading.exit_code, "changed", ChangedWhileReading.__doc__ or ""),
    (130, "interrupted", "interrupted by Ctrl-C or SIGTERM; nothing half-written is visible"),
]

"""Exceptions that qvlsearch raises: each names the thing at fault and says what to do."""


class QvlsearchError(Exception):
    """Base class for every error qvlsearch raises on purpose."""


class InputError(QvlsearchError, ValueError):
    """An input item has the wrong shape or type (a programming error at the call site)."""


class MediaError(QvlsearchError):
    """One input item could not be read or decoded: a missing file, a corrupt image, a dead URL."""

    def __init__(self, message: str, *, index: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.index = index
        self.reason = reason or message  # the message without the name of the file, for tables

    def __str__(self) -> str:
        text = super().__str__()
        return f"item {self.index}: {text}" if self.index is not None else text


class ModelLoadError(QvlsearchError):
    """A model could not be found or loaded."""

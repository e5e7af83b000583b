"""Exceptions that qvlsearch raises: each names the thing at fault and says what to do."""

from __future__ import annotations

import math
import numbers


class QvlsearchError(Exception):
    """Base class for every error qvlsearch raises on purpose."""


class InputError(QvlsearchError, ValueError):
    """An input item has the wrong shape or type (a programming error at the call site)."""


class SettingError(InputError):
    """A setting (a constructor argument, or the command-line option of the same name) outside its range."""

    def __init__(self, name: str, rule: str, value: object):
        super().__init__(f"{name} must be {rule}, got {value!r}")
        self.name, self.rule, self.value = name, rule, value

    def as_option(self) -> str:
        """The message naming the command-line option: --max-pixels for max_pixels."""
        return f"--{self.name.replace('_', '-')} must be {self.rule}, got {self.value!r}"


def check_setting(name: str, value: object, low: float, high: float | None = None, *, integer: bool = True,
                  above: bool = False, rule: str | None = None) -> None:
    """Raise SettingError unless `value` is a number (an integer with `integer`) from `low` (exclusive with
    `above`) to `high`; `rule` says it in other words."""
    number = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    fits = number and math.isfinite(value) and (value > low if above else value >= low)
    if not (fits and (high is None or value <= high)):
        bounds = f"above {low}" if above else f"of at least {low}" if high is None else f"from {low} to {high}"
        raise SettingError(name, rule or f"{'an integer' if integer else 'a number'} {bounds}", value)


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

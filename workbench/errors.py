"""Errors a user can fix, told apart from bugs.

`workbench` prints a `UserError` as one line and exits with status 2; every other exception is a bug in the
workbench and keeps its traceback (exit status 1). Raise a `UserError` (or a subclass) only where input a
user gave is checked: a model that is not there, an option out of range, a recipe naming unknown layers.

Example:
    >>> raise InvalidValueError("--threads must be an integer >= 1, got 0")
"""

from __future__ import annotations

import dataclasses
from typing import Any


class UserError(Exception):
    """An error the user can fix by changing what they asked for; its message says what was wrong and what is
    valid. Subclasses also derive from the built-in type they used to be (`ValueError`, `FileNotFoundError`),
    so code that catches those still works."""


class InvalidValueError(UserError, ValueError):
    """A value the user gave (an option, a config field, a parameter) is of the wrong kind or out of range."""


def is_user_error(err: BaseException) -> bool:
    """Whether `err` is one a user can fix (a `UserError`: `ModelNotAvailableError`, `RecipeError`,
    `StoreMismatchError`, `InvalidValueError`, ...)."""
    return isinstance(err, UserError)


_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def parse_bool(text: str, *, name: str) -> bool:
    """`text` as a boolean: true/false, 1/0 or yes/no in any case.

    Args:
        text (`str`): the value as typed.
        name (`str`): what it is for (an option or a config key), named in the error.

    Raises:
        InvalidValueError: anything else (e.g. "ture"), naming `name` and the value.
    """
    value = text.strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise InvalidValueError(f"{name}={text!r} is not a boolean; valid: {', '.join(_TRUE + _FALSE)} (any case)")


def from_known_fields(cls, data: dict[str, Any]):
    """`cls(**data)` for a dataclass config read from JSON, refusing keys it has no field for.

    Raises:
        InvalidValueError: an unknown key, naming them and the valid ones (and whatever `cls` itself refuses).
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise InvalidValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; valid: {sorted(known)}")
    return cls(**data)

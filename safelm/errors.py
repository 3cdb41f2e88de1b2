"""User-facing errors.

Every mistake a user can make (a missing file, a bad option, a column that does not exist) is
raised as :class:`UserError`. The command line turns it into one line ``error: ...`` on stderr
and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or options; the message names it and how to fix it."""


class ConfigError(UserError):
    """A config key that does not exist, or a value of the wrong type or out of range."""


class DataError(UserError):
    """Input data that cannot be read or does not have what the task needs."""


class MissingColumn(DataError):
    """A column the task needs is not in the file; ``column`` names it (callers that can do
    without it, e.g. predicting on unlabelled rows, test the type, never the message)."""

    def __init__(self, message: str, column: str):
        super().__init__(message)
        self.column = column

"""Exceptions that carry a one-line message for the user and the CLI's exit code.

Each subclasses a builtin, so plain Python callers can catch ``ValueError`` or ``OSError``.
The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``.
"""


class CtreError(Exception):
    """Base of every error ctre-edge raises on purpose. The message says what to change."""

    exit_code = 1


class ConfigError(CtreError, ValueError):
    """A setting is out of range or inconsistent with another one."""

    exit_code = 2


class BudgetError(CtreError, ValueError):
    """The run does not fit the device profile (memory budget or parameter cap)."""

    exit_code = 3


class DataError(CtreError, ValueError):
    """The input data is missing, unreadable or malformed."""

    exit_code = 4


class ModelFileError(CtreError, ValueError):
    """A model or checkpoint file is corrupt, foreign, or from a newer format version."""

    exit_code = 5


class OutputExistsError(CtreError, FileExistsError):
    """Refusing to overwrite an existing output without --force."""

    exit_code = 6


class OutputWriteError(CtreError, OSError):
    """An output could not be written (no space left, read-only directory, ...)."""

    exit_code = 6


class DivergedError(CtreError, ArithmeticError):
    """Training produced a NaN or Inf loss."""

    exit_code = 7

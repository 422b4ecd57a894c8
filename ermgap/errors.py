"""User-facing errors. The CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations


class ErmgapError(Exception):
    """Base class: an error caused by the user's input, with a message that says what to fix."""

    exit_code = 2


class ConfigError(ErmgapError):
    """A config or sweep spec is invalid (names the file, the dotted key and what is allowed)."""


class ManifestError(ErmgapError):
    """A manifest or audio file is invalid (names the file, row and column)."""


class PredictionsError(ErmgapError):
    """A predictions CSV is invalid (names the file, row and column)."""


class OutputExistsError(ErmgapError):
    """Refusing to overwrite an existing result without --force."""


class TrainingError(ErmgapError):
    """Training cannot continue (NaN loss, missing checkpoint, ...)."""


class NoSpaceError(ErmgapError):
    """A write failed because its filesystem is full (names the path)."""


class ErmgapWarning(UserWarning):
    """Something in the user's input that is allowed but probably not meant (a speaker in two splits, an
    empty config file). Raised with `warnings.warn`; the CLI prints it as one `warning:` line."""


class StorageError(ErmgapError):
    """The run's storage (a directory, or an s3:// / gs:// store) or tracking server cannot be reached or written."""

    exit_code = 1

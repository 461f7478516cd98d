"""User-facing errors.

Anything a user can fix (a bad config value, a malformed record, a missing model) raises
`PotstillError` with a one-line message that says what is wrong, where, and how to fix it. The CLI
prints that line and exits with code 2; it never shows a traceback for these.
"""

from __future__ import annotations


class PotstillError(ValueError):
    """A problem with the user's input: config, data, model or environment.

    Subclasses `ValueError` so library users can catch it as one; the message is a single line.
    """

    exit_code = 2


class ConfigError(PotstillError):
    """A config file or `--set` override is invalid."""


class DataError(PotstillError):
    """A record source is unreadable or a record breaks the schema."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class TrainingError(PotstillError):
    """Training cannot go on (a non-finite loss): the run's last good checkpoint is kept."""


class ModelError(PotstillError):
    """A model spec cannot be resolved, downloaded, verified or loaded."""


class NotBuiltError(PotstillError):
    """A CLI verb that exists in the command tree but is not implemented yet."""


def import_optional(module: str, error: type[PotstillError], message: str):
    """The optional dependency `module`, or `error(message)` (one line) when it is not
    installed; a module that is there but fails to import raises its own error, which says
    more than "not installed" would."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise error(message) from None

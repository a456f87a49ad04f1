"""One error tree for the whole project.

The CLI maps these to exit codes and the HTTP layer to status codes, each in one place.
"""


class NtkMirrorError(Exception):
    """Base of every error ntkmirror raises on purpose."""

    exit_code = 1


class DataError(NtkMirrorError, ValueError):
    """Training/eval data is malformed (the message names file:line where there is one)."""

    exit_code = 2


class ConfigError(NtkMirrorError, ValueError):
    """An option or argument is invalid (bad --layers spec, bad weights, ...)."""

    exit_code = 2


class ControllerError(NtkMirrorError, ValueError):
    """A controller file or value is invalid (NaN, bad indices, unsafe pickle, ...)."""

    exit_code = 3


class ModelMismatchError(ControllerError):
    """A controller was fitted on a different model than the one it is attached to."""


class ModelLoadError(NtkMirrorError):
    """A model could not be found or loaded."""

    exit_code = 4


class StoreError(NtkMirrorError):
    """The memory store failed or is unavailable."""

    exit_code = 5


class NotFound(StoreError, KeyError):
    """No such item (or no such item visible to this tenant)."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else "not found"


class AuthError(NtkMirrorError):
    """Missing or invalid credentials."""


class QuotaError(NtkMirrorError):
    """A tenant quota or rate limit was exceeded."""

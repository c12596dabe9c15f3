"""User-facing errors.

Every problem a user can fix (a bad path, a bad value, a corrupt file) is raised as a
:class:`CompressError`. The CLI prints its message as one line on stderr and exits non-zero;
anything else is a bug and keeps its traceback.
"""


class CompressError(Exception):
    """An error caused by the user's input, with a message that says what to do."""


class ConfigError(CompressError):
    """A method or recipe configuration value is invalid; the message names the field."""

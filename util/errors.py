"""The project's error types. Everything a user can fix raises a subclass of `DCDPError`; the command
lines catch exactly these and print one line (exit 2), so any other exception is a bug and shows its
traceback."""
from __future__ import annotations


class DCDPError(Exception):
    """A user error: a bad file, value, flag or path. The message is one line naming it and the fix."""


class ConfigError(DCDPError, ValueError):
    """A configuration file, flag or override is missing, malformed, of the wrong type or out of range."""


class RunFolderError(DCDPError):
    """The run folder cannot be used: held by another run, made with other settings, not writable."""

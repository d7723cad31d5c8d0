"""Errors that the CLI turns into one line and an exit status, never a traceback."""


class MmkitError(Exception):
    """A failure the user can act on; printed as one line, exit status `exit_code`."""

    exit_code = 1


class UsageError(MmkitError):
    """Bad flag, bad config key or value, missing file named on the command line: exit 2."""

    exit_code = 2


class ConfigError(UsageError):
    """An unknown or ill-typed key in a YAML config or a `key.sub=value` override."""

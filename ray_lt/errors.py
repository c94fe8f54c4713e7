"""Exceptions shared by every stage: each message names the file, line or config key at fault."""


class RayLTError(Exception):
    """Base class of the errors ray_lt raises on bad input."""


class ConfigError(RayLTError):
    """A config file or override is invalid; the message names the key path."""


class DataError(RayLTError):
    """A data set on disk is missing, malformed or inconsistent; the message names file and line."""


class StageError(RayLTError):
    """A stage needs the output of an earlier stage that is not in the run directory."""

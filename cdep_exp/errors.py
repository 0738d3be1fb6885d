"""The errors every layer raises for a setting that cannot work, so the app can print them as one line."""
from hydra.errors import CompactHydraException


class ConfigError(ValueError):
    """A config value or a data file that cannot work; the message says which key and what to do."""


class RunFailed(CompactHydraException):
    """A run of a sweep stopped on a user error. Raised instead of exiting, so that the sweep's
    other runs go on; Hydra then ends the sweep by printing this one line, with exit status 1."""


class StorageError(ConfigError):
    """A file could not be written: the disk is full or read-only, or a file-size limit was hit.
    The message names the file and what to do."""

"""The error every layer raises for a setting that cannot work, so the app can print it as one line."""


class ConfigError(ValueError):
    """A config value or a data file that cannot work; the message says which key and what to do."""

"""One exception type for everything a user can fix (config, data, paths): the CLI prints it
as one line and exits 2, with no traceback, before any training starts."""


class MedpipeError(Exception):
    """A problem in the user's recipe, overrides, data or paths."""


class ConfigError(MedpipeError):
    """The composed configuration is invalid (unknown key, wrong type, bad stage reference...)."""

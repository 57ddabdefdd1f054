"""Errors shared across layers (plumbing): each carries a one-line message that says what was
wrong and what to do; the entry points print it without a traceback."""


class ConfigError(ValueError):
    """A configuration value is invalid. The message says which key and what to do."""


class CheckpointError(ValueError):
    """A checkpoint or model folder is damaged, cannot be found or read, or does not fit the
    configured model. The message names the folder (and the file)."""

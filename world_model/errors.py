"""User-facing errors.

Anything a user can cause (bad config, bad audio, wrong checkpoint) raises a subclass of `MelodjinnError`
whose message says what is wrong and what to do. The CLI prints it as one line; Python callers can catch it.
"""


class MelodjinnError(Exception):
    """Base class for errors caused by input, configuration or environment, not by a bug."""


class ConfigError(MelodjinnError):
    """A config key or value is wrong."""


class DataError(MelodjinnError):
    """Audio or data input is unusable (empty folder, corrupt file, wrong shape or rate)."""


class CheckpointError(MelodjinnError):
    """A checkpoint is missing, incomplete, or does not match the code or config."""

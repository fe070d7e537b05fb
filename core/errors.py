"""Exceptions callers catch without importing torch (the CLI stays fast for `upscaled status`)."""


class CheckpointError(ValueError):
    """A file that cannot be used as a generator checkpoint; the message says why."""

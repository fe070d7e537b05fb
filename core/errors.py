"""Exceptions callers catch without importing torch (the CLI stays fast for `upscaled status`)."""


class CheckpointError(ValueError):
    """A file that cannot be used as a generator checkpoint; the message says why."""


class Untrusted(CheckpointError):
    """A published model that `publish` did not write: `current` or a history line without a valid
    record, or a checkpoint whose bytes are not the ones recorded (see model/store.py)."""


class UsageError(ValueError):
    """A command-line argument that cannot work (a missing folder, say), found before any work
    starts; the CLI prints the message on one line and exits 2."""

"""Errors a user can act on.

Library code raises these and never calls ``sys.exit``; the CLI (``deit_repro.run.cli``) turns them
into one line on stderr and a non-zero exit code.
"""

from __future__ import annotations


class DeitReproError(Exception):
    """A problem with the user's input or environment, with the fix in the message.

    Args:
        what: the thing that is wrong (a params key, a path, a checkpoint), stated with its value.
        fix: what the user should do about it.
    """

    exit_code = 2

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(f"{what}; {fix}" if fix else what)


class ConfigError(DeitReproError):
    """params.yaml has an unknown key, a wrong type or an out-of-range value."""


class DataError(DeitReproError):
    """A dataset is missing, corrupt or has the wrong shape."""


class CheckpointError(DeitReproError):
    """A checkpoint or weights file is missing, torn, of the wrong shape or fails its sha256."""


class TrainingError(DeitReproError):
    """Training cannot go on (e.g. a non-finite loss); the message names the last good
    checkpoint."""

    exit_code = 3

"""lorafit's own error type for bad user input: the CLI prints it as one line; anything else is a bug.

Every error that describes something the user can fix (a config field, a data file, an adapter or
checkpoint folder, a reward function) derives from UserError, and its message names the file, field or
value and the fix. Errors that do not derive from it are bugs in lorafit: the CLI keeps their traceback.
UserError subclasses ValueError so that callers catching ValueError keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (config, files, functions they wrote); the message says what and how to fix it."""


class CheckpointError(UserError):
    """A checkpoint folder cannot be resumed from (missing, corrupt, hostile or not matching); names the file."""

"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class HerdError(Exception):
    """Base class: the message names the file/field/value at fault and the fix."""


class CheckpointError(HerdError):
    """A checkpoint file is missing, truncated, of an unknown architecture or has wrong tensors."""


class InputError(HerdError):
    """Bad user input: prompt too long, unknown name, malformed data."""

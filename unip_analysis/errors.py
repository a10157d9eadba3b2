"""Errors a user can act on. CLIs print ``str(err)`` as one line and exit non-zero."""


class UnipError(Exception):
    """Base class: the message names the file, what was expected, what was found, what to do."""


class CheckpointError(UnipError):
    """A checkpoint file is missing, unreadable, or does not fit the requested architecture."""


class ImageError(UnipError):
    """An image file or folder cannot be used."""


class SelectionError(UnipError):
    """A layer_selection.json file is malformed or does not answer the question asked of it."""


class SpecError(UnipError):
    """A command-line specification (checkpoint spec, manifest, normalization) is malformed."""

"""Errors a user can act on. CLIs print :func:`error_line` of the error and exit non-zero."""

import re


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


def error_line(err: BaseException) -> str:
    """The error as one line. DataLoader workers re-raise with the worker's traceback in the
    message; keep only its last line, the original message."""
    msg = str(err)
    if "Original Traceback" in msg:
        last = [line for line in msg.splitlines() if line.strip()][-1].strip()
        msg = re.sub(r"^[\w.]+: ", "", last, count=1)
    if isinstance(err, OSError) and err.filename and err.strerror:
        msg = f"{err.filename}: {err.strerror}"
    return " ".join(msg.split()) or type(err).__name__

"""The one exception type for errors a user can cause."""


class ClipDecoderError(Exception):
    """A problem with user input (a file, a value, a model folder), described in its message."""

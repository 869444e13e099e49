"""The one exception type that user-facing entry points turn into a one-line `error: ...` message."""


class SpardaError(Exception):
    """Bad user input: a missing or corrupt file, an unsupported model, an impossible setting."""

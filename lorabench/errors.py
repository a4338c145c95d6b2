"""The one error type users see: a message naming the file, field or argument at fault."""


class LorabenchError(ValueError):
    """Bad input. The CLI prints its message alone (no traceback) and exits with status 2."""

"""User-facing errors.

Anything the user can fix (a missing file, a bad option, an unsupported model) raises
`EdgeloopError`. The CLI prints its message as one line and exits with code 2; every other
exception is a bug in edgeloop and keeps its traceback.
"""


class EdgeloopError(Exception):
    """A problem with the user's input, with a message that says what to do about it."""

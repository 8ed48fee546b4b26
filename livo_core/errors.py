"""The one error type livo raises for bad input: its message names the problem and the fix."""


class LivoError(Exception):
    """A user-facing error. The CLI prints `livo: error: <message>` on one line and exits 2."""

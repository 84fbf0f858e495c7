"""The one exception type that the CLI turns into a one-line error."""


class AsrError(Exception):
    """A problem with the user's input (model, data or options).

    The CLI prints ``error: <message>`` on one line and exits with status 1.
    """


def first_line(e: Exception) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

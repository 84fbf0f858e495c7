"""The one exception type that the CLI turns into a one-line error."""


class AsrError(Exception):
    """A problem with the user's input (model, data or options).

    The CLI prints ``error: <message>`` on one line and exits with status 1.
    """

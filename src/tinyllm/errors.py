"""The base of every user-facing error: the CLI prints it as one line (exit 2), the server maps it to HTTP."""


class TinyLLMError(Exception):
    """A problem the user can fix (bad input, missing file or asset, mismatched checkpoint).

    Its message is complete and says what to do; it is shown without a traceback.
    """

"""The one exception type for a user's mistake.

A missing file, a malformed line, a corrupt or mismatched checkpoint, a bad flag value: each raises `GemmaError`
with a one-line message that says what and where. Command-line tools turn it into `error: <message>` on stderr and
exit status 2 (see `gemma.cli.main_guard`); anything else is a bug and keeps its traceback.
"""


class GemmaError(Exception):
    """A user's mistake, explained in one line."""

    def __init__(self, message: str):
        # One line, always: a message built from file contents must not smuggle in a newline.
        super().__init__(" ".join(str(message).split()))

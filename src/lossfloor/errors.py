"""The one exception a user sees: a bad input, reported as one line and exit code 2."""


class UserError(Exception):
    """A problem with the user's input. The message says what is wrong and how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))

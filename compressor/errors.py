"""The one exception type a user can cause. The CLI prints its message as a single sentence and
exits with its code; everything else is a bug and keeps its traceback."""


class UserError(Exception):
    """A failure caused by the user's input or environment (bad path, bad profile, full disk...)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code

"""Errors a user can fix. The CLI prints them and exits with status 2; anything else is a bug."""


class PeftuneError(Exception):
    """A problem with the user's input (config, data, paths) — printed without a traceback, exit 2."""

    exit_code = 2


class TrainingInterrupted(PeftuneError):
    """SIGINT/SIGTERM: the step finished, a checkpoint was written; exit 128 + signal number (130 / 143)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

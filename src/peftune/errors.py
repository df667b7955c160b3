"""Errors a user can fix. The CLI prints them and exits with status 2; anything else is a bug."""


class PeftuneError(Exception):
    """A problem with the user's input (config, data, paths) — printed without a traceback, exit 2."""

    exit_code = 2

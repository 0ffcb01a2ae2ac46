"""Errors a user can act on: one line, what was wrong and what to do; the CLI exits non-zero."""


class UserError(Exception):
    """A problem with input or environment that the user can fix; never a bug."""

    exit_code = 2

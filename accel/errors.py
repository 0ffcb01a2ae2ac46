"""Errors a user can act on: one line, what was wrong and what to do; the CLI exits non-zero."""

from sockops_bpf.errors import BpfError


class UserError(Exception):
    """A problem with input or environment that the user can fix; never a bug."""

    exit_code = 2


# What the CLI reports as one line: ours, and the same kind of error from the eBPF layer below us.
USER_ERRORS: tuple[type[Exception], ...] = (UserError, BpfError)

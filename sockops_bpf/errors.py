"""The one error the eBPF layer raises for what a user can fix (no root, no bpffs, no headers, no such
cgroup, nothing loaded): one line saying what was wrong and what to do. The CLI prints it and exits 2."""


class BpfError(Exception):
    """A problem with the host or the input that the user can fix; never a bug."""

    exit_code = 2

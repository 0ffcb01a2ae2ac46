"""eBPF programs (C) and the bcc loader that compiles, pins, attaches and detaches them."""

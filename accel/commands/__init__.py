"""CLI subcommands, one module per concern."""

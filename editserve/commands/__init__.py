"""Subcommands of the editserve CLI, one module per area."""

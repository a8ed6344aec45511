"""Subcommands of the ``uxnet`` CLI, one module each (see uxnet/cli.py)."""

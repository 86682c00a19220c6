"""The `melodjinn` command line: one entry point, Hydra overrides, every command also a Python function."""

from melodjinn.cli.main import COMMANDS, compose, main, run

__all__ = ["COMMANDS", "compose", "main", "run"]

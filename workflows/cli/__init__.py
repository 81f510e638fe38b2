"""`vitflow`, the command line: ``main`` (the commands: thin, each parses its arguments and calls library
code), ``shard`` (`vitflow shard ...`), ``live`` (what `vitflow run` shows while a workflow runs) and
``errors`` (how a command ends on a user mistake)."""

from workflows.cli.main import app, main

__all__ = ["app", "main"]

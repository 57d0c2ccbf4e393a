"""The `zqcompile` command line (one module per command)."""
from zqcompile.cli.main import main

__all__ = ["main"]

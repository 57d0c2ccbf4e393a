"""`python -m zqcompile ...` runs the command line (as torchrun and other launchers invoke modules)."""
import sys

from zqcompile.cli.main import main

sys.exit(main())

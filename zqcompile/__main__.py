"""`python -m zqcompile ...` runs the command line (as torchrun and other launchers invoke modules)."""
import sys

from .cli import main

sys.exit(main())

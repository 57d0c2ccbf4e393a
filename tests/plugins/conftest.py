import sys
from pathlib import Path

# this checkout's zqcompile ahead of any installed copy
sys.path.insert(0, str(Path(__file__).parents[2]))

import sys
from pathlib import Path

# the helpers next to the tests, and this checkout's zqcompile ahead of any installed copy
sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[2])]

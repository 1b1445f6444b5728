"""Benchmarks: run one with python -m bench.NAME; see the docstring of each module.

Run from the repository root, `python -m bench...` would put the source tree first on
sys.path, and its `pylayers/` has no compiled core; drop it so the installed package
(with its core) is the one measured.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

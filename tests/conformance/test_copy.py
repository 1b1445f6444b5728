"""The conformance suite (suite.py) for the copy driver."""

import os
import sys

from pylayers.mounts.copy import CopyDriver

sys.path.insert(0, os.path.dirname(__file__))

from suite import snapshotter_suite  # noqa: E402

globals().update(snapshotter_suite(CopyDriver))

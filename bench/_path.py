"""Puts the repository's root first on sys.path, so that a benchmark run as ``/usr/bin/python3 bench/X.py``
imports aqtune and the test harness (tests.helpers) from this work tree. Imported first by every benchmark."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

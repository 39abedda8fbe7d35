"""Shared test settings: deterministic, single-threaded torch where torch is installed."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

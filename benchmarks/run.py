#!/usr/bin/env python
"""Run nnfast's throughput benchmark: ``python benchmarks/run.py [options]``.

The same as ``python -m nnfast bench``; see ``nnfast/bench.py`` (or ``--help``) for the
workloads, contenders, options and how the sgemm bound is computed.
"""
import os
import sys

try:
    import nnfast  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # running from a source checkout: use the package next to this folder
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nnfast.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""``python -m nnfast train|bench``: see :mod:`nnfast.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

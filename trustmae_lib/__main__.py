"""``python -m trustmae_lib ...`` -- see :mod:`trustmae_lib.cli`."""

import sys

from trustmae_lib.cli import main

if __name__ == "__main__":
    sys.exit(main())

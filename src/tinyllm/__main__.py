"""`python -m tinyllm` runs the command line."""

import sys

from tinyllm.cli import main

if __name__ == "__main__":  # spawned training processes import this module again as "__mp_main__"
    sys.exit(main())

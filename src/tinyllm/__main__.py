"""`python -m tinyllm` runs the command line."""

import sys

from tinyllm.cli import main

sys.exit(main())

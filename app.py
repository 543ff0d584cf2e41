"""Seed entry point: `python app.py [options]` serves the trained model and GPT-2 on http://localhost:5000.

Same as `tinyllm serve [options]`.
"""

import sys
from pathlib import Path

try:
    import tinyllm  # noqa: F401
except ImportError:  # run from a clone after `pip install -r requirements.txt`, without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from tinyllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))

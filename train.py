"""Seed entry point: `python train.py [options]` trains the default model on the built-in corpus.

Same as `tinyllm train [options]`; the checkpoint it writes (runs/default) is what `python app.py` serves.
"""

import sys
from pathlib import Path

try:
    import tinyllm  # noqa: F401
except ImportError:  # run from a clone after `pip install -r requirements.txt`, without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from tinyllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

"""`python -m ofs_scale.train`: the training entry point (ofs_scale/trainer/main.py)."""

import sys

from ofs_scale.trainer.main import main

if __name__ == "__main__":
    sys.exit(main())

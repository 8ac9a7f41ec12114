"""`python -m ofs_scale SUBCOMMAND ...`: the `ofs-scale` command (ofs_scale/cli.py)."""

import sys

from ofs_scale.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m ofs_scale.cmd`: CMD analysis of a run (ofs_scale/analysis/cmd.py)."""

import sys

from ofs_scale.analysis.cmd import main

if __name__ == "__main__":
    sys.exit(main())

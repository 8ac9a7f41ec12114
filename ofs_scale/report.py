"""`python -m ofs_scale.report`: the sweep report (ofs_scale/analysis/report.py)."""

import sys

from ofs_scale.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())

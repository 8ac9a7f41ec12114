"""`python -m ofs_scale.data.prepare ...`: the same as `ofs-scale prepare ...`."""

import sys

from ofs_scale.data.prepare.cli import main

if __name__ == "__main__":
    sys.exit(main())

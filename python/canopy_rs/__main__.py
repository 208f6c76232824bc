"""``python -m canopy_rs``: the ``canopy-rs`` command line."""

import sys

from canopy_rs.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m conceptfix` runs the CLI (same as the `conceptfix` command)."""

import sys

from conceptfix.cli import main

if __name__ == "__main__":
    sys.exit(main())

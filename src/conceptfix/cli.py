"""Entry point of the `conceptfix` command (also `python -m conceptfix.cli` and `python -m conceptfix`)."""

import sys

from conceptfix.cli_app import app, main  # noqa: F401

import conceptfix.commands  # noqa: F401,E402  registers the stage commands on `app`

if __name__ == "__main__":
    sys.exit(main())

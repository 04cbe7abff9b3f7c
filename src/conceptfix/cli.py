"""Entry point of the `conceptfix` command."""

from conceptfix.cli_app import app, main  # noqa: F401

import conceptfix.commands  # noqa: F401,E402  registers the stage commands on `app`

"""Stage commands. Each module registers its command(s) on conceptfix.cli_app.app at import."""

import importlib

# One module per stage; a module that does not exist yet is simply not offered.
_STAGE_MODULES = ["predict", "generate", "filter", "analyze", "concepts", "texts", "train", "evaluate", "run"]

for _name in _STAGE_MODULES:
    try:
        importlib.import_module(f"conceptfix.commands.{_name}")
    except ModuleNotFoundError as _exc:  # only "this stage module is not written yet" is tolerated
        if _exc.name != f"conceptfix.commands.{_name}":
            raise

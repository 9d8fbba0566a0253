"""The `lora-tui` console script: no command opens the app; a command runs headless (engine/cli/)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from engine.cli.main import build_parser, run
    commands = build_parser().commands
    if any(a in commands for a in argv) or any(a in ("-h", "--help") for a in argv):
        sys.exit(run(argv))
    config_path = None
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg in ("-c", "--config") and rest:
            config_path = rest.pop(0)
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        else:
            print(f"lora-tui: error: unexpected argument {arg!r} (try lora-tui --help)", file=sys.stderr)
            sys.exit(2)
    from tui.app import LoraTuiApp
    app = LoraTuiApp(config_path)
    app.run()
    sys.exit(app.return_code or 0)

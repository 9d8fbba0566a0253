"""The `lora-tui` console script: no command opens the app; a command runs headless (engine/cli/).

`--config/-c PATH` goes before or after a command; without a command it names the app's config file."""

from __future__ import annotations

import sys

HEADLESS_FLAGS = ("-h", "--help", "--version")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from engine.cli.main import build_parser, run
    commands = build_parser().commands
    config_path = None
    rest = list(argv)
    unexpected = None
    while rest:
        arg = rest.pop(0)
        if arg in ("-c", "--config") and rest:
            config_path = rest.pop(0)  # a config file named like a command is still a config file
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg in commands or arg in HEADLESS_FLAGS:
            sys.exit(run(argv))  # a command (or help, version): argparse reads the whole line
        elif unexpected is None:
            unexpected = arg
    if unexpected is not None:
        print(f"lora-tui: error: unexpected argument {unexpected!r} (try lora-tui --help)", file=sys.stderr)
        sys.exit(2)
    from tui.app import LoraTuiApp
    app = LoraTuiApp(config_path)
    app.run()
    sys.exit(app.return_code or 0)

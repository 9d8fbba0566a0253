"""`lora-tui export` and `lora-tui import-adapter`: the model out to where people run it, and adapters in."""

from __future__ import annotations

import json

from engine.cli.args import load_cfg, progress_printer
from engine.cli.exit_codes import EXIT_OK


def cmd_export(args) -> int:
    from engine.export.formats import export
    cfg = load_cfg(args)
    show = progress_printer(f"export {args.to}")
    result = export(cfg, args.adapter, args.to, args.out, args.quant, lambda what, f: show(what, f))
    print(json.dumps(result, indent=2))
    return EXIT_OK


def cmd_import_adapter(args) -> int:
    from engine.export.peft import import_peft
    cfg = load_cfg(args)
    show = progress_printer("import")
    result = import_peft(cfg, args.peft_dir, args.out, lambda what, f: show(what, f))
    print(json.dumps(result, indent=2))
    return EXIT_OK

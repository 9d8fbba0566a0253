#!/usr/bin/env python3
"""Print the README's configuration reference (Markdown) from the config dataclasses.

  python scripts/config_reference.py          # the table to paste into README.md
  python scripts/config_reference.py --yaml   # rewrite config.yaml from the defaults
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from engine.config.loading import to_yaml  # noqa: E402
from engine.config.schema import SPECS, Config  # noqa: E402


def table() -> str:
    rows = ["| key | default | valid | what it does |", "|---|---|---|---|"]
    for path, spec in SPECS.items():
        default = yaml.safe_dump(spec.default, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append(f"| `{path}` | `{default}` | {spec.range_text()} | {spec.help.replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if "--yaml" in sys.argv:
        (ROOT / "config.yaml").write_text(to_yaml(Config()))
    else:
        print(table())

"""The real `lora-tui` command line, in-process, as the bad-input and load-error tests drive it: each call
must end with no traceback, and a failure in exactly one `lora-tui: error:` line."""

import io
import sys

from engine.cli.main import run


def cli(capsys, *args, stdin: str | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lora-tui ARGS`; `stdin`, if given, is its standard input."""
    old = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = run([str(a) for a in args])
    finally:
        sys.stdin = old
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lora-tui: error:")]
    assert len(lines) == 1, err
    return lines[0]

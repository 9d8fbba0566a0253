"""The engine never imports the UI."""

import subprocess
import sys

from helpers import ROOT


def test_engine_does_not_import_textual():
    code = ("import sys; import engine, engine.config.loading, engine.data, engine.model.loading, "
            "engine.model.embedded, engine.cli.main; "
            "assert 'textual' not in sys.modules, sorted(m for m in sys.modules if 'textual' in m)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_blas_is_reported():
    from engine import blas
    info = blas.active()
    assert info.name in {"mkl", "openblas", "reference", "accelerate", "custom"} and info.reason

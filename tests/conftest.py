import inspect
import os
from pathlib import Path

import pytest

import engine  # noqa: F401  (preloads the optimized BLAS before anything imports mlx)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A private cache dir: every test session imports the embedded model afresh (~1 s)."""
    path = tmp_path_factory.mktemp("lora-tui-cache")
    os.environ["LORA_TUI_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def embedded_dir(model_cache) -> Path:
    from engine.model.embedded import import_embedded
    return import_embedded(root=model_cache)


@pytest.fixture(scope="session")
def tokenizer(model_cache):
    """The embedded model's tokenizer: it needs the model imported, not loaded, so it does not ask for
    `embedded_dir` (asking for that marks a test as an engine test)."""
    from engine.config.schema import ModelConfig
    from engine.model.embedded import import_embedded
    from engine.model.loading import load_tokenizer
    import_embedded(root=model_cache)
    return load_tokenizer(ModelConfig(name="embedded"))


@pytest.fixture(scope="session")
def loaded_model(embedded_dir):
    from engine.config.schema import ModelConfig
    from engine.model.loading import load_model
    return load_model(ModelConfig(name="embedded"))


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory) -> Path:
    from tiny_mistral import make_tiny_mistral
    return make_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="session")
def mistral_tokenizer(mistral_dir):
    from engine.config.schema import ModelConfig
    from engine.model.loading import load_tokenizer
    return load_tokenizer(ModelConfig(name=str(mistral_dir)))


# ---------------------------------------------------------------------------------------- kinds of tests
# `pytest -m "not slow"` runs the unit tests: config, data validation, templates and masking, the one-line
# errors that need no model, layout, atomic writes, split, philox. Every engine, tui or e2e test is slow; a
# module marks a test itself where what it does shows in neither its fixtures nor its calls.
KINDS = ("engine", "tui", "e2e")
# Fixtures for the tests that load or train the embedded model, asked for directly or through another fixture.
MODEL_FIXTURES = {"embedded_dir", "loaded_model"}
# The engine's training entry points, for a test that trains without asking for a model fixture.
TRAINING_CALLS = {"TrainingRun", "run_in_thread"}
# Modules whose tests run `lora-tui` (or mlx.launch, tmux) as child processes.
E2E_MODULES = {"test_cli", "test_cli_train", "test_distributed", "test_e2e_review", "test_e2e_tmux", "test_faults",
               "test_wheel_install"}


def names_used(code) -> set[str]:
    """The global names a function's code uses, with its nested functions and comprehensions."""
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= names_used(const)
    return names


def drives_the_app(module) -> bool:
    """The module imports from the `tui` package (Pilot and snapshot tests)."""
    homes = (getattr(v, "__module__", None) or getattr(v, "__name__", "") for v in vars(module).values())
    return any(isinstance(h, str) and h.split(".")[0] == "tui" for h in homes)


def kinds_of(item: pytest.Function) -> set[str]:
    kinds = {m.name for m in item.iter_markers() if m.name in KINDS}
    if MODEL_FIXTURES & set(item.fixturenames) or TRAINING_CALLS & names_used(item.function.__code__):
        kinds.add("engine")
    if drives_the_app(item.module):
        kinds.add("tui")
    if item.module.__name__ in E2E_MODULES:
        kinds.add("e2e")
    return kinds


def pytest_collection_modifyitems(items):
    for item in items:
        kinds = kinds_of(item) if isinstance(item, pytest.Function) else set()
        for kind in sorted(kinds) + (["slow"] if kinds else []):
            item.add_marker(kind)


@pytest.fixture()
def app_in(tmp_path, monkeypatch):
    """An app whose config file is a copy of config.yaml in a temp folder (run from the repository root)."""
    import shutil

    from helpers import ROOT
    from tui.app import LoraTuiApp
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    monkeypatch.chdir(ROOT)
    return lambda: LoraTuiApp(str(tmp_path / "config.yaml"))

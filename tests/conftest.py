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
def tokenizer(embedded_dir):
    from engine.config.schema import ModelConfig
    from engine.model.loading import load_tokenizer
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

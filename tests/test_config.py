"""Configuration: defaults, round-trips, env overrides, and validation that names field and range."""

import pytest

from engine.config.loading import from_dict, load_config, save_config, set_value, to_yaml
from engine.config.schema import SPECS, Config, ConfigError
from engine.config.validation import validate
from helpers import ROOT


def errors_of(data) -> dict[str, str]:
    cfg, issues = from_dict(data)
    issues += validate(cfg)
    return {i.field: i.message for i in issues if i.severity == "error"}


BAD_VALUES = [
    ({"lora": {"rank": 0}}, "lora.rank", "0 is out of range (valid: 1 <= x <= 1024)"),
    ({"lora": {"rank": -4}}, "lora.rank", "out of range"),
    ({"lora": {"rank": 2.5}}, "lora.rank", "expected an integer, got 2.5"),
    ({"lora": {"alpha": 0}}, "lora.alpha", "valid: 0 < x <= 4096"),
    ({"lora": {"dropout": 1.0}}, "lora.dropout", "valid: 0 <= x < 1"),
    ({"lora": {"dropout": "lots"}}, "lora.dropout", "expected a number, got 'lots'"),
    ({"lora": {"target_modules": "q_proj"}}, None, None),  # a single string is accepted as a list
    ({"lora": {"target_modules": [1, 2]}}, "lora.target_modules", "expected a list of strings"),
    ({"lora": {"target_modules": []}}, "lora.target_modules", "empty"),
    ({"lora": {"num_layers": 0}}, "lora.num_layers", "0 blocks would get adapters"),
    ({"lora": {"use_dora": "maybe"}}, "lora.use_dora", "expected true or false, got 'maybe'"),
    ({"training": {"learning_rate": 0}}, "training.learning_rate", "valid: 0 < x <= 1"),
    ({"training": {"learning_rate": -1e-4}}, "training.learning_rate", "out of range"),
    ({"training": {"learning_rate": float("nan")}}, "training.learning_rate", "must be a finite number"),
    ({"training": {"learning_rate": 1e308 * 10}}, "training.learning_rate", "must be a finite number"),
    ({"training": {"batch_size": 0}}, "training.batch_size", "valid: 1 <= x <= 4096"),
    ({"training": {"batch_size": True}}, "training.batch_size", "expected an integer, got True"),
    ({"training": {"batch_size": "two"}}, "training.batch_size", "expected an integer, got 'two'"),
    ({"training": {"grad_accumulation": -1}}, "training.grad_accumulation", "out of range"),
    ({"training": {"epochs": 0, "iterations": 0}}, "training.iterations", "set epochs or iterations above 0"),
    ({"training": {"iterations": 10, "warmup_steps": 10}}, "training.warmup_steps", "never reach its peak"),
    ({"training": {"lr_schedule": "cosin"}}, "training.lr_schedule", "did you mean 'cosine'"),
    ({"training": {"max_grad_norm": -1}}, "training.max_grad_norm", "out of range"),
    ({"training": {"weight_decay": 2}}, "training.weight_decay", "valid: 0 <= x <= 1"),
    ({"training": {"seed": -5}}, "training.seed", "out of range"),
    ({"model": {"dtype": "fp16"}}, "model.dtype", "is not one of auto, float32, bfloat16, float16"),
    ({"model": {"max_seq_length": 8}}, "model.max_seq_length", "valid: 16 <= x <= 131072"),
    ({"model": {"name": ""}}, "model.name", "empty"),
    ({"model": {"name": ["a"]}}, "model.name", "expected a string"),
    ({"data": {"validation_split": 1.0}}, "data.validation_split", "valid: 0 <= x < 1"),
    ({"data": {"error_threshold": 1.5}}, "data.error_threshold", "out of range"),
    ({"data": {"path": ""}}, "data.path", "empty"),
    ({"checkpoints": {"keep_last": 0}}, "checkpoints.keep_last", "valid: 1 <= x <= 1000"),
    ({"evaluation": {"val_batches": -2}}, "evaluation.val_batches", "out of range"),
    ({"evaluation": {"top_p": 0}}, "evaluation.top_p", "valid: 0 < x <= 1"),
    ({"evaluation": {"temperature": 9}}, "evaluation.temperature", "out of range"),
    ({"output": {"log_level": "LOUD"}}, "output.log_level", "is not one of DEBUG, INFO, WARNING, ERROR"),
    ({"training": {"learning_rat": 1e-4}}, "training.learning_rat", "did you mean 'training.learning_rate'"),
    ({"trainig": {}}, "trainig", "unknown section 'trainig'"),
    ({"lora": {"learning_rate": 1e-4}}, "lora.learning_rate", "did you mean 'training.learning_rate'"),
    ({"lora": 5}, "lora", "must be a mapping"),
]


@pytest.mark.parametrize("data,field,needle", BAD_VALUES)
def test_bad_values_name_field_and_range(data, field, needle):
    errors = errors_of(data)
    if field is None:
        assert errors == {}
        return
    assert field in errors, errors
    assert needle in errors[field]


def test_every_problem_is_reported_at_once():
    errors = errors_of({"lora": {"rank": 0, "dropout": 3}, "training": {"batch_size": "x", "foo": 1}})
    assert set(errors) == {"lora.rank", "lora.dropout", "training.batch_size", "training.foo"}


def test_warnings_for_poor_but_legal_settings():
    cfg, _ = from_dict({"training": {"learning_rate": 0.5}, "lora": {"rank": 2, "alpha": 64}})
    warnings = {i.field for i in validate(cfg) if i.severity == "warning"}
    assert {"training.learning_rate", "lora.alpha"} <= warnings


def test_defaults_are_valid_and_config_yaml_is_in_step():
    assert [i for i in validate(Config()) if i.severity == "error"] == []
    assert (ROOT / "config.yaml").read_text() == to_yaml(Config()), \
        "config.yaml differs from the dataclass defaults: regenerate it with scripts/config_reference.py --yaml"
    cfg, issues = load_config(ROOT / "config.yaml", environ={})
    assert cfg == Config() and not [i for i in issues if i.severity == "error"]


def test_save_load_round_trip(tmp_path):
    cfg = Config()
    cfg.lora.rank, cfg.training.learning_rate, cfg.lora.target_modules = 8, 3e-4, ["q_proj", "k_proj", "o_proj"]
    cfg.data.train_labels, cfg.model.name = [], "mlx-community/Mistral-7B-Instruct-v0.3-4bit"
    save_config(cfg, tmp_path / "c.yaml")
    loaded, _ = load_config(tmp_path / "c.yaml", environ={})
    assert loaded == cfg
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


def test_environment_overrides():
    cfg, _ = load_config(None, environ={"LORA_TUI__TRAINING__LEARNING_RATE": "3e-4",
                                        "LORA_TUI__LORA__TARGET_MODULES": "[q_proj, v_proj, o_proj]",
                                        "LORA_TUI__DATA__SHUFFLE": "false"})
    assert cfg.training.learning_rate == 3e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj", "o_proj"]
    assert cfg.data.shuffle is False
    with pytest.raises(ConfigError, match="LORA_TUI__TRAINING__LEARNING_RATE"):
        load_config(None, environ={"LORA_TUI__TRAINING__LEARNING_RATES": "1"})
    with pytest.raises(ConfigError, match="training.batch_size: from LORA_TUI__TRAINING__BATCH_SIZE"):
        load_config(None, environ={"LORA_TUI__TRAINING__BATCH_SIZE": "big"})


def test_yaml_errors_name_the_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  rank: 8\n   alpha: [\n")
    with pytest.raises(ConfigError, match=r"c.yaml:3:\d+: invalid YAML"):
        load_config(p, environ={})


@pytest.mark.parametrize("text,needle", [
    ("a: &a [1,1,1]\nb: &b [*a,*a,*a]\nc: [*b,*b,*b]\n", "aliases"),
    ("model: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
    ("- just\n- a list\n", "must be a mapping of sections"),
])
def test_unsafe_or_wrong_yaml_is_refused(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(p, environ={})


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", environ={})
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, environ={})


def test_set_value_from_a_form():
    cfg = Config()
    assert set_value(cfg, "training.learning_rate", "2e-4") is None and cfg.training.learning_rate == 2e-4
    issue = set_value(cfg, "lora.rank", "0")
    assert issue.field == "lora.rank" and "1 <= x <= 1024" in issue.message and cfg.lora.rank == 16


def test_readme_reference_lists_every_key_with_its_default():
    import subprocess
    import sys
    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py")],
                           capture_output=True, text=True, check=True).stdout
    readme = (ROOT / "README.md").read_text()
    assert table.strip() in readme, "README's configuration reference is stale: run scripts/config_reference.py"
    for path in SPECS:
        assert f"`{path}`" in readme


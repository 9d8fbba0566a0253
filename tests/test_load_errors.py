"""Models and adapters that cannot be used, through the real `lora-tui` command line (in-process), with the
embedded model and the tiny Mistral: fuse never writes or vouches for NaN weights, adapters for another base
are refused, a run folder is taken as its adapter, damaged caches and unwritable places are one line each.
(The generated variants of each case are in tests/test_bad_input.py.)"""

import json
import os
import shutil
from pathlib import Path

import pytest

from engine.cli.exit_codes import EXIT_CONFIG, EXIT_MODEL, EXIT_OK, EXIT_TRAINING
from helpers import cli, increments, one_error_line, tiny_yaml, write_jsonl


def make_adapter(model_name: str, folder: Path, rank: int = 4, num_layers: int = 2) -> Path:
    """A real adapter of `model_name`, with non-zero lora_b as a trained one has."""
    import mlx.core as mx

    from engine.model.adapters import apply_lora, save_adapters
    from engine.config.schema import LoRAConfig, ModelConfig
    from engine.model.loading import load_model
    model, _, _ = load_model(ModelConfig(name=model_name))
    acfg = apply_lora(model, LoRAConfig(rank=rank, num_layers=num_layers), lean=False)
    save_adapters(model, acfg, folder)
    mx.random.seed(1)
    weights = {k: mx.random.normal(v.shape) * 0.01 if k.endswith("lora_b") else v
               for k, v in mx.load(str(folder / "adapters.safetensors")).items()}
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    return folder


@pytest.fixture(scope="module")
def adapter(embedded_dir, tmp_path_factory) -> Path:
    return make_adapter("embedded", tmp_path_factory.mktemp("smol") / "adapter")


@pytest.fixture(scope="module")
def mistral_adapter(mistral_dir, tmp_path_factory) -> Path:
    return make_adapter(str(mistral_dir), tmp_path_factory.mktemp("mistral") / "adapter", rank=2)


def with_scale(adapter: Path, tmp_path: Path, raw_scale: str) -> Path:
    """A copy whose adapter_config.json says "scale": <raw_scale> (Python's json reads NaN and Infinity)."""
    folder = tmp_path / "scaled"
    shutil.copytree(adapter, folder)
    text = (folder / "adapter_config.json").read_text()
    (folder / "adapter_config.json").write_text(text.replace('"scale": 8.0', f'"scale": {raw_scale}'))
    assert raw_scale in (folder / "adapter_config.json").read_text()
    return folder


@pytest.mark.parametrize("raw_scale", ["NaN", "Infinity", "-Infinity"])
def test_fuse_refuses_a_non_finite_scale_before_writing(raw_scale, adapter, tmp_path, capsys):
    """The issue's case: a NaN scale used to write NaN weights and report same_greedy_output: true."""
    folder = with_scale(adapter, tmp_path, raw_scale)
    code, out, err = cli(capsys, "fuse", "--adapter", folder, "--out", tmp_path / "fused")
    assert code == EXIT_MODEL, (code, out, err)
    assert "lora_parameters.scale" in one_error_line(err) and "not a finite number" in err
    assert out == "" and not (tmp_path / "fused").exists()


def test_fuse_refuses_an_extreme_scale_whose_outputs_are_not_finite(adapter, tmp_path, capsys):
    """Finite but huge: base + adapter's logits overflow (in float16), so equal replies would prove nothing."""
    folder = with_scale(adapter, tmp_path, "1e6")
    config = tmp_path / "c.yaml"
    config.write_text("model: {dtype: float16}\n")
    code, out, err = cli(capsys, "--config", config, "fuse", "--adapter", folder, "--out", tmp_path / "fused")
    assert code == EXIT_MODEL, (code, out, err)
    assert "NaN or infinite outputs" in one_error_line(err) and not (tmp_path / "fused").exists()


def test_fuse_checks_the_fused_weights_not_only_the_reply(mistral_dir, mistral_adapter, tmp_path, capsys):
    """A base with NaN in the embedding of a token the check never reads (</s>): base + adapter and the
    fused model answer the check prompt alike, but the fused model is broken: refused, nothing written."""
    import mlx.core as mx
    base = tmp_path / "base"
    base.mkdir()
    for f in mistral_dir.iterdir():
        if f.name != "model.safetensors":
            os.symlink(f, base / f.name)
    weights = mx.load(str(mistral_dir / "model.safetensors"))
    eos = json.loads((mistral_dir / "config.json").read_text())["eos_token_id"]
    embed = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = mx.where(mx.arange(embed.shape[0])[:, None] == eos, float("nan"), embed)
    mx.save_safetensors(str(base / "model.safetensors"), weights)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {json.dumps(str(base))}}}\n")
    code, out, err = cli(capsys, "--config", config, "fuse", "--adapter", mistral_adapter, "--out", tmp_path / "fused")
    assert code == EXIT_TRAINING, (code, out, err)
    line = one_error_line(err)
    assert "NaN or infinite weights in model.embed_tokens.weight" in line and "nothing was written" in line
    assert not (tmp_path / "fused").exists()


def test_fuse_takes_a_run_folder_and_an_empty_out_folder(adapter, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "r"
    shutil.copytree(adapter, run_dir / "adapter")
    (run_dir / "checkpoints").mkdir()
    (tmp_path / "fused").mkdir()  # empty: allowed
    code, out, err = cli(capsys, "fuse", "--adapter", run_dir, "--out", tmp_path / "fused")
    assert code == EXIT_OK, err
    result = json.loads(out)
    assert result["finite_output"] is True and result["same_greedy_output"] is True
    assert result["fused_reply"] == result["adapter_reply"] != ""
    assert (tmp_path / "fused" / "config.json").is_file()


def test_chat_takes_a_run_folder(adapter, tmp_path, capsys):
    shutil.copytree(adapter, tmp_path / "r" / "adapter")
    code, out, err = cli(capsys, "chat", "--adapter", tmp_path / "r", "--max-tokens", "4", stdin="hi\n")
    assert code == EXIT_OK, err
    assert out.strip()


@pytest.mark.engine  # loads the embedded model to fit the tiny Mistral's adapter to it
@pytest.mark.parametrize("command", ["chat", "fuse", "eval-only"])
def test_an_adapter_of_another_base_does_not_fit(command, mistral_adapter, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text('evaluation: {heldout_path: ""}\n')
    argv = {"chat": ["chat", "--adapter", mistral_adapter],
            "fuse": ["fuse", "--adapter", mistral_adapter, "--out", tmp_path / "fused"],
            "eval-only": ["train", "--eval-only", "--resume", mistral_adapter]}[command]
    code, out, err = cli(capsys, "--config", config, *argv, stdin="hi\n")
    assert code == EXIT_MODEL, (code, out, err)
    line = one_error_line(err)
    assert f"{mistral_adapter}: does not fit the base model embedded" in line and "no place in this model" in line, line
    assert not (tmp_path / "fused").exists()


def test_eval_only_on_a_cut_checkpoint_adapter_names_the_file(adapter, tmp_path, capsys):
    step = tmp_path / "runs" / "r" / "checkpoints" / "step_000004"
    shutil.copytree(adapter, step)
    (step / "trainer_state.json").write_text('{"step": 4}')
    raw = (step / "adapters.safetensors").read_bytes()
    (step / "adapters.safetensors").write_bytes(raw[:len(raw) // 2])
    config = tmp_path / "c.yaml"
    config.write_text('evaluation: {heldout_path: ""}\n')
    code, out, err = cli(capsys, "--config", config, "train", "--eval-only", "--resume", step)
    assert code == EXIT_MODEL, (code, out, err)
    assert f"{step / 'adapters.safetensors'}: not a readable safetensors file" in one_error_line(err)


@pytest.mark.parametrize("damage", ["tokenizer.json", "model.safetensors"])
def test_train_on_a_damaged_model_exits_4(damage, embedded_dir, tmp_path, capsys):
    base = tmp_path / "base"
    base.mkdir()
    for f in embedded_dir.iterdir():
        if f.name != damage:
            os.symlink(f, base / f.name)
    raw = (embedded_dir / damage).read_bytes()
    (base / damage).write_bytes(raw[:len(raw) // 2])
    data = write_jsonl(tmp_path / "d.jsonl", increments(8))
    config = tiny_yaml(tmp_path, "c.yaml", model={"name": str(base)}, data={"path": str(data)},
                       training={"iterations": 2, "warmup_steps": 0})
    code, out, err = cli(capsys, "--config", config, "train")
    assert code == EXIT_MODEL, (code, out, err)
    assert f"{base / damage}: " in one_error_line(err) and "the model folder is damaged" in err


def test_a_damaged_embedded_import_says_to_delete_it(embedded_dir, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(embedded_dir, cache / embedded_dir.name)
    weights = cache / embedded_dir.name / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setenv("LORA_TUI_CACHE", str(cache))
    code, out, err = cli(capsys, "chat", stdin="hi\n")
    assert code == EXIT_MODEL, (code, out, err)
    line = one_error_line(err)
    assert f"{weights}: not a complete safetensors file" in line and f"delete {weights.parent}" in line


@pytest.mark.parametrize("cache_dir,needle", [("/proc/lora-tui-cache", "model.cache_dir: cannot import"),
                                              ("~no-such-user-here/cache", "model.cache_dir: '~no-such-user-here")])
def test_unusable_cache_dir_for_the_embedded_model(cache_dir, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LORA_TUI_CACHE", raising=False)  # model.cache_dir is used only without it
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{cache_dir: {json.dumps(cache_dir)}}}\n")
    code, out, err = cli(capsys, "--config", config, "import-model")
    assert code == EXIT_MODEL, (code, out, err)
    assert needle in one_error_line(err)


def test_iterations_below_zero_is_refused_not_ignored(tmp_path, capsys, monkeypatch):
    """`--iterations -5` used to be ignored (the run trained its 32 epoch steps)."""
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "train", "--iterations", "-5")
    assert code == EXIT_CONFIG
    assert one_error_line(err) == ("lora-tui: error: train: argument --iterations: -5 is out of range "
                               "(valid: 0 <= x <= 10000000) (as training.iterations) (see lora-tui train --help)")
    assert list(tmp_path.iterdir()) == []


def test_chat_skips_a_line_that_is_not_utf8(embedded_dir):
    """Bytes that are not UTF-8 on stdin (read with surrogateescape) used to crash the tokenizer."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "tui", "chat", "--max-tokens", "4"], cwd=root, capture_output=True,
                       input=b"\xff\xfehello\nhi\n", timeout=300, env={**os.environ, "LC_ALL": "C"})
    err = r.stderr.decode(errors="replace")
    assert r.returncode == EXIT_OK and "Traceback" not in err, err
    assert "that line is not UTF-8 text: skipped" in err and r.stdout.strip()  # the next line is answered


def test_chat_system_prompt_must_be_text(capsys):
    code, out, err = cli(capsys, "chat", "--system", "caf\udce9")
    assert code == EXIT_CONFIG and one_error_line(err) == "lora-tui: error: --system: not UTF-8 text"


def test_chat_goes_on_after_the_template_refuses_one_turn(embedded_dir, tmp_path, capsys):
    """A template that refuses one conversation (raise_exception) used to end chat with a traceback; one
    that cannot render any first turn is refused at once (tests/test_bad_input.py)."""
    base = tmp_path / "base"
    base.mkdir()
    for f in embedded_dir.iterdir():
        if f.name != "tokenizer_config.json":
            os.symlink(f, base / f.name)
    tok_cfg = json.loads((embedded_dir / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = ("{% if 'boom' in messages[-1]['content'] %}{{ raise_exception('no boom here') }}"
                                "{% endif %}" + tok_cfg["chat_template"])
    (base / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {json.dumps(str(base))}}}\n")
    code, out, err = cli(capsys, "--config", config, "chat", "--max-tokens", "4", "--temperature", "0",
                         stdin="boom\nhi\n")
    assert code == EXIT_OK, err
    assert "lora-tui: no answer:" in err and "no boom here" in err and "lora-tui: error:" not in err
    assert out.strip()  # the second line was answered


def test_eval_only_latest_is_the_named_runs_adapter(adapter, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f'evaluation: {{heldout_path: ""}}\noutput: {{dir: {json.dumps(str(tmp_path / "runs"))}}}\n')
    code, out, err = cli(capsys, "--config", config, "train", "--eval-only", "--resume", "latest")
    assert code == EXIT_CONFIG and "needs output.run_name" in one_error_line(err)
    (tmp_path / "runs" / "r" / "checkpoints").mkdir(parents=True)  # interrupted: no adapter/ yet
    code, out, err = cli(capsys, "--config", config, "train", "--eval-only", "--resume", "latest", "--run-name", "r")
    assert code == EXIT_MODEL and "name one of its checkpoints" in one_error_line(err)

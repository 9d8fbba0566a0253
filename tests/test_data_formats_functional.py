"""Data in any shape, as a user meets it: `lora-tui validate` on every container at once (a weighted mix of
six files, each written by its own library), a training run on a mix of a CSV and a Parquet file, the
Dataset screen on a Parquet file with a broken row, and the column map edited in the Config form."""

import json

import pytest
from textual.widgets import DataTable, Input, Static

from engine.config.loading import load_config
from engine.train.run import TrainingRun
from helpers import addition_chats, lora_tui, tiny_config, tiny_yaml, write_jsonl
from tui_helpers import wait_for

SIZE = (120, 40)


def _alpaca(rows: list[dict]) -> list[dict]:
    """The addition chats as Alpaca rows (instruction / output)."""
    return [{"instruction": r["messages"][0]["content"], "output": r["messages"][1]["content"]} for r in rows]


def every_container(tmp_path) -> dict[str, str]:
    """The same 40 chats in six containers, each written by its own library."""
    import datasets
    import pandas as pd
    import pyarrow as pa
    import pyarrow.feather as feather
    rows = addition_chats(40)
    out = {"jsonl": write_jsonl(tmp_path / "a.jsonl", rows)}
    out["json"] = tmp_path / "b.json"
    out["json"].write_text(json.dumps(rows, indent=2))
    out["csv"] = tmp_path / "c.csv"
    pd.DataFrame(_alpaca(rows)).to_csv(out["csv"], index=False)
    out["parquet"] = tmp_path / "d.parquet"
    pd.DataFrame(rows).to_parquet(out["parquet"])
    out["arrow"] = tmp_path / "e.arrow"
    feather.write_feather(pa.Table.from_pylist(rows), out["arrow"])
    out["datasets"] = tmp_path / "f_saved"
    datasets.Dataset.from_list(_alpaca(rows)).save_to_disk(str(out["datasets"]))
    return {k: str(v) for k, v in out.items()}


@pytest.mark.e2e
def test_validate_reads_every_container_in_one_mix(tmp_path):
    files = every_container(tmp_path)
    mix = ",".join(f"{path}*1" for path in files.values())
    done = lora_tui("validate", "--dataset", mix)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for shape in ("JSONL", "JSON array", "CSV", "Parquet", "Arrow", "`datasets` folder"):
        assert f": {shape}; rows:" in out
    assert "rows: alpaca 40" in out and "rows: chat 40" in out
    assert out.count("mix: ") == 6 and "17% of the training mix" in out
    assert "240 of 240 conversations valid" in out


@pytest.mark.e2e
def test_validate_names_a_broken_parquet_row_and_fails(tmp_path):
    import pandas as pd
    rows = _alpaca(addition_chats(20))
    rows[3]["output"] = "  "
    rows[7]["instruction"] = None  # a null cell: a missing instruction
    pd.DataFrame(rows).to_parquet(tmp_path / "bad.parquet")
    done = lora_tui("validate", "--no-tokenize", "--dataset", tmp_path / "bad.parquet")
    assert done.returncode == 3
    assert "bad.parquet:row 3: output: empty output" in done.stdout
    assert "dataset rejected: 2 of 20 rows are bad" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_run_trains_on_a_weighted_mix_of_csv_and_parquet(tmp_path, embedded_dir):
    import pandas as pd
    pd.DataFrame(_alpaca(addition_chats(30, seed=2))).to_csv(tmp_path / "mine.csv", index=False)
    pd.DataFrame(addition_chats(30, seed=3)).to_parquet(tmp_path / "general.parquet")
    sources = [{"path": str(tmp_path / "mine.csv"), "weight": 3.0},
               {"path": str(tmp_path / "general.parquet"), "weight": 1.0}]
    cfg = tiny_config(tmp_path, data={"path": sources}, training={"iterations": 2})
    cfg_path = tiny_yaml(tmp_path, "mix.yaml", data={"path": sources}, training={"iterations": 2})
    assert load_config(cfg_path)[0].data.path == sources  # the list survives the YAML round trip
    events = []
    result = TrainingRun(cfg, [events.append]).run()
    assert result.status == "finished", result.message
    started = next(e for e in events if e.kind == "Started")
    # 30 + 30 rows, 20% validation each: 24 + 24 train rows mixed 3:1 = 36 + 12; 6 + 6 validation rows
    assert (started.train_examples, started.valid_examples) == (48, 12)
    assert any("mine.csv [CSV]: weight 3 = 75% of the training mix" in line for line in started.data)
    log = (result.run_dir / "train.log").read_text()
    assert "data: mix: " in log and "general.parquet: Parquet; rows: chat 30" in log


@pytest.mark.tui
async def test_dataset_screen_on_a_parquet_file_names_rows_and_previews_them(app_in, tmp_path, embedded_dir):
    import pandas as pd
    rows = _alpaca(addition_chats(40))
    rows[5]["output"] = ""
    pd.DataFrame(rows).to_parquet(tmp_path / "alpaca.parquet")
    app = app_in()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        await pilot.pause()
        app.screen.query_one("#dataset-path", Input).value = str(tmp_path / "alpaca.parquet")
        await pilot.click("#validate")
        table = app.screen.query_one("#dataset-errors", DataTable)
        await wait_for(pilot, lambda: table.row_count > 0, what="the validation report")
        summary = str(app.screen.query_one("#dataset-summary", Static).render())
        assert "Parquet; rows: alpaca 39" in summary and "1 bad rows" in summary
        assert table.get_row_at(0)[0] == "row 5"
        table.focus()
        await pilot.pause()
        preview = str(app.screen.query_one("#line-preview", Static).render())
        assert preview.startswith("row 5: {") and '"instruction"' in preview
        assert "row 0 through the chat template" in str(app.screen.query_one("#rendered", Static).render())


@pytest.mark.tui
async def test_config_form_edits_the_column_map_and_refuses_an_unknown_field(app_in, tmp_path, embedded_dir):
    app = app_in()
    async with app.run_test(size=SIZE) as pilot:
        columns = app.screen.query_one("#f-data--columns", Input)
        columns.value = "promt=question"
        await pilot.pause()
        assert "did you mean 'prompt'" in str(app.screen.query_one("#f-data--columns-msg", Static).render())
        columns.value = "prompt=question, completion=answer, label=rating"
        app.screen.query_one("#f-data--path", Input).value = "data/tool_calls.jsonl*0.7, mine.csv*0.3"
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause()
    saved, _ = load_config(tmp_path / "config.yaml", environ={})
    assert saved.data.columns == {"prompt": "question", "completion": "answer", "label": "rating"}
    assert saved.data.path == [{"path": "data/tool_calls.jsonl", "weight": 0.7}, {"path": "mine.csv", "weight": 0.3}]

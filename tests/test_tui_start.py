"""The app opens on the default config and checks the sample dataset on a worker thread."""

from textual.widgets import DataTable, Static

from tui.app import LoraTuiApp


async def test_app_opens_and_validates_the_sample_dataset(embedded_dir):
    app = LoraTuiApp("config.yaml")
    async with app.run_test(size=(120, 40)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        status = str(app.query_one("#status", Static).render())
        assert "Dataset ok" in status and "1200 of 1200 conversations valid" in status
        assert "model embedded" in str(app.query_one("#config", Static).render())


async def test_app_shows_bad_lines(embedded_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  path: tests/fixtures/malformed.jsonl\n")
    app = LoraTuiApp(str(cfg))
    async with app.run_test(size=(120, 40)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "rejected" in str(app.query_one("#status", Static).render())
        table = app.query_one("#issues", DataTable)
        assert table.row_count == 25
        assert table.get_row_at(0) == ["2", "", "invalid JSON: Expecting value at column 20"]

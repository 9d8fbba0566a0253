"""The Chat screen's Export dialog (ctrl+g) drives a real export on the engine thread: a progress bar, then
the file's path and size; a refusal (the file exists) is shown in the dialog, and nothing is overwritten."""

from textual.widgets import Input, Select, Static

from tui.app import LoraTuiApp
from tui_helpers import wait_for

SIZE = (120, 40)


def status(dialog) -> str:
    return str(dialog.query_one("#export-status", Static).render())


async def test_export_dialog_writes_a_gguf_and_shows_its_size(tmp_path, embedded_dir, monkeypatch):
    app = LoraTuiApp(None)
    app.cfg.output.dir = str(tmp_path / "runs")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f4")
        await pilot.pause()
        await pilot.press("ctrl+g")
        await pilot.pause()
        dialog = app.screen
        out = dialog.query_one("#export-out", Input)
        assert out.value == str(tmp_path / "runs" / "exports" / "base-gguf-q8_0.gguf")
        dialog.query_one("#export-format", Select).value = "peft"
        await pilot.pause()
        assert dialog.query_one("#export-quant", Select).disabled and out.value.endswith("base-peft")
        dialog.query_one("#export-format", Select).value = "gguf"
        dialog.query_one("#export-quant", Select).value = "q4_0"
        await pilot.pause()
        await pilot.click("#export-start")
        await wait_for(pilot, lambda: "Wrote" in status(dialog), timeout=120, what="the export")
        path = tmp_path / "runs" / "exports" / "base-gguf-q4_0.gguf"
        size_mb = path.stat().st_size / 1e6
        assert f"{path} ({size_mb:.1f} MB" in status(dialog)
        await pilot.click("#export-start")  # again, to the same file: refused, nothing overwritten
        await wait_for(pilot, lambda: "exists; name a new file" in status(dialog), timeout=60, what="the refusal")
        assert path.stat().st_size / 1e6 == size_mb

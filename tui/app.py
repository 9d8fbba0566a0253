"""lora-tui's Textual app: four screens (config, dataset, train, chat) over one engine thread.

The engine (engine.worker.EngineWorker) runs in a Textual thread worker for the app's whole life and owns
every MLX call. Screens submit typed commands; engine events come back as EngineMessage and are routed
to the screen that shows them. Quitting during training asks, stops the run (which saves a checkpoint)
and exits with code 0.
"""

from __future__ import annotations

import gc
from pathlib import Path

from textual import work
from textual.app import App
from textual.binding import Binding

from engine.config.schema import Config, ConfigError
from tui.messages import EngineMessage
from tui.screens.chat_screen import ChatScreen
from tui.screens.config_screen import ConfigScreen, load_config_and_file
from tui.screens.confirm import ConfirmScreen
from tui.screens.dataset_screen import DatasetScreen
from tui.screens.train_screen import TrainScreen


class LoraTuiApp(App[int]):
    TITLE = "lora-tui"
    # Every screen's stylesheet is read at start-up: a stylesheet first read when its screen opens makes
    # Textual re-parse and re-apply all CSS to every widget of the app, which cost up to 0.7 s per first
    # visit on 2 cores during training.
    CSS_PATH = ["app.tcss", "screens/config_screen.tcss", "screens/dataset_screen.tcss",
                "screens/train_screen.tcss", "screens/chat_screen.tcss"]
    MODES = {"config": ConfigScreen, "dataset": DatasetScreen, "train": TrainScreen, "chat": ChatScreen}
    DEFAULT_MODE = "config"
    BINDINGS = [
        Binding("f1", "switch_mode('config')", "Config", id="config"),
        Binding("f2", "switch_mode('dataset')", "Dataset", id="dataset"),
        Binding("f3", "switch_mode('train')", "Train", id="train"),
        Binding("f4", "switch_mode('chat')", "Chat", id="chat"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, config_path: str | None = None) -> None:
        super().__init__()
        if config_path is None and Path("config.yaml").is_file():
            config_path = "config.yaml"
        self.config_path = config_path
        self.config_errors: list = []
        try:
            self.cfg, self.file_cfg, self.config_warnings, self.unreadable_fields = load_config_and_file(config_path)
            self.config_errors = [i for i in self.config_warnings if i.severity == "error"]
        except ConfigError as exc:  # unreadable file: start from defaults and say so
            self.cfg, self.file_cfg, self.config_warnings, self.unreadable_fields = Config(), Config(), [], {}
            self.config_errors = exc.issues
        self.dirty = False
        self.training = False
        self.control = None  # RunControl of the run in progress
        self.last_run_dir: str | None = None
        self._quitting = False
        from engine.worker import EngineWorker
        self.engine = EngineWorker(lambda payload: self.post_message(EngineMessage(payload)))

    def on_mount(self) -> None:
        self.sub_title = self.config_path or "built-in defaults"
        self.run_engine()
        for issue in self.config_errors:
            self.notify(f"{issue.field}: {issue.message}" if issue.field else issue.message,
                        title="Config error", severity="error", timeout=8)
        self.call_after_refresh(self.set_timer, 0.3, self._build_next_screen)

    def _build_next_screen(self) -> None:
        """Build the screens not yet shown, one per tick once the first frame is up, so that the first F2,
        F3 or F4 only has to show a screen (composing one costs 0.1-0.3 s on 2 cores). Textual has no
        public call to build a mode's screen without showing it: this uses `App._init_mode` (Textual 8
        and later) and, where that is missing, screens are simply built on first visit."""
        init_mode = getattr(self, "_init_mode", None)
        pending = [m for m in self.MODES if m not in self._screen_stacks]
        if init_mode is None or not pending or not self.is_running:
            return
        init_mode(pending[0])
        # Its widgets take their styles from the current stylesheet as they mount; without this mark the
        # first switch to it would re-parse and re-apply all the app's CSS once more (0.2 s).
        self._screen_stacks[pending[0]][0]._css_update_count = self._css_update_count
        if len(pending) > 1:
            self.set_timer(0.2, self._build_next_screen)
        else:
            # Start-up objects (imports, screens, widgets) live as long as the app: keep them out of the
            # garbage collector's full passes, which otherwise stall a frame now and then.
            gc.freeze()

    @work(thread=True, exclusive=True, group="engine", exit_on_error=False, name="engine")
    def run_engine(self) -> None:
        from textual.worker import get_current_worker
        worker = get_current_worker()
        self.engine.serve(lambda: worker.is_cancelled)

    def on_unmount(self) -> None:
        # However the app ends, let the engine thread finish (a run in progress is stopped first).
        if self.control is not None:
            self.control.stop()
        from engine.protocol import CancelGeneration, Shutdown
        self.engine.submit(CancelGeneration())
        self.engine.submit(Shutdown())

    def submit(self, command) -> None:
        self.engine.submit(command)

    # ------------------------------------------------------------ routing engine traffic

    def on_engine_message(self, message: EngineMessage) -> None:
        payload = message.payload
        kind = type(payload).__name__
        if kind == "TrainingStarted":
            self.training, self.control = True, payload.control
        elif kind == "TrainingEnded":
            self.training, self.control = False, None
            self.last_run_dir = payload.run_dir or self.last_run_dir
            if self._quitting:
                self._stop_engine_and_exit()
                return
        elif kind == "EngineError":
            self.notify(payload.message, title=payload.what.capitalize(), severity="error", timeout=10)
        for mode in ("dataset", "train", "chat"):
            screen = self._screen_for(mode)
            if screen is not None:
                screen.handle_engine(payload)

    def _screen_for(self, mode: str):
        try:
            stack = self._screen_stacks.get(mode)
        except AttributeError:
            return None
        return stack[0] if stack else None

    # ------------------------------------------------------------ quitting

    async def action_quit(self) -> None:
        if self.training:
            def answer(stop: bool | None) -> None:
                if stop:
                    self._quitting = True
                    self.notify("Stopping: saving a checkpoint first…", timeout=30)
                    self.control.stop()
            self.push_screen(ConfirmScreen("Training is running. Stop it (a checkpoint is saved first) and quit?",
                                           yes="Stop and quit"), answer)
            return
        if self.dirty:
            def discard(yes: bool | None) -> None:
                if yes:
                    self._stop_engine_and_exit()
            self.push_screen(ConfirmScreen("The configuration has unsaved changes. Quit without saving?",
                                           yes="Discard and quit"), discard)
            return
        self._stop_engine_and_exit()

    def _stop_engine_and_exit(self) -> None:
        from engine.protocol import Shutdown
        self.engine.submit(Shutdown())
        self.exit(0)

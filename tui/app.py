"""lora-tui's Textual app: six screens (config, dataset, train, chat, runs, review) over one engine thread.

The engine (engine.worker.EngineWorker) runs in a Textual thread worker for the app's whole life and owns
every MLX call. Screens submit typed commands; engine results come back as tui.messages (one class per
kind) through the app's queue, and the app posts each on to the screen that owns its kind. Quitting
during training asks, stops the run (which saves a checkpoint) and exits with code 0.
"""

from __future__ import annotations

import gc
from pathlib import Path

from textual import on, work
from textual.app import App
from textual.binding import Binding

from engine.config.schema import Config, ConfigError
from engine.protocol import CancelGeneration, Command, Result, Shutdown
from tui import messages as msg
from tui.screens.chat_screen import ChatScreen
from tui.screens.config_screen import ConfigScreen, load_config_and_file
from tui.screens.confirm import ConfirmScreen
from tui.screens.dataset_screen import DatasetScreen
from tui.screens.review_screen import ReviewScreen
from tui.screens.runs_screen import RunsScreen
from tui.screens.train_screen import TrainScreen


NO_CONFIG_OFFER = ("Running on the built-in defaults. ctrl+s on the Config screen (F1) writes them to "
                   "./config.yaml; `lora-tui init` also writes the sample data (data/).")


class LoraTuiApp(App[int]):
    TITLE = "lora-tui"
    # Every screen's stylesheet is read at start-up: a stylesheet first read when its screen opens makes
    # Textual re-parse and re-apply all CSS to every widget of the app, which cost up to 0.7 s per first
    # visit on 2 cores during training.
    CSS_PATH = ["app.tcss", "screens/config_screen.tcss", "screens/dataset_screen.tcss",
                "screens/train_screen.tcss", "screens/chat_screen.tcss", "screens/runs_screen.tcss",
                "screens/review_screen.tcss"]
    # Each mode shows one installed screen, of the same name: installed screens are never destroyed, and the
    # app finds them by name (get_screen) to post them what they show.
    SCREENS = {"config": ConfigScreen, "dataset": DatasetScreen, "train": TrainScreen, "chat": ChatScreen,
               "runs": RunsScreen, "review": ReviewScreen}
    MODES = {name: name for name in SCREENS}
    DEFAULT_MODE = "config"
    BINDINGS = [
        Binding("f1", "switch_mode('config')", "Config", id="config"),
        Binding("f2", "switch_mode('dataset')", "Dataset", id="dataset"),
        Binding("f3", "switch_mode('train')", "Train", id="train"),
        Binding("f4", "switch_mode('chat')", "Chat", id="chat"),
        Binding("f5", "switch_mode('runs')", "Runs", id="runs"),
        Binding("f6", "switch_mode('review')", "Review", id="review"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, config_path: str | None = None) -> None:
        super().__init__()
        # A full collection walks every object the app holds (0.1-0.3 s on 2 cores: a key pressed meanwhile
        # waits); Python runs one every 10 middle-generation passes, here every 100, so a few seconds of
        # using a screen no longer brings one (bench/bench_tui_new_screens.py).
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, 100)
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
        self.no_config_offer_shown = False  # the start-up toast offering to write config.yaml is up
        self.prebuilt: set[str] = set()  # modes whose screens are built and styled (build_next_screen)
        from engine.worker import EngineWorker
        self.engine = EngineWorker(self.post_engine_result)

    def on_mount(self) -> None:
        self.sub_title = self.config_path or "built-in defaults"
        self.run_engine()
        for issue in self.config_errors:
            self.notify(f"{issue.field}: {issue.message}" if issue.field else issue.message,
                        title="Config error", severity="error", timeout=8)
        if self.config_path is None:  # an empty folder: offer the file (the data is `lora-tui init`'s)
            self.notify(NO_CONFIG_OFFER, title="No config.yaml here", timeout=15)
            self.no_config_offer_shown = True
        self.call_after_refresh(self.set_timer, 0.3, self.build_next_screen)

    def build_next_screen(self) -> None:
        """Build and style the screens not yet shown, one round trip per tick once the first frame is up, so
        that the first F2, F3 or F4 only has to show a screen (composing one costs 0.1-0.3 s on 2 cores).
        Textual builds a mode's screen when it is first switched to, so this switches to it and straight
        back within one call: nothing is painted and no key reaches it. A second such visit once it is
        mounted gives it the styles pass that its first real visit would otherwise make (0.2 s during
        training): Textual marks a screen as styled only when it is mounted. Each round trip suspends and
        resumes the start screen, so none is made while the user is elsewhere or a dialog is open."""
        if not self.is_running:
            return
        start = self.get_screen(self.DEFAULT_MODE)
        if start.is_mounted:
            self.prebuilt.add(self.DEFAULT_MODE)  # shown, so built and styled
        if self.screen is start:
            self.visit_next_unready()
        if len(self.prebuilt) < len(self.MODES):
            self.set_timer(0.2, self.build_next_screen)
        else:
            # Start-up objects (imports, screens, widgets) live as long as the app: keep them out of the
            # garbage collector's full passes, which otherwise stall a frame now and then.
            gc.freeze()

    def visit_next_unready(self) -> None:
        """One round trip to the first screen not yet styled: a built one is styled by it, an unbuilt one
        built (and styled by the next)."""
        unready = [mode for mode in self.MODES if mode not in self.prebuilt]
        built = [mode for mode in unready if self.get_screen(mode).is_mounted]
        mode = (built or unready)[0]
        self.switch_mode(mode)
        self.switch_mode(self.DEFAULT_MODE)
        if built:
            self.prebuilt.add(mode)

    async def action_switch_mode(self, mode: str) -> None:
        if mode != self.DEFAULT_MODE:  # the offer is the Config screen's ctrl+s: it goes when the user does
            self.drop_no_config_offer()
        await super().action_switch_mode(mode)

    def drop_no_config_offer(self) -> None:
        """Take NO_CONFIG_OFFER off the screen (leaving the Config screen, or once config.yaml is saved)."""
        if self.no_config_offer_shown:  # Textual has no public way to drop one toast: all of them go
            self.no_config_offer_shown = False
            self.clear_notifications()

    @work(thread=True, exclusive=True, group="engine", exit_on_error=False, name="engine")
    def run_engine(self) -> None:
        from textual.worker import get_current_worker
        worker = get_current_worker()
        self.engine.serve(lambda: worker.is_cancelled)

    def on_unmount(self) -> None:
        # However the app ends, let the engine thread finish (a run in progress is stopped first).
        if self.control is not None:
            self.control.stop()
        self.engine.submit(CancelGeneration())
        self.engine.submit(Shutdown())

    def submit(self, command: Command) -> None:
        self.engine.submit(command)

    # ------------------------------------------------------------ routing engine traffic

    def post_engine_result(self, result: Result) -> None:
        """The engine's emit (any thread): everything comes through the app's queue, so each screen gets
        its messages in the order the engine sent them."""
        message = msg.engine_message(result)
        if message is not None:  # a result no message carries concerns nothing on screen
            self.post_message(message)

    @on(msg.TrainingBegan)
    def training_began(self, message: msg.TrainingBegan) -> None:
        self.training, self.control = True, message.result.control

    @on(msg.RunStarted)
    def run_started(self) -> None:
        if self.training:  # our engine's run, its model, tokenizer and tokenized data loaded:
            # keep them (and the rest alive now) out of the garbage collector's full passes while it
            # trains: each pass walked them all, a 100-300 ms stall of a key now and then
            # (bench/bench_tui_new_screens.py). Undone when the run ends.
            gc.freeze()

    @on(msg.TrainingOver)
    def training_over(self, message: msg.TrainingOver) -> None:
        self.training, self.control = False, None
        self.last_run_dir = message.result.run_dir or self.last_run_dir
        gc.unfreeze()  # what the run left (its model and data, in reference cycles) is collectable again
        if self._quitting:
            self._stop_engine_and_exit()

    @on(msg.EngineFailed)
    def engine_failed(self, message: msg.EngineFailed) -> None:
        error = message.result
        self.notify(error.message, title=error.what.capitalize(), severity="error", timeout=10)

    @on(msg.EngineMessage)
    def deliver(self, message: msg.EngineMessage) -> None:
        """On to the screen that shows it, once that screen is built (a message for a screen never shown
        concerns nothing on it)."""
        if message.owner is None:
            return
        screen = self.get_screen(message.owner)
        if screen.is_mounted:
            screen.post_message(message)

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
        self.engine.submit(Shutdown())
        self.exit(0)


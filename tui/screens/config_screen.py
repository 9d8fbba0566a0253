"""Config screen: forms generated from the config dataclasses, validated as you type, saved atomically."""

from __future__ import annotations

import os
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.screen import ModalScreen
from textual.validation import Function
from textual.widgets import (Button, Header, Input, Label, OptionList, Select, Static, Switch, TabbedContent,
                             TabPane)

from engine.config.loading import ENV_PREFIX, load_config, save_config, set_value
from engine.config.schema import SECTION_HELP, SPECS, Config, ConfigError, FieldSpec
from engine.config.validation import check_range, coerce, validate
from tui.screens.base import AppScreen
from tui.widgets.footer import KeyFooter

HUB_SUGGESTIONS = ["mlx-community/Mistral-7B-Instruct-v0.3-4bit", "mlx-community/Llama-3.2-1B-Instruct-4bit",
                   "mlx-community/Qwen2.5-0.5B-Instruct-4bit"]


def load_config_and_file(path: str | None) -> tuple[Config, Config, list, dict]:
    """(effective config, the file's own values, issues, unreadable fields): the app runs with the first
    (environment overrides applied); the config form saves the second plus the user's edits, so an override
    set for one session never lands in the file. Unreadable fields ({path: issue}, e.g. `rank: abc`) hold
    their default, which the user never chose: the form refuses to save them until they are edited."""
    cfg, issues = load_config(path, strict=False)
    file_cfg, file_issues = load_config(path, environ={}, strict=False)
    checked = {(i.field, i.message) for i in validate(file_cfg)}
    unreadable = {i.field: i for i in file_issues
                  if i.field in SPECS and i.severity == "error" and (i.field, i.message) not in checked}
    return cfg, file_cfg, issues, unreadable


def field_id(path: str) -> str:
    return "f-" + path.replace(".", "--")


def path_of(widget_id: str) -> str:
    return widget_id[2:].replace("--", ".")


def as_text(spec: FieldSpec, value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # data.columns
        return ", ".join(f"{ours}={theirs}" for ours, theirs in value.items())
    if isinstance(value, list) and value and isinstance(value[0], dict):  # data.path: weighted sources
        return ", ".join(f"{item['path']}*{item['weight']:g}" for item in value)
    if spec.type not in (int, float, bool, str):
        return ", ".join(value)
    if spec.type is float:  # short, but never a rounded value the user did not choose
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def _field_validator(spec: FieldSpec) -> Function:
    def ok(text: str) -> bool:
        value, err = coerce(spec, text)
        return err is None and check_range(spec, value) is None
    return Function(ok, f"{spec.path}: {spec.range_text() or 'invalid'}")


def local_models(cfg: Config) -> list[str]:
    """Model folders found on this machine: the embedded import, Hugging Face's cache, ./models."""
    found = ["embedded"]
    roots = [Path("~/.cache/huggingface/hub").expanduser(), Path("models")]
    for root in roots:
        if root.is_dir():
            for cfg_file in list(root.glob("*/config.json")) + list(root.glob("models--*/snapshots/*/config.json")):
                found.append(str(cfg_file.parent))
    return found[:40]


class ModelPicker(ModalScreen[str | None]):
    DEFAULT_CSS = """
    ModelPicker { align: center middle; }
    ModelPicker > Vertical { width: 90; height: auto; max-height: 30; border: thick $primary; background: $surface; padding: 1 2; }
    ModelPicker OptionList { height: auto; max-height: 18; }
    """
    BINDINGS = [("escape", "dismiss(None)", "Cancel")]

    def __init__(self, options: list[str]) -> None:
        super().__init__()
        self.options = options

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Pick a base model (embedded, a local folder, or a hub id — the hub needs network):")
            yield OptionList(*self.options, id="models")
            yield Input(placeholder="…or type a folder or hub id and press Enter", id="custom")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(str(event.option.prompt))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


class PathPrompt(ModalScreen[str | None]):
    DEFAULT_CSS = """
    PathPrompt { align: center middle; }
    PathPrompt > Vertical { width: 80; height: auto; border: thick $primary; background: $surface; padding: 1 2; }
    """
    BINDINGS = [("escape", "dismiss(None)", "Cancel")]

    def __init__(self, question: str, value: str = "") -> None:
        super().__init__()
        self.question, self.value = question, value

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question)
            yield Input(self.value, id="path")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


def env_overrides() -> dict[str, str]:
    """{field path: variable} for each LORA_TUI__SECTION__KEY variable naming a field."""
    found = {}
    for var in os.environ:
        if var.startswith(ENV_PREFIX):
            path = var[len(ENV_PREFIX):].lower().replace("__", ".")
            if path in SPECS:
                found[path] = var
    return found


def help_text(spec: FieldSpec, env_var: str | None = None) -> str:
    rng = spec.range_text()
    text = escape(spec.help) + (f"  [dim]({escape(rng)})[/dim]" if rng else "")
    if env_var:  # the form shows the session's value; the file keeps its own
        text = f"[$warning]set by {escape(env_var)} for this session (ctrl+s keeps the file's value)[/] " + text
    return text


def field_message(spec: FieldSpec, issue, env_var: str | None = None) -> tuple[str, bool]:
    """What the line under a field says: its problem if it has one, else its help."""
    if not issue:
        return help_text(spec, env_var), False
    mark, style = ("✗", "$error") if issue.severity == "error" else ("!", "$warning")
    return f"[{style}]{mark} {escape(issue.message)}[/]", True


def field_widget(spec: FieldSpec, cfg: Config):
    value = getattr(getattr(cfg, spec.section), spec.name)
    wid = field_id(spec.path)
    if spec.type is bool:
        return Switch(value=value, id=wid)
    if spec.choices:
        return Select([(c, c) for c in spec.choices], value=value, allow_blank=False, id=wid, compact=True)
    return Input(as_text(spec, value), id=wid, validators=[_field_validator(spec)],
                 valid_empty=spec.type is not int, compact=True)


class SectionForm(VerticalScroll):
    """The fields of one config section: a label, an editor and a help/problem line each."""

    def __init__(self, section: str) -> None:
        super().__init__()
        self.section = section

    def compose(self) -> ComposeResult:
        cfg = self.app.cfg
        issues = {i.field: i for i in validate(cfg)} | self.app.unreadable_fields
        from_env = env_overrides()
        yield Static(SECTION_HELP[self.section], classes="section-title")
        for path, spec in SPECS.items():
            if spec.section != self.section:
                continue
            with Vertical(classes="field"):
                with Horizontal(classes="row"):
                    yield Label(spec.name, classes="name")
                    yield field_widget(spec, cfg)
                    if path == "model.name":
                        yield Button("Pick…", id="pick-model", compact=True)
                text, has_issue = field_message(spec, issues.get(path), from_env.get(path))
                yield Static(text, classes="help has-issue" if has_issue else "help", id=field_id(path) + "-msg")


class ConfigScreen(AppScreen):
    AUTO_FOCUS = "#field-search"
    BINDINGS = [
        Binding("ctrl+s", "save", "Save"),
        Binding("ctrl+o", "load", "Load…"),
        Binding("ctrl+r", "reset", "Defaults"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="Find a setting: type part of its name and press Enter (e.g. rank)",
                    id="field-search")
        yield Static("", id="config-status")
        # One tab per category: only the visible tab is laid out and painted.
        with TabbedContent(id="form"):
            for section in SECTION_HELP:
                with TabPane(section, id=f"tab-{section}"):
                    yield SectionForm(section)
        yield KeyFooter()

    def on_mount(self) -> None:
        # Fields whose text is not a valid value, with the problem: the config keeps its last valid value,
        # so these, not validate(), tell whether the form holds what the user typed.
        self.invalid: dict[str, object] = dict(self.app.unreadable_fields)
        self.unreadable = set(self.app.unreadable_fields)  # until the user edits them
        self.from_env = env_overrides()  # fields an environment variable sets, until the user edits them
        self._show_status({i.field: i for i in validate(self.app.cfg)} | self.invalid)

    # ------------------------------------------------------------ editing

    def _changed(self, widget_id: str | None, raw) -> None:
        if not widget_id or not widget_id.startswith("f-"):
            return
        path = path_of(widget_id)
        spec = SPECS[path]
        before = getattr(getattr(self.app.cfg, spec.section), spec.name)
        issue = set_value(self.app.cfg, path, raw)
        if issue is None and getattr(getattr(self.app.cfg, spec.section), spec.name) == before:
            if path in self.unreadable:
                return  # the widget reporting the default it shows: the file's value is still unread
            if path not in self.invalid and \
                    not self.query_one("#" + field_id(path) + "-msg", Static).has_class("has-issue"):
                return  # a widget reporting its initial value: nothing changed
        if issue is None:
            self.invalid.pop(path, None)
            self.unreadable.discard(path)
            set_value(self.app.file_cfg, path, raw)  # what ctrl+s writes: the file's values plus edits
            self.from_env.pop(path, None)
        else:
            self.invalid[path] = issue
        self.app.dirty = self.app.dirty or issue is not None or \
            getattr(getattr(self.app.cfg, spec.section), spec.name) != before
        self.refresh_issues()

    @on(Input.Submitted, "#field-search")
    def find_field(self, event: Input.Submitted) -> None:
        text = event.value.strip().lower().replace(" ", "_")
        if not text:
            return
        matches = [p for p in SPECS if p.rsplit(".", 1)[-1] == text] or [p for p in SPECS if text in p]
        if not matches:
            self.notify(f"No setting matches {event.value!r}", severity="warning")
            return
        section = SPECS[matches[0]].section
        self.query_one("#form", TabbedContent).active = f"tab-{section}"
        widget = self.query_one("#" + field_id(matches[0]))
        widget.focus()
        widget.scroll_visible(animate=False)
        if isinstance(widget, Input):
            widget.select_all()

    @on(Input.Changed)
    def input_changed(self, event: Input.Changed) -> None:
        self._changed(event.input.id, event.value)

    @on(Switch.Changed)
    def switch_changed(self, event: Switch.Changed) -> None:
        self._changed(event.switch.id, event.value)

    @on(Select.Changed)
    def select_changed(self, event: Select.Changed) -> None:
        if event.value is not Select.NULL:
            self._changed(event.select.id, event.value)

    def refresh_issues(self) -> None:
        """Show each field's error or warning beside it (text that is no valid value first, then validation)."""
        issues = {i.field: i for i in validate(self.app.cfg)}
        issues.update(self.invalid)
        for msg in self.query(".help").results(Static):
            spec = SPECS[path_of(msg.id[:-len("-msg")])]
            text, has_issue = field_message(spec, issues.get(spec.path), self.from_env.get(spec.path))
            msg.update(text)
            msg.set_class(has_issue, "has-issue")
        self._show_status(issues)

    def _show_status(self, issues: dict) -> None:
        errors = sum(1 for i in issues.values() if i and i.severity == "error")
        where = self.app.config_path or "config.yaml"
        state = "unsaved changes" if self.app.dirty else "saved"
        self.query_one("#config-status", Static).update(
            f"[b]{escape(where)}[/b] — {state}" + (f" — [$error]{errors} error(s)[/]" if errors else " — valid"))

    def _reload_widgets(self, unreadable: dict | None = None) -> None:
        self.invalid, self.unreadable = dict(unreadable or {}), set(unreadable or {})
        for path, spec in SPECS.items():
            widget = self.query_one("#" + field_id(path))
            value = getattr(getattr(self.app.cfg, spec.section), spec.name)
            with widget.prevent(Input.Changed, Switch.Changed, Select.Changed):
                if isinstance(widget, Input):
                    widget.value = as_text(spec, value)
                else:
                    widget.value = value
        self.refresh_issues()

    # ------------------------------------------------------------ actions

    @on(Button.Pressed, "#pick-model")
    def pick_model(self) -> None:
        options = local_models(self.app.cfg) + HUB_SUGGESTIONS

        def chosen(name: str | None) -> None:
            if name:
                self.query_one("#" + field_id("model.name"), Input).value = name
        self.app.push_screen(ModelPicker(options), chosen)

    def save_problems(self) -> dict:
        """{field: issue} for every field that keeps the form from being saved as typed."""
        problems = {i.field: i for i in validate(self.app.file_cfg) if i.severity == "error"}
        problems.update(self.invalid)
        return problems

    def action_save(self) -> None:
        problems = self.save_problems()
        if problems:
            fields = ", ".join(problems)
            first = next(iter(problems.values()))
            self.notify(f"Not saved: fix {fields} first ({first.field}: {first.message})", severity="error",
                        timeout=10)
            return
        path = self.app.config_path or "config.yaml"  # started without one: ./config.yaml
        if self.app.config_path is None and os.path.lexists(path):
            self.notify(f"Not saved: {path} appeared here since the app started; load it (ctrl+o) or save "
                        "after moving it", severity="error", timeout=10)
            return
        try:
            save_config(self.app.file_cfg, path)
        except OSError as exc:
            self.notify(f"Cannot write {path}: {exc.strerror or exc}", severity="error", timeout=8)
            return
        self.app.config_path = path
        self.app.dirty = False
        self.app.sub_title = path
        self.app.drop_no_config_offer()
        self.notify(f"Saved {path}")
        self.refresh_issues()

    def action_load(self) -> None:
        def load(path: str | None) -> None:
            if not path:
                return
            try:
                cfg, file_cfg, issues, unreadable = load_config_and_file(path)
            except ConfigError as exc:
                self.notify(str(exc), severity="error", timeout=10)
                return
            self.app.cfg, self.app.file_cfg, self.app.config_path, self.app.dirty = cfg, file_cfg, path, False
            self.app.unreadable_fields, self.from_env = unreadable, env_overrides()
            self.app.sub_title = path
            self._reload_widgets(unreadable)
            self.notify(f"Loaded {path}" + (f" with {len(issues)} issue(s)" if issues else ""))
        self.app.push_screen(PathPrompt("Load which config file?", self.app.config_path or "config.yaml"), load)

    def action_reset(self) -> None:
        self.app.cfg, self.app.file_cfg = Config(), Config()
        self.from_env = {}
        self.app.dirty = True
        self._reload_widgets()
        self.notify("Defaults restored (not saved yet)")

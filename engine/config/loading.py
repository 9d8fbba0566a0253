"""A Config from plain data, the environment (LORA_TUI__...) and YAML files; and back to YAML (with the
help text as comments), saved atomically."""

from __future__ import annotations

import difflib
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from engine import atomic
from engine.config.schema import SECTION_HELP, SECTIONS, SPECS, Config, ConfigError, ConfigIssue, show_value
from engine.config.validation import check_range, coerce, validate

ENV_PREFIX = "LORA_TUI__"  # LORA_TUI__TRAINING__LEARNING_RATE=2e-4 overrides training.learning_rate


def from_dict(data: Any, source: str = "") -> tuple[Config, list[ConfigIssue]]:
    """Build a Config from nested plain data; unknown keys and bad types become issues, not exceptions."""
    cfg = Config()
    issues: list[ConfigIssue] = []
    if data is None:
        return cfg, issues
    if not isinstance(data, dict):
        return cfg, [ConfigIssue("", f"the top level must be a mapping of sections, got {type(data).__name__}")]
    for section, values in data.items():
        if section not in SECTIONS:
            issues.append(ConfigIssue(str(section), _unknown(str(section), list(SECTIONS), "section")))
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            issues.append(ConfigIssue(section, f"must be a mapping of keys, got {show_value(values)}"))
            continue
        for key, value in values.items():
            path = f"{section}.{key}"
            spec = SPECS.get(path)
            if spec is None:
                issues.append(ConfigIssue(path, _unknown(str(key), [s.name for s in SPECS.values()
                                                                  if s.section == section], "key", section)))
                continue
            coerced, err = coerce(spec, value)
            if err:
                issues.append(ConfigIssue(path, err))
                continue
            setattr(getattr(cfg, section), key, coerced)
    return cfg, issues


def _unknown(name: str, valid: list[str], what: str, section: str = "") -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    if not close:  # a key put in the wrong section is a common slip
        elsewhere = [p for p in SPECS if p.endswith("." + name)]
        if elsewhere:
            return f"unknown {what} {name!r}; did you mean {elsewhere[0]!r}?"
    hint = f"; did you mean {(section + '.' if section else '') + close[0]!r}?" if close else \
        f"; valid: {', '.join(valid)}"
    return f"unknown {what} {name!r}{hint}"


def apply_env(cfg: Config, environ: dict | None = None) -> list[ConfigIssue]:
    """Apply LORA_TUI__SECTION__KEY=value overrides (values parsed as YAML scalars)."""
    issues = []
    env = os.environ if environ is None else environ
    for var, raw in sorted(env.items()):
        if not var.startswith(ENV_PREFIX):
            continue
        parts = var[len(ENV_PREFIX):].lower().split("__")
        path = ".".join(parts)
        spec = SPECS.get(path)
        if len(parts) != 2 or spec is None:
            valid = [p.upper().replace(".", "__") for p in SPECS]
            close = difflib.get_close_matches(var[len(ENV_PREFIX):].upper(), valid, n=1)
            hint = f"; did you mean {ENV_PREFIX}{close[0]}?" if close else ""
            issues.append(ConfigIssue(path, f"environment variable {var} names no config key{hint}"))
            continue
        try:
            value = yaml.safe_load(raw) if spec.type is not str else raw
        except yaml.YAMLError:
            value = raw
        coerced, err = coerce(spec, value)
        if err:
            issues.append(ConfigIssue(path, f"from {var}: {err}"))
        else:
            setattr(getattr(cfg, spec.section), spec.name, coerced)
    return issues


# YAML files

class _NoAliasLoader(yaml.SafeLoader):
    """Safe loading, and no anchors/aliases: a config never needs them and they enable 'billion laughs'."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in a config",
                                              event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([ConfigIssue("", f"{where}: invalid YAML: {problem}")], source) from None


MAX_CONFIG_BYTES = 1 << 20


def load_config(path: str | os.PathLike | None = None, *, environ: dict | None = None,
                strict: bool = True) -> tuple[Config, list[ConfigIssue]]:
    """Load a YAML config (missing keys take defaults), apply env overrides, validate.

    With strict=True any error raises ConfigError listing all of them; warnings are returned.
    """
    source = str(path) if path is not None else "<defaults>"
    data: Any = None
    if path is not None:
        p = Path(path)
        try:
            if p.is_dir():
                raise ConfigError([ConfigIssue("", f"{p} is a directory, not a YAML file")], source)
            if not stat.S_ISREG(p.stat().st_mode):  # a FIFO or device would block or never end
                raise ConfigError([ConfigIssue("", f"{p} is not a regular file")], source)
            if p.stat().st_size > MAX_CONFIG_BYTES:
                raise ConfigError([ConfigIssue("", f"{p} is larger than 1 MiB: not a config file")], source)
            text = p.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise ConfigError([ConfigIssue("", f"config file {p} does not exist")], source) from None
        except UnicodeDecodeError:
            raise ConfigError([ConfigIssue("", f"{p} is not UTF-8 text")], source) from None
        except OSError as exc:
            raise ConfigError([ConfigIssue("", f"cannot read {p}: {exc.strerror or exc}")], source) from None
        data = parse_yaml(text, source)
    cfg, issues = from_dict(data, source)
    issues += apply_env(cfg, environ)
    issues += validate(cfg)  # fields that failed to parse kept defaults, so nothing is reported twice
    if strict and any(i.severity == "error" for i in issues):
        raise ConfigError(issues, source)
    return cfg, issues


def to_yaml(cfg: Config, comments: bool = True) -> str:
    """YAML text of a config, with each key's help as a comment (the format of config.yaml)."""
    lines = ["# lora-tui configuration. Every key is optional; missing keys take these defaults.",
             f"# Override any key from the environment: {ENV_PREFIX}SECTION__KEY=value", ""]
    data = cfg.to_dict()
    for section, values in data.items():
        if comments:
            lines.append(f"# {SECTION_HELP[section]}")
        lines.append(f"{section}:")
        for key, value in values.items():
            spec = SPECS[f"{section}.{key}"]
            dumped = yaml.safe_dump({key: value}, default_flow_style=True, width=1 << 16,
                                    allow_unicode=True).strip()[1:-1].strip()
            if comments:
                rng = spec.range_text()
                lines.append(f"  # {spec.help}" + (f" ({rng})" if rng else ""))
            lines.append(f"  {dumped}")
        lines.append("")
    return "\n".join(lines)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    atomic.write_text(path, to_yaml(cfg))


def set_value(cfg: Config, path: str, value: Any) -> ConfigIssue | None:
    """Set one field from a form's raw value; returns the issue instead when it is invalid."""
    spec = SPECS.get(path)
    if spec is None:
        return ConfigIssue(path, _unknown(path, list(SPECS), "key"))
    coerced, err = coerce(spec, value)
    if err is None:
        err = check_range(spec, coerced)
    if err:
        return ConfigIssue(path, err)
    setattr(getattr(cfg, spec.section), spec.name, coerced)
    return None

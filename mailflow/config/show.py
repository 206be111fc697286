"""postconf's views of a configuration: every setting as one `key = value` line in TOML syntax.

    flat_settings(config, effective=False) -> {"section.key" or "key": value}
                                                                 in declaration order; `effective`: a domain
                                                                 list naming a /file gives the file's words (as
                                                                 the server uses it), not the path
    format_setting(key, value) -> "key = value"                  durations in seconds
    bare_value(value) -> "value"                                 postconf -h: a string unquoted, else TOML
    settings_view(config, defaults=False, changed_only=False)    postconf, postconf -d, postconf -n as {key:
                                                                 value} (a setting that is None, unset, is left
                                                                 out: TOML has no null)

Never raises.
"""
from __future__ import annotations

import json
import re

from mailflow.config.base import Section
from mailflow.config.main import Config
from mailflow.config.paths import resolve_paths


def flat_settings(config: Config, *, effective: bool = False) -> dict[str, object]:
    """Every setting as `section.key -> value` (top-level keys have no section), in declaration order."""
    out: dict[str, object] = {}
    for name, value in config.model_dump(context={"effective": effective}).items():
        if isinstance(value, dict) and name in Config.model_fields and isinstance(getattr(config, name), Section):
            for key, inner in value.items():
                out[f"{name}.{key}"] = inner
        else:
            out[name] = value
    return out


def format_setting(key: str, value: object) -> str:
    """`key = value` with the value in TOML syntax (durations in seconds), like one line of postconf."""
    return f"{key} = {_toml_value(value)}"


def _toml_key(key: str) -> str:
    """A key of an inline table: bare when TOML allows it, else quoted (a restriction class named `a.b`)."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # (a None is an unset key: TOML has no null, so it is left out)
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()
                               if v is not None) + "}"
    return json.dumps(str(value))


def bare_value(value: object) -> str:
    """A setting's value as `postconf -h` prints it, without `key = `: a string as it is (no quotes, nothing
    escaped: what `$(…)` in a script wants), anything else in TOML syntax."""
    return value if isinstance(value, str) else _toml_value(value)


def settings_view(config: Config, *, defaults: bool = False, changed_only: bool = False) -> dict[str, object]:
    """postconf's views as {key: value}: every effective setting; `defaults`: the built-in defaults (postconf
    -d); `changed_only`: only what differs from them (postconf -n). Unset settings are left out."""
    default = flat_settings(Config() if config._base is None else resolve_paths(Config(), config._base))
    if defaults:
        return {k: v for k, v in default.items() if v is not None}
    return {k: v for k, v in flat_settings(config).items()
            if v is not None and (not changed_only or default.get(k) != v)}

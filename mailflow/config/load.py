"""Reading a configuration: TOML file -> validated `Config`, or the first problem as a `ConfigError`.

    load_config(path=None) -> Config             None: the embedded defaults; relative paths made absolute
                                                 from the file's directory (from the current directory for the
                                                 defaults)
    config_from_dict(data, name, base=None)      validate a parsed document; with `base`, resolve its paths

Failure behaviour: a missing or unreadable file, bad TOML or a bad value raise `ConfigError(file, key, reason)`
with the dotted key of the first problem ("smtpd.listen", "pipe.x.argv[0]") and a count of the others. A NUL
character in any value is refused before validation: no setting can hold one (a path with it cannot be opened).
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import ValidationError

from mailflow.config.base import validation_key, validation_reason
from mailflow.config.main import Config
from mailflow.config.paths import resolve_paths
from mailflow.errors import ConfigError


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate `path` (TOML); None gives the embedded defaults. Relative paths are made absolute from
    the file's directory (from the current directory for the defaults). Raises ConfigError."""
    if path is None:
        return resolve_paths(Config(), Path.cwd())
    name = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(name, "", "no such file") from None
    except OSError as e:
        raise ConfigError(name, "", f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(name, "", f"not valid TOML: {e}") from None
    return config_from_dict(data, name, base=Path(path).absolute().parent)


def config_from_dict(data: dict, name: str = "<config>", base: Path | None = None) -> Config:
    """Validate `data`; with `base`, relative paths are taken from that directory (else kept as written)."""
    nul = _key_with_nul(data)
    if nul is not None:
        raise ConfigError(name, nul, "contains a NUL character")
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = validation_key(err) or "(top level)"
        reason = validation_reason(err)
        more = len(e.errors()) - 1
        if more:
            reason += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise ConfigError(name, key, reason) from None
    return config if base is None else resolve_paths(config, base)


def _key_with_nul(value: object, key: str = "") -> str | None:
    """The dotted key of the first string (key or value) in `value` that holds a NUL character, else None."""
    if isinstance(value, str):
        return key or "(top level)" if "\0" in value else None
    if isinstance(value, dict):
        for name, item in value.items():
            inner = f"{key}.{name}" if key else str(name)
            if "\0" in str(name):
                return inner
            found = _key_with_nul(item, inner)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _key_with_nul(item, f"{key}[{index}]")
            if found is not None:
                return found
    return None

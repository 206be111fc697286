"""Reading a configuration: TOML file -> validated `Config`, or the first problem as a `ConfigError`.

    load_config(path=None, read_domain_files=True) -> Config
                                                 None: the embedded defaults; relative paths made absolute
                                                 from the file's directory (from the current directory for the
                                                 defaults); read_domain_files=False (sendmail's, which uses no
                                                 domain list): a domain list's /file/name is kept as it is, not
                                                 read (Postfix's sendmail reads no match_list file)
    load_source(path=None) -> (Config, bytes | None)   the same and the bytes it validated (None: the defaults),
                                                 for the settings sendmail keeps (mailflow.sendmail.settings)
    config_from_dict(data, name, base=None, read_domain_files=True)
                                                 validate a parsed document; with `base`, resolve its paths

Failure behaviour: a missing or unreadable file, bad TOML or a bad value raise `ConfigError(file, key, reason)`
with the dotted key of the first problem ("smtpd.listen", "pipe.x.argv[0]") and a count of the others. A file
that is not a regular file (a FIFO, a device such as /dev/zero: mailflow.files) or is larger than MAX_FILE_BYTES,
one that is not UTF-8 or starts with a byte order mark, and nesting deeper than MAX_DEPTH (no setting is; Python's
recursion would give out) are refused as such.
Before validation, a NUL character is refused in any value (a path with it cannot be opened), and a line break or any
other control character but TAB in any value except a pipe command's arguments (a banner, a HELO name or an
address with one would inject a line into SMTP or into a header; Postfix's main.cf cannot express one).
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from pydantic import ValidationError

from mailflow.config.base import FILE_COMMENTS, validation_key, validation_reason
from mailflow.config.main import Config
from mailflow.config.paths import resolve_paths
from mailflow.config_source import CONTROL, MAX_FILE_BYTES
from mailflow.errors import ConfigError
from mailflow.files import FileTooLarge, read_regular_file


def load_config(path: str | Path | None = None, *, read_domain_files: bool = True) -> Config:
    """Read and validate `path` (TOML); None gives the embedded defaults. Relative paths are made absolute from
    the file's directory (from the current directory for the defaults). Raises ConfigError."""
    return load_source(path, read_domain_files=read_domain_files)[0]


def load_source(path: str | Path | None = None, *, read_domain_files: bool = True) -> tuple[Config, bytes | None]:
    """load_config's result and the bytes it validated (None for the embedded defaults). Reads no environment
    variable: what it returns depends on the bytes, the file's directory and the code only."""
    if path is None:
        return resolve_paths(Config(), Path.cwd()), None
    name = str(path)
    raw = _read(path, name)
    return config_from_dict(_parse(raw, name), name, base=Path(path).absolute().parent,
                            read_domain_files=read_domain_files), raw


MAX_DEPTH = 32  # tables and arrays within each other; the deepest setting (a listener's override list) is 4


def _read(path: str | Path, name: str) -> bytes:
    try:
        return read_regular_file(path, MAX_FILE_BYTES)
    except FileNotFoundError:
        raise ConfigError(name, "", "no such file") from None
    except FileTooLarge:
        raise ConfigError(name, "", f"larger than {MAX_FILE_BYTES >> 20} MB: not a configuration file") from None
    except OSError as e:  # RefusedFile too: "is a FIFO, not a regular file"
        raise ConfigError(name, "", f"cannot read: {e.strerror}") from None


def _parse(raw: bytes, name: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(name, "", f"not valid TOML: not UTF-8 (byte 0x{raw[e.start]:02x} on line {line})") from None
    if text.startswith("\ufeff"):
        raise ConfigError(name, "", "not valid TOML: it starts with a byte order mark (save it as UTF-8 without one)")
    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as e:  # ValueError: an integer of more than 4300 digits
        raise ConfigError(name, "", f"not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(name, "", "tables or arrays nested too deeply to read (no setting is)") from None


def config_from_dict(data: dict, name: str = "<config>", base: Path | None = None, *,
                     read_domain_files: bool = True) -> Config:
    """Validate `data`; with `base`, relative paths are taken from that directory (else kept as written);
    without `read_domain_files`, a domain list's /file/name stays a path (its list is not usable then)."""
    refusal = _too_deep(data) or _control_character(data)
    if refusal is not None:
        raise ConfigError(name, *refusal)
    try:
        config = Config.model_validate(data, context={"read_domain_files": read_domain_files, FILE_COMMENTS: []})
    except ValidationError as e:
        err = e.errors()[0]
        key = validation_key(err) or "(top level)"
        reason = validation_reason(err)
        more = len(e.errors()) - 1
        if more:
            reason += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise ConfigError(name, key, reason) from None
    mailbox, message = config.local.mailbox_size_limit, config.smtpd.message_size_limit
    if mailbox and message and mailbox < message:  # Postfix's local(8) refuses to start
        raise ConfigError(name, "local.mailbox_size_limit", f"{mailbox} is smaller than smtpd.message_size_limit "
                          f"({message}): a mailbox could not take the largest message")
    return config if base is None else resolve_paths(config, base)


def _too_deep(value: object, key: str = "", depth: int = 0) -> tuple[str, str] | None:
    """(dotted key, reason) of a table or array nested deeper than MAX_DEPTH, else None."""
    if depth > MAX_DEPTH:
        return key, f"tables or arrays nested deeper than {MAX_DEPTH} levels (no setting is)"
    if isinstance(value, dict):
        items = [(f"{key}.{name}" if key else str(name), item) for name, item in value.items()]
    elif isinstance(value, list):
        items = [(f"{key}[{index}]", item) for index, item in enumerate(value)]
    else:
        return None
    for inner, item in items:
        found = _too_deep(item, inner, depth + 1)
        if found is not None:
            return found
    return None


ARGUMENTS = re.compile(r"pipe\.[^.]+\.argv\[\d+\]")  # may hold a line break: `sh -c` with a script


def _control_character(value: object, key: str = "") -> tuple[str, str] | None:
    """(dotted key, reason) of the first string (key or value) in `value` that holds a character no setting can
    hold (see the module docstring), else None."""
    if isinstance(value, str):
        if "\0" in value:
            return key or "(top level)", "contains a NUL character"
        if CONTROL.search(value) and not ARGUMENTS.fullmatch(key):
            return key or "(top level)", "contains a line break or another control character"
        return None
    items: list[tuple[str, object]] = []
    if isinstance(value, dict):
        for name, item in value.items():
            inner = f"{key}.{name}" if key else str(name)
            if CONTROL.search(str(name)):
                return inner, "contains a line break or another control character"
            items.append((inner, item))
    elif isinstance(value, list):
        items = [(f"{key}[{index}]", item) for index, item in enumerate(value)]
    for inner, item in items:
        found = _control_character(item, inner)
        if found is not None:
            return found
    return None

"""Relative paths in a configuration are taken from the directory of the file that holds them.

Which settings are paths is told by their names: `*_file`, `*_directory`, `*_base`, `directory` and `file` (the
log's) name files or directories; the items of `*_maps`, `*_domains`, `*_checks`, `authorized_submit_users`,
`relay_clientcerts`, `*_restrictions` and the network lists (mynetworks and the others) that are file-backed
tables (`texthash:`, `regexp:`, `pcre:`, `cidr:`, `sqlite:`, `accounts:`: mailflow.syntax.FILE_TABLE_TYPES) name
files; a listener's overrides follow the same rule. `local.home_mailbox` is relative to each user's home, not to
the file.

    resolve_paths(config, base) -> Config       every relative path setting taken from `base`; the result
                                                remembers `base` (settings_view resolves the defaults likewise)

Never raises: a value that is not a path setting is returned as it is.
"""
from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from mailflow.config.base import Section
from mailflow.config.deliverability import opendkim_dataset
from mailflow.config.main import Config
from mailflow.config_source import resolve_path as _resolve_path
from mailflow.syntax import FILE_TABLE_TYPES, table_type
from mailflow.tables.networks import NETWORK_LIST_SETTINGS

S = TypeVar("S", bound=Section)


def resolve_paths(config: Config, base: Path) -> Config:
    """`config` with every relative path setting (see the module docstring) taken from `base`."""
    resolved = _resolve_section(config, Path(base))
    if resolved is config:
        resolved = config.model_copy()
    resolved._base = Path(base)
    resolved._as_configured = {  # (a /file's list as configured: its tables beside the path resolved alike)
        name: (getattr(resolved, name), tuple(_resolve_table(item, Path(base)) for item in configured))
        for name, (_, configured) in config._as_configured.items()}
    return resolved


def _resolve_section(section: S, base: Path) -> S:
    updates = {}
    for name in type(section).model_fields:
        value = getattr(section, name)
        new: object
        if isinstance(value, Section):
            new = _resolve_section(value, base)
        elif isinstance(value, tuple) and value and all(isinstance(v, Section) for v in value):
            new = tuple(_resolve_section(v, base) for v in value)
        elif isinstance(value, dict) and value and all(isinstance(v, Section) for v in value.values()):
            new = {k: _resolve_section(v, base) for k, v in value.items()}
        elif name == "overrides" and isinstance(value, dict):  # a listener's: keys are [smtpd] settings
            new = {k: _resolve_setting(k, v, base) for k, v in value.items()}
        else:
            new = _resolve_setting(name, value, base)
        if new != value:
            updates[name] = new
    return section.model_copy(update=updates) if updates else section


def _resolve_setting(name: str, value: object, base: Path) -> object:
    if name.endswith(("_file", "_directory", "_base")) or name in ("directory", "file"):
        return _resolve_path(value, base) if isinstance(value, str) else value
    if name.endswith("_table") and isinstance(value, str) and value:  # an OpenDKIM data set (dkim.signing_table)
        kind, path = opendkim_dataset(value)
        return f"{kind}:{_resolve_path(path, base)}"
    # domain lists may hold tables
    if name.endswith(("_maps", "_domains", "_checks")) or name in ("authorized_submit_users", "relay_clientcerts"):
        return tuple(_resolve_table(v, base) for v in value) if isinstance(value, (tuple, list)) else value
    if name in NETWORK_LIST_SETTINGS and isinstance(value, (tuple, list)):  # one pattern an item, once checked
        return tuple(_resolve_network_pattern(v, base) for v in value)
    if name.endswith("_restrictions") and isinstance(value, (tuple, list)):
        return tuple(_resolve_restriction(item, base) for item in value)
    if name == "restriction_classes" and isinstance(value, dict):
        return type(value)({k: tuple(_resolve_restriction(item, base) for item in v) for k, v in value.items()})
    return value


def _resolve_network_pattern(pattern: str, base: Path) -> str:
    """`!cidr:nets` -> `!cidr:/base/nets`; a network or a /file stays as it is."""
    table = pattern.lstrip("!")
    return pattern[:len(pattern) - len(table)] + _resolve_table(table, base)


def _resolve_restriction(item: str, base: Path) -> str:
    """`check_sender_access texthash:access` -> `… texthash:/base/access`; an item naming no file stays as is."""
    words = item.split()
    resolved = [_resolve_table(word, base) for word in words]
    return " ".join(resolved) if resolved != words else item


def _resolve_table(spec: str, base: Path) -> str:
    """`texthash:relative` -> `texthash:/base/relative`; other tables and plain words stay as they are."""
    kind, _, name = spec.partition(":")
    if table_type(spec) not in FILE_TABLE_TYPES or not name.strip():
        return spec
    return f"{kind}:{_resolve_path(name.strip(), base)}"

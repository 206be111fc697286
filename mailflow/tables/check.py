"""Whether the file-backed tables a configuration names can answer now: what `mailflow check-config` reports
and what a reload (`mailflow reload`, SIGHUP) refuses to put in force.

    table_problems(settings, where, tables=None) -> [ConfigError]
                                                        `settings`: `key -> value`, as mailflow.config.flat_settings
                                                        gives them; one ConfigError(where, key, reason) for each
                                                        texthash, regexp, pcre, cidr, sqlite or accounts
                                                        table of a `*_maps`, `*_domains`, `*_checks`, `*_filter`,
                                                        `authorized_submit_users` or
                                                        `relay_clientcerts` setting, of postscreen's access_list,
                                                        dnsbl_reply_map or allowlist_interfaces ([smtpd.postscreen]
                                                        and a listener's override), of a network list (mynetworks
                                                        and the like, its /files too), or named in a
                                                        `*_restrictions` item or a restriction class's
                                                        (`check_sender_access texthash:/path`, a listener's
                                                        overrides and a client service's settings too), that
                                                        cannot answer now (missing,
                                                        unreadable, a bad line or .cf file, a database that does
                                                        not open); `tables`: the TableCache to open them through
                                                        (a reload's: what the check read, the server then uses,
                                                        not read again), else each is opened on its own

Reads each file in the caller (a server calls it in a worker thread). Never raises for a table's problem.
"""
from __future__ import annotations

from typing import Iterator, Mapping

from mailflow.errors import ConfigError, LookupRetry
from mailflow.syntax import FILE_TABLE_TYPES, table_type
from mailflow.tables.networks import NETWORK_LIST_SETTINGS, parse_network_list
from mailflow.tables.cache import TableCache
from mailflow.tables.spec import open_table

PROBE_KEY = "mailflow-check-config-probe"


def table_problems(settings: Mapping[str, object], where: str, tables: TableCache | None = None) -> list[ConfigError]:
    problems = []
    for key, spec, aliases in _file_tables(settings):
        try:
            table = tables.open([spec], aliases=aliases)[0] if tables is not None else open_table(spec, aliases=aliases)
            table.lookup(PROBE_KEY)
        except (ConfigError, LookupRetry) as e:
            problems.append(ConfigError(where, key, e.reason))  # LookupRetry's reason is its text
    return problems


def _file_tables(settings: Mapping[str, object], prefix: str = "") -> Iterator[tuple[str, str, bool]]:
    """(setting, spec, aliases) for each file-backed table the settings name."""
    for key, value in settings.items():
        if key == "smtpd.listeners" and isinstance(value, (list, tuple)):
            for i, listener in enumerate(value):
                overrides = listener.get("overrides") if isinstance(listener, dict) else None
                if isinstance(overrides, dict):
                    yield from _file_tables(overrides, f"smtpd.listeners[{i}].overrides.")
            continue
        if key in ("smtp.services", "lmtp.services") and isinstance(value, dict):  # name -> the keys it sets
            for name, service in value.items():
                if isinstance(service, dict):
                    yield from _file_tables(service, f"{key}.{name}.")
            continue
        if key.endswith("postscreen") and isinstance(value, dict):  # [smtpd.postscreen], a listener's override
            yield from _file_tables(value, f"{prefix}{key}.")
            continue
        if key == "dnsbl_reply_map" and isinstance(value, str):  # (postscreen's: one table, not a list)
            value = [value] if value else []
        if key.endswith("restriction_classes") and isinstance(value, dict):  # name -> a list of restrictions
            specs = [word for items in value.values() if isinstance(items, (list, tuple))
                     for item in items if isinstance(item, str) for word in item.split()]
        elif not isinstance(value, (list, tuple)):
            continue
        # domain lists may hold tables (accounts:PATH#domains); content checks are tables too
        elif key.endswith(("_maps", "_domains", "_checks", "_filter", "authorized_submit_users", "relay_clientcerts",
                           "dnsbl_reply_map", "access_list")):
            specs = [v for v in value if isinstance(v, str)]
        elif key.endswith("_restrictions"):  # check_client_access texthash:/path, ...
            specs = [word for item in value if isinstance(item, str) for word in item.split()]
        elif key.endswith(NETWORK_LIST_SETTINGS + ("allowlist_interfaces",)):  # mynetworks = ["cidr:/path"], ...
            specs = _network_list_tables(value)
        else:
            continue
        for spec in specs:
            if table_type(spec) in FILE_TABLE_TYPES:
                yield prefix + key, spec, key == "alias_maps"


def _network_list_tables(items: list | tuple) -> list[str]:
    """The tables a network list names, its /files read (a list that does not parse is the configuration's
    error, reported when it is loaded)."""
    try:
        return [p.table for p in parse_network_list(i for i in items if isinstance(i, str)) if p.table]
    except ValueError:
        return []

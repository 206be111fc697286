"""Whether the file-backed tables a configuration names can answer now: what `mailflow check-config` reports
and what a reload (`mailflow reload`, SIGHUP) refuses to put in force.

    table_problems(settings, where) -> [ConfigError]    `settings`: `key -> value`, as mailflow.config.flat_settings
                                                        gives them; one ConfigError(where, key, reason) for each
                                                        texthash, regexp, sqlite or accounts table of a `*_maps`,
                                                        `*_domains` or `*_checks` setting that
                                                        cannot answer now (missing, unreadable, a bad line or
                                                        .cf file, a database that does not open)

Reads each file in the caller (a server calls it in a worker thread). Never raises for a table's problem.
"""
from __future__ import annotations

from typing import Mapping

from mailflow.errors import ConfigError, LookupRetry
from mailflow.syntax import FILE_TABLE_TYPES, table_type
from mailflow.tables.spec import open_table

PROBE_KEY = "mailflow-check-config-probe"


def table_problems(settings: Mapping[str, object], where: str) -> list[ConfigError]:
    problems = []
    for key, specs in settings.items():
        # domain lists may hold tables (accounts:PATH#domains); content checks are tables too
        if not key.endswith(("_maps", "_domains", "_checks")) or not isinstance(specs, (list, tuple)):
            continue
        for spec in specs:
            if table_type(spec) not in FILE_TABLE_TYPES:
                continue
            try:
                open_table(spec, aliases=key == "alias_maps").lookup(PROBE_KEY)
            except (ConfigError, LookupRetry) as e:
                problems.append(ConfigError(where, key, e.reason))  # LookupRetry's reason is its text
    return problems

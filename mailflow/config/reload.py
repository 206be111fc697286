"""What a reload (SIGHUP, `mailflow reload`) may change in a running server, and what waits for a restart.

Postfix's `postfix reload` makes every daemon re-read main.cf and the master re-read master.cf (a service added
listens, one removed stops, a changed one keeps its socket and runs new processes with its new -o settings and
process limit), except what a daemon cannot let go of while it runs. So a reload applies the SMTP listeners too
(`smtpd.listen`, `[[smtpd.listeners]]`, `smtpd.max_sessions`: mailflow.stages.smtpd.server). mailflow's settings
that a reload leaves as they run (RESTART_SETTINGS): the queue (`queue_directory`, the store's
`queue.commit_batch_limit` and `queue.incoming_backlog_limit`), the HTTP listeners (`[http]`, `[sink]`, `[admin]`:
its address and tokens), the resolver (`[dns]`) and where and how the log is written (`log.format`, `log.file`,
`log.syslog_name`). Everything else applies.

    restart_needed(running, new) -> [key]       the settings that differ and that only a restart applies, as
                                                `mailflow config show` names them
    in_force(running, new, where) -> Config     `new` with those settings as they run: the configuration a reload
                                                puts in force

Failure behaviour: `in_force` validates the result (a new file that is valid only with the settings it keeps as
they run changed): ConfigError(where, key, reason), the reason naming the settings kept as they run.
"""
from __future__ import annotations

from mailflow.config.load import config_from_dict
from mailflow.config.main import Config
from mailflow.config.show import flat_settings
from mailflow.errors import ConfigError

# Settings (a section name covers every key in it) that a running server keeps until it restarts.
RESTART_SETTINGS = ("queue_directory", "queue.commit_batch_limit", "queue.incoming_backlog_limit", "http", "sink",
                    "admin", "dns", "log.format", "log.file", "log.syslog_name")


def restart_needed(running: Config, new: Config) -> list[str]:
    old_settings, new_settings = flat_settings(running), flat_settings(new)
    return [key for key in new_settings if _waits(key) and new_settings[key] != old_settings.get(key)]


def in_force(running: Config, new: Config, where: str) -> Config:
    if not restart_needed(running, new):  # (the usual reload: `new` was validated as it is)
        return new
    data = new.model_dump()
    old = running.model_dump()
    for key in RESTART_SETTINGS:
        section, _, name = key.partition(".")
        if name:
            data[section][name] = old[section][name]
        else:
            data[section] = old[section]
    try:
        return config_from_dict(data, where, base=new._base)
    except ConfigError as e:
        kept = restart_needed(running, new)
        if not kept:
            raise
        raise ConfigError(e.file, e.key, f"{e.reason} (with {', '.join(kept)} as running until a restart)") from None


def _waits(key: str) -> bool:
    return any(key == setting or key.startswith(setting + ".") for setting in RESTART_SETTINGS)

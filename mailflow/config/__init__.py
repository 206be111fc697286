"""The configuration: pydantic models, frozen, unknown keys rejected; every default lives here.

`load_config(path)` reads a TOML file (or nothing: the embedded defaults serve as they are) and returns a
`Config`. Any problem raises `ConfigError` naming the file, the dotted key and the reason. Names follow
Postfix's main.cf where Postfix has the setting (`mydestination`, `relayhost`, `maximal_backoff_time`, …).

Durations accept seconds as a number or a string with a unit: "30s", "5m", "1h", "5d", "1w".

Relative paths: every relative path in a configuration file, written or a default, is taken from that file's
directory, so `mailflow serve`, `mailflow sendmail` and the queue tools agree whatever directory they run in.
Without a file (the embedded defaults), from the current directory. `load_config` returns the paths absolute
(`resolve_paths`; which settings are paths: `paths.py`).

Defaults: each lives once, in its model. A component whose constructor needs a default (for tests) takes it
from `DEFAULTS` (the built-in `Config()`), never from a constant of its own.

The package, split by job like Postfix's global/mail_params + postconf (callers import from here):
    base.py       Section, the shared value types (Duration, Restriction, TableSpecs, Networks, HostPorts)
    smtpd.py      SmtpdConfig, ListenerConfig, LISTENER_ROLES                                 [smtpd]
    delivery.py   LocalConfig, SmtpConfig, LmtpConfig, DnsConfig, PipeService    [local] [smtp] [lmtp] [dns] [pipe.*]
                  SmtpService, LmtpService                        [smtp.services.*] [lmtp.services.*]
    queue.py      QueueConfig, SendmailConfig                                          [queue] [sendmail]
    log.py        LogConfig                                                                    [log]
    accounts.py   AccountsConfig                                                               [accounts]
    http.py       HttpConfig                                                                   [http]
    sink.py       SinkConfig                                                                   [sink]
    deliverability.py  DkimConfig, ArcConfig, SrsConfig, MtaStsConfig, DeliverabilityConfig   [dkim] [arc] [srs]
                  [mta_sts] [deliverability]
    filters.py    the inbound filters: [checks] [milter] [spamd] [clamd] [greylist] [address_verify]
                  [sender_auth],
                  and SmtpdFilterSettings (a listener's milters, content_filter, receive_override_options)
    admin.py      AdminConfig, beyond_loopback                                                 [admin]
    main.py       Config (top-level settings and the sections), DEFAULTS, BUILTIN_TRANSPORTS
    load.py       load_config, config_from_dict -> ConfigError(file, key, reason)
    paths.py      resolve_paths
    reload.py     restart_needed, in_force: what a reload of a running server applies, what waits for a restart
    show.py       flat_settings, format_setting, settings_view (postconf's views)

Layering: this package imports only leaves (mailflow.syntax, restriction_vocabulary, pipe_argv, address,
errors and what they import), never a stage, a transport or the routing libraries
(tests/unit/test_layering.py).
"""
from mailflow.config.admin import AdminConfig, beyond_loopback
from mailflow.config.accounts import AccountsConfig
from mailflow.config.base import RELAY, Duration, Section
from mailflow.config.delivery import (DnsConfig, LmtpConfig, LmtpService, LocalConfig, PipeService, SmtpConfig,
                                      SmtpService)
from mailflow.config.http import HttpConfig
from mailflow.config.deliverability import (ArcConfig, DeliverabilityConfig, DkimConfig, MtaStsConfig, SrsConfig,
                                            opendkim_dataset)
from mailflow.config.filters import (AddressVerifyConfig, ChecksConfig, ClamdConfig, GreylistConfig,
                                     MilterConfig, SenderAuthConfig, SpamdConfig)
from mailflow.config.load import config_from_dict, load_config
from mailflow.config.log import LogConfig
from mailflow.config.main import BUILTIN_TRANSPORTS, DEFAULTS, Config
from mailflow.config.paths import resolve_paths
from mailflow.config.queue import QueueConfig, SendmailConfig
from mailflow.config.reload import in_force, restart_needed
from mailflow.config.sink import SinkConfig
from mailflow.config.show import flat_settings, format_setting, settings_view
from mailflow.config.smtpd import LISTENER_ROLES, ListenerConfig, SmtpdConfig
from mailflow.errors import ConfigError

__all__ = [
    "AccountsConfig", "AddressVerifyConfig", "AdminConfig", "ArcConfig", "BUILTIN_TRANSPORTS", "ChecksConfig",
    "ClamdConfig", "DEFAULTS",
    "DeliverabilityConfig", "DkimConfig", "GreylistConfig", "LISTENER_ROLES", "MilterConfig", "Config", "ConfigError",
    "DnsConfig", "Duration", "HttpConfig", "ListenerConfig", "LmtpConfig", "LmtpService", "LocalConfig", "LogConfig",
    "MtaStsConfig",
    "PipeService", "QueueConfig", "RELAY", "Section", "SenderAuthConfig", "SendmailConfig", "SinkConfig", "SmtpConfig",
    "SmtpService", "SmtpdConfig", "SpamdConfig", "SrsConfig", "beyond_loopback", "config_from_dict", "flat_settings",
    "format_setting", "in_force", "load_config", "opendkim_dataset", "resolve_paths", "restart_needed",
    "settings_view",
]

"""`unix:passwd.byname` and `unix:group.byname`: the system's users and groups as lookup tables (Postfix's unix
table type), so `local_recipient_maps = ["unix:passwd.byname"]` takes the host's accounts as local users.

    UnixTable(spec, map_name)      map_name: passwd.byname or group.byname (ConfigError otherwise)

A lookup asks the name service (getpwnam / getgrnam: /etc/passwd, or NSS such as LDAP or SSSD), so it is
`blocking` and runs off the event loop (TableCache.run). The answer is the entry as Postfix gives it:
`name:passwd:uid:gid:gecos:home:shell`, `name:passwd:gid:member,member`. Keys are user and group names as
they are (the caller folds recipients' local parts to lower case, as Postfix does).

Failure behaviour: no such user or group is "not found" (None); the name service failing in any other way
(OSError) raises LookupRetry, so the recipient is deferred, not refused.
"""
from __future__ import annotations

import grp
import pwd

from mailflow.errors import ConfigError, LookupRetry

MAPS = ("passwd.byname", "group.byname")


class UnixTable:
    fixed = True
    blocking = True

    def __init__(self, spec: str, map_name: str):
        if map_name not in MAPS:
            raise ConfigError("", spec, f"unix: knows {' and '.join(MAPS)}, not {map_name!r}")
        self.name = spec
        self._group = map_name == "group.byname"

    def lookup(self, key: str) -> str | None:
        if not key or "\0" in key:
            return None
        try:
            if self._group:
                g = grp.getgrnam(key)
                return f"{g.gr_name}:{g.gr_passwd}:{g.gr_gid}:{','.join(g.gr_mem)}"
            p = pwd.getpwnam(key)
            return f"{p.pw_name}:{p.pw_passwd}:{p.pw_uid}:{p.pw_gid}:{p.pw_gecos}:{p.pw_dir}:{p.pw_shell}"
        except KeyError:
            return None
        except OSError as e:
            raise LookupRetry(f"{self.name}: the name service cannot answer: {e}") from e

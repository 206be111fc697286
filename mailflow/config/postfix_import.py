"""`mailflow config import`: a Postfix main.cf (and master.cf) read as Postfix reads them, written as mailflow's TOML.

    import_postfix(main_cf, master_cf=None, hostname=None) -> Imported
        Imported.toml()      the configuration, with a comment for every Postfix line left out (name, value, why)
        Imported.left_out    [LeftOut(where, name, value, why)]: empty when everything was translated
        Imported.refused_table_lines   [LeftOut]: regexp:/pcre: file lines (or files) mailflow's tables refuse
    UnreadableFile(file, line, reason)   a file that cannot be read or is not main.cf/master.cf syntax

main.cf as postconf(5) "SYNTAX" says: `name = value` logical lines, a line starting with whitespace continues the one
before, `#` lines and blank lines are skipped, a later definition replaces an earlier one. `$name`, `${name}`,
`$(name)`, `${name?text}`, `${name:text}`, `${name?{text}:{text}}` and `$$` expand (braces balanced as mac_parse
counts them; a relational `${{…} == {…}?…}` or a function call is left out: expansion form not supported) from the
file's parameters and the few Postfix defaults
that matter (a parameter Postfix reads raw, names.RAW: mailbox_command, luser_relay, smtpd_reject_footer…, is
written as is) (myhostname: the system's name; mydomain; myorigin; mydestination `$myhostname, localhost.$mydomain,
localhost`; mail_name; queue_directory); a reference to anything else leaves the setting out. Each parameter goes
through the one table (mailflow.config.postfix_names) and is converted by the mailflow setting's type; a table
spec of a type mailflow lacks is converted where mailflow has the same thing (hash:, lmdb:… -> texthash: of the
source file, left out when that file is missing, noted when the compiled file is older or newer; pcre: stays
pcre: (mailflow's is on RE2: each line of a regexp: or pcre: file the result names that mailflow's table refuses,
and each such file that is not UTF-8, is reported with its file and line, the setting kept: Postfix skips the line
and reads the bytes, where mailflow's table fails whole until it is fixed); proxy: dropped) and
left out otherwise. Every value is then validated as mailflow loads it (mailflow.config.load.config_from_dict): one it
refuses is left out with mailflow's reason, so what is written always loads. Nothing is dropped silently and no
value is invented: a setting written without a main.cf line (myhostname, mydestination, alias_maps,
local_recipient_maps, the listen addresses) is Postfix's default, said so in a comment (a table of it mailflow
cannot take, nis:mail.aliases, is a note); no compatibility_level is a note.

master.cf: `smtpd` inet services become the listen addresses (the `smtp` service) and `[[smtpd.listeners]]` with a role
(submission: `-o smtpd_tls_security_level=encrypt` and AUTH; submissions: `-o smtpd_tls_wrappermode=yes`) and overrides
(each `-o` through the same table); a `postscreen` service turns [smtpd.postscreen] on for its port (the `pass`
service's `-o` applied there; the postscreen_* parameters are [smtpd.postscreen]'s); `pipe` services become
`[pipe.NAME]`; a second smtp or lmtp service (a content filter's) an `[smtp.services.NAME]` (or lmtp); Postfix's own
services are built in; anything else is left out (mailflow.config.postfix_master). A `*_transport` or content_filter
naming a transport mailflow then does not have (master.cf's service left out, or no master.cf) is left out.
relay_transport naming `relay` (its default) while master.cf's relay is not an smtp service, or is missing, is
written as what does what Postfix does there (master.cf's relay as mailflow has it, or ABSENT_RELAY: a 4.3.0
deferral); so is every other route to relay (default_transport, a content_filter, an inline:/static: transport
table's entry; a texthash:, regexp:, pcre: or cidr: file's entry, or a FILTER relay action of an access or check
table, is reported with its line; a table it cannot read, sqlite: or unix:, is reported for the user to check). The
reading half (files, expansion, values, the result) is mailflow.config.postfix_cf.
"""
from __future__ import annotations

import os
import re
import socket
import stat
from typing import Callable, Iterable, Iterator

from mailflow.config import postfix_names as names
from mailflow.config.base import BUILTIN_TRANSPORTS, RELAY, transport_name
from mailflow.config.load import config_from_dict
from mailflow.config.postfix_cf import (COMMAND_LINE_CR, POSTFIX_TABLE_DEFAULTS, SASL_OPTIONS, Expander, Imported,
                                        LeftOut, Line,
                                        Refused, Service, Unexpanded, UnreadableFile, convert, from_queue_directory,
                                        read_main_cf, read_master_cf, dovecot_sasl_path, split_list,
                                        merged_timeouts_agree, reject_tempfail_action, sasl_security_options,
                                        table_spec, legacy_tls_level, chain_files_pair,
                                        LEGACY_CERTIFICATES)
from mailflow.config.postfix_master import translate_service
from mailflow.config.show import format_setting
from mailflow.config.smtpd import LISTENER_ROLES, SMTPD_BANNER
from mailflow.errors import ConfigError
from mailflow.files import TABLE_LIMIT, RefusedFile, read_regular_file
from mailflow.restriction_vocabulary import (ACCESS_CHECKS, REVERSE_CLIENT_ACCESS, SERVER_ACCESS_CHECKS,
                                             restriction_items, split_item)
from mailflow.tables.files import SCANNED_TABLE_FILES, logical_lines, table_file_entries
from mailflow.tables.pcre import parse_pcre
from mailflow.tables.regexp import RuleErrors, parse_regexp
from mailflow.tables.memory import table_entries

__all__ = ["import_postfix", "UnreadableFile", "Imported"]

# postscreen parameters whose Postfix default is smtpd's of the same job: an smtpd one mailflow's smtpd lacks is
# still taken for postscreen unless main.cf gives postscreen's its own value
_POSTSCREEN_HEIRS = {"smtpd_expansion_filter": "postscreen_expansion_filter",
                     "smtpd_reject_footer_maps": "postscreen_reject_footer_maps"}
_SMTPD_BANNER_REFERENCE = re.compile(r"\$(?:smtpd_banner|\{smtpd_banner\}|\(smtpd_banner\))")
_SMTPD_FORBIDDEN_REFERENCE = re.compile(r"\$(?:smtpd_forbidden_commands|\{smtpd_forbidden_commands\}|"
                                        r"\(smtpd_forbidden_commands\))")
_NON_LETTER_RULE = "regexp:{{/^[^A-Z]/ Bogus}}"  # smtpd_forbidden_commands' default rule, built into mailflow


# the transport tables whose entries may name relay (main.cf's, and address verification's of the same name)
RELAY_ROUTING_TABLES = ("transport_maps", "sender_dependent_default_transport_maps")

# relay_transport when master.cf has no relay: a transport no configuration defines, whose mail qmgr defers as
# Postfix's defers mail for a service master.cf lacks
ABSENT_RELAY = "relay-absent"
POSTFIX_NOTIFY_CLASSES = "resource, software"  # Postfix's default notify_classes (mailflow's adds 2bounce)
# the levels (an empty one is unset) and the parameters Postfix 3.7 reads without one (_tls_levels)
TLS_LEVELS = ("smtpd_tls_security_level", "smtp_tls_security_level", "postscreen_tls_security_level")
LEGACY_TLS = ("smtpd_use_tls", "smtpd_enforce_tls", "smtp_use_tls", "smtp_enforce_tls", "smtp_tls_enforce_peername")


class Importer:
    """One import: main.cf's parameters in file order, then master.cf's services, then mailflow's validation."""

    def __init__(self, main_cf: str, master_cf: str | None, hostname: str | None):
        self.params = read_main_cf(main_cf)
        self.services = read_master_cf(master_cf) if master_cf else None
        self.expander = Expander({n: v for n, (_, v) in self.params.items()}, hostname or self._system_hostname())
        self.out = Imported()
        self.used: set[str] = set()
        self._cache_off: set[str] = set()  # *_connection_cache_on_demand = no without destinations

    def run(self) -> Imported:
        self._defaults()
        classes = self._restriction_classes()
        for name, (line, raw) in self.params.items():
            if name not in self.used and name not in classes:
                self._parameter(name, line, raw)
        self._caches_off()
        self._tls_levels()
        self._bare_newline_default()
        self._listen()
        if self.services is not None:
            for service in self.services:
                self._service(service)
            self._relay_transport()
        self._check_transports()
        self._check_certificate()
        self._note_proxy_clients()
        self._validate()
        self._helpers()
        self._check_pattern_files()
        return self.out

    def _check_pattern_files(self) -> None:
        """Each line of a regexp: or pcre: file the written settings name that mailflow's table refuses (a PCRE
        construct RE2 lacks, a bad `$n`), and each such file mailflow cannot read as UTF-8 text, reported with its
        file, line and reason (refused_table_lines; the setting is kept): Postfix skips such a line with a warning
        and reads a file's bytes, where mailflow's table fails whole (4.3.0 on every lookup) until it is fixed."""
        parsers = {"regexp": parse_regexp, "pcre": parse_pcre}
        for kind, path in dict.fromkeys(_pattern_files(self.out.document())):
            try:  # (a FIFO or a device named there would hold the import at open(), or fill memory)
                data = read_regular_file(path, TABLE_LIMIT, null_is_empty=True)
            except RefusedFile as e:
                self._refuse_table_line(path, f"{kind}: file", f"{e.strerror}: mailflow's {kind}: cannot read it and "
                                                               "fails the whole table (4.3.0 on every lookup)")
                continue
            except OSError:
                continue  # (a file missing here may be on the server, where `config check` looks)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                line = data.count(b"\n", 0, e.start) + 1
                self._refuse_table_line(f"{path}:{line}", f"{kind}: file",
                                        f"not UTF-8 (byte 0x{data[e.start]:02x}): mailflow's {kind}: cannot read it "
                                        f"and fails the whole table (4.3.0 on every lookup), where Postfix reads its "
                                        f"bytes; write such a byte in a pattern as \\x{data[e.start]:02x}, or "
                                        f"convert the file to UTF-8 (iconv -f latin1 -t utf-8)")
                continue
            try:
                parsers[kind](text)
            except RuleErrors as e:
                written = dict(logical_lines(text))
                for error in e.lines:
                    number, _, reason = error.partition(": ")
                    line = int(number.split()[1])
                    self._refuse_table_line(f"{path}:{line}", f"{kind}: rule {written.get(line, '')}",
                                            f"mailflow's {kind}: refuses it ({reason}) and fails the whole table "
                                            f"(4.3.0 on every lookup) until it is fixed, where Postfix skips the line")
            except ValueError:
                continue  # a continuation line first: `config check` names it

    def _refuse_table_line(self, where: str, name: str, why: str) -> None:
        self.out.refused_table_lines.append(LeftOut(where, name, "", why))

    def _helpers(self) -> None:
        """A main.cf name Postfix does not know that another setting uses through $name (`mua_client_restrictions`
        in master.cf's `-o smtpd_client_restrictions=$mua_client_restrictions`) is translated with its user: a note,
        not a line left out (one naming $service_name too: its services know it)."""
        per_service = [Unexpanded(f"${n}").reason() for n in ("service_name", "service_type")]
        for item in list(self.out.left_out):
            name = item.name
            if name in self.expander.resolved and name in self.params and \
                    item.where == self.params[name][0].where and name not in names.NOT_IMPORTABLE and \
                    item.why in (names.why_not(name), *per_service):
                self.out.left_out.remove(item)
                self.out.notes.append(f"{item.where}: {name} is a helper parameter, used by "
                                      f"{', '.join(self._users(name)) or 'another setting'} through ${name}")

    def _users(self, name: str) -> list[str]:
        reference = re.compile(rf"\$(?:{name}|\{{\s*{name}\b|\(\s*{name}\b)(?![A-Za-z0-9_])")
        users = [other for other, (_, raw) in self.params.items() if other != name and reference.search(raw)]
        return users + [f"master.cf {s.name}" for s in self.services or () if reference.search(" ".join(s.args))]

    def _system_hostname(self) -> str:
        """Postfix's default myhostname (mail_params.c check_myhostname): gethostname(), and when that has no dot,
        `.$mydomain` (main.cf's) or `.localdomain` after it; never a DNS look-up."""
        name = socket.gethostname()
        if "." in name:
            return name
        return f"{name}.$mydomain" if "mydomain" in self.params else f"{name}.localdomain"

    # Postfix's defaults that differ from mailflow's and decide where mail goes.
    def _defaults(self) -> None:
        self._default_tables()
        if "compatibility_level" not in self.params:
            self.out.notes.append("(no compatibility_level in main.cf) Postfix keeps its pre-3.0 defaults then "
                                  "(append_dot_mydomain = yes, relay_domains = $mydestination, mynetworks_style = "
                                  "subnet, smtputf8_enable = no…); mailflow's defaults are its own (docs/config.md)")
        for name in ("myhostname", "mydestination"):
            if name not in self.params:
                default = self.expander.raw[name]
                try:
                    self.out.settings[name] = convert(name, name, self.expander.expand(default), self.out.notes)
                except Unexpanded as e:
                    self.out.leave_out(f"(no {name} in main.cf)", f"{name} (Postfix's default)", default,
                                       e.reason())
                    continue
                self.out.origins[name] = f"(no {name} in main.cf) Postfix's default: {default}"

        if "notify_classes" not in self.params:  # (mailflow's default adds 2bounce: failed bounces to the postmaster)
            [key] = names.SETTINGS["notify_classes"]
            self.out.settings[key] = convert("notify_classes", key, POSTFIX_NOTIFY_CLASSES, self.out.notes)
            self.out.origins[key] = (f"(no notify_classes in main.cf) Postfix's default: {POSTFIX_NOTIFY_CLASSES} "
                                     "(mailflow's own adds 2bounce)")

    def _default_tables(self) -> None:
        """alias_maps and local_recipient_maps without a main.cf line: Postfix's defaults written out (mailflow's
        differ), each table it cannot take (nis:, a missing /etc/aliases) noted rather than written."""
        for name in POSTFIX_TABLE_DEFAULTS:
            if name in self.params:
                continue
            default = POSTFIX_TABLE_DEFAULTS[name]
            tables = []
            for token in split_list(self.expander.expand(default)):
                try:
                    tables.append(table_spec(token, self.out.notes))
                except Refused as e:
                    self.out.notes.append(f"(no {name} in main.cf) {token} of Postfix's default is not written: {e}")
            self.out.settings[name] = list(dict.fromkeys(tables))
            self.out.origins[name] = f"(no {name} in main.cf) Postfix's default: {default}"

    def _set(self, name: str, line: Line, raw: str, key: str, value: object) -> None:
        if key in self.out.settings and self.out.settings[key] != value and key not in self._defaulted():
            self.out.leave_out(line.where, name, raw, f"{key} already takes {self.out.settings[key]!r} from "
                                                      f"{self.out.origins.get(key, 'another line')}")
            return
        self.out.settings[key] = value
        self.out.origins[key] = f"{line.where}: {name} = {raw}"

    def _defaulted(self) -> set[str]:
        return {k for k, o in self.out.origins.items() if o.startswith("(no ")}

    def _expand(self, name: str, line: Line, raw: str) -> str | None:
        try:
            return self.expander.expand(raw)
        except Unexpanded as e:
            if str(e) == "$stress":
                return self._unstressed(name, line, raw)
            self.out.leave_out(line.where, name, raw, e.reason())
            return None

    def _unstressed(self, name: str, line: Line, raw: str) -> str | None:
        """A value naming $stress (`${stress?{1}:{5}}`, as Postfix's own defaults do): what Postfix takes while its
        master is not under stress ($stress empty; `yes` while a service has all its processes busy), noted with
        the other, as mailflow has no such mode for it."""
        try:
            value = self.expander.with_names({"stress": ""}).expand(raw)
            stressed = self.expander.with_names({"stress": "yes"}).expand(raw)
        except Unexpanded as e:
            self.out.leave_out(line.where, name, raw, e.reason())
            return None
        self.out.notes.append(f"{line.where}: {name} = {raw} is {value!r}, Postfix's value when not under stress "
                              + (f"(under stress, every process of a service busy: {stressed!r}; mailflow has no "
                                 "such mode)" if stressed != value else "(the same under stress)"))
        return value

    def _parameter(self, name: str, line: Line, raw: str) -> None:
        if name in LEGACY_CERTIFICATES and self._chain_files_set():
            self.out.notes.append(f"{line.where}: {name} = {raw} applies to nothing: smtpd_tls_chain_files is set, "
                                  "and Postfix then ignores the legacy certificate and key files")
            return
        if self._inherited_by_postscreen(name, line, raw):
            return
        if name in names.NOT_IMPORTABLE:  # its reason, whatever its value refers to
            self.out.leave_out(line.where, name, raw, names.why_not(name))
            return
        if name in names.NOT_NEEDED and name not in (*SASL_OPTIONS, *_VALUE_READ):  # whatever it refers to, too
            self.out.notes.append(f"{line.where}: {name} = {raw} not needed: {names.NOT_NEEDED[name]}")
            return
        if name == "postscreen_greet_banner" and _SMTPD_BANNER_REFERENCE.fullmatch(raw.strip()):
            self._set(name, line, raw, "smtpd.postscreen.greet_banner", SMTPD_BANNER)  # smtpd's own greeting
            return
        parent = next((smtpd for smtpd, heir in _POSTSCREEN_HEIRS.items() if heir == name), None)
        if parent is not None and _names(raw, parent):  # (its default): smtpd's value, taken there, or none
            self.out.notes.append(f"{line.where}: {name} = {raw} is " + (
                f"{parent}'s value" if parent in self.params else "mailflow's default"))
            return
        if name == "smtpd_forbid_bare_newline_exclusions" and _names(raw, "mynetworks"):  # (Postfix's default)
            self.out.notes.append(f"{line.where}: {name} = {raw} is mailflow's default "
                                  "(smtpd.forbid_bare_newline_exclusions unset: mynetworks)")
            return
        if name == "postscreen_forbidden_commands" and _SMTPD_FORBIDDEN_REFERENCE.fullmatch(raw.strip()):
            self.out.notes.append(f"{line.where}: {name} = {raw} is mailflow's default (smtpd.forbid_cmds)")
            return
        value = raw if name in names.RAW else self._expand(name, line, raw)  # RAW: as written, $$ kept
        if value is None:
            return
        if name in TLS_LEVELS and not value.strip():  # (Postfix: an empty level is no level: *var_..._tls_level)
            self.out.notes.append(f"{line.where}: {name} = {raw} is empty: unset, as Postfix takes it")
            return
        try:
            if name in names.CONVERTED:
                self._special(name, line, raw, value)
            elif name in names.SETTINGS:
                if self._merged_agree(name):  # another of the merged names, of the same value, has set it
                    self.out.notes.append(f"{line.where}: {name} = {raw} is {names.SETTINGS[name][0]} as written")
                    return
                for key in names.SETTINGS[name]:
                    self._set(name, line, raw, key, self._in_queue_directory(convert(name, key, value,
                                                                                     self.out.notes)))
            elif name in names.CACHE_ON_DEMAND and value.lower() == "no":
                self._no_cache_on_demand(name)
            elif name in names.BUILT_IN:
                fixed, why = names.BUILT_IN[name]
                if value.lower() != fixed:
                    raise Refused(f"only {name} = {fixed} is mailflow's behaviour: {why}")
                self.out.notes.append(f"{line.where}: {name} = {raw} is built in: {why}")
            elif name in SASL_OPTIONS:
                why = sasl_security_options(name, value, self._main_value("smtpd_sasl_tls_security_options"))
                self.out.notes.append(f"{line.where}: {name} = {raw} {why}")
            elif name in names.NOT_NEEDED:
                self.out.notes.append(f"{line.where}: {name} = {raw} not needed: {names.NOT_NEEDED[name]}")
            elif self._transport_limit(name, line, raw, value):
                pass
            else:
                raise Refused(names.why_not(name))
        except Refused as e:
            self.out.leave_out(line.where, name, raw, str(e))
        except Unexpanded as e:  # queue_directory's, when a unix: path is taken from it
            self.out.leave_out(line.where, name, raw, f"needs queue_directory, which {e.reason()}")

    def _inherited_by_postscreen(self, name: str, line: Line, raw: str) -> bool:
        """An smtpd parameter mailflow's smtpd lacks whose value Postfix's postscreen takes by default
        (_POSTSCREEN_HEIRS): written as postscreen's setting, unless main.cf gives postscreen's its own value, and
        left out for smtpd with a reason that says so. False: not such a parameter (or postscreen has its own)."""
        heir = _POSTSCREEN_HEIRS.get(name)
        if heir is None or (heir in self.params and not _names(self.params[heir][1], name)):
            return False
        value = raw if heir in names.RAW else self._expand(name, line, raw)
        if value is None:
            return True
        try:
            for key in names.SETTINGS[heir]:
                self._set(name, line, raw, key, convert(heir, key, value, self.out.notes))
        except Refused as e:
            self.out.leave_out(line.where, name, raw, str(e))
            return True
        self.out.leave_out(line.where, name, raw, f"{names.why_not(name)}; postscreen takes it ({heir}'s default "
                                                  f"${name}: {', '.join(names.SETTINGS[heir])})")
        return True

    def _no_cache_on_demand(self, name: str) -> None:
        """`smtp_connection_cache_on_demand = no` (or lmtp's): Postfix then caches only the sessions of
        *_connection_cache_destinations, none when that is empty (its default), so the client's
        connection_cache_time_limit is 0s, whatever main.cf's *_connection_cache_time_limit (which then applies to
        nothing); with destinations, Refused: mailflow caches every destination's sessions or none."""
        client = names.CACHE_ON_DEMAND[name]
        destinations = f"{client}_connection_cache_destinations"
        if self._main_value(destinations):
            raise Refused(f"with {destinations}, Postfix caches those destinations' sessions only; mailflow's "
                          f"{client} client caches every destination's or none ({client}.connection_cache_time_limit)")
        self._cache_off.add(name)

    def _caches_off(self) -> None:
        """The clients _no_cache_on_demand turned off: connection_cache_time_limit 0s (after every parameter, so
        that a *_connection_cache_time_limit line, which Postfix then applies to nothing, does not undo it)."""
        for name in self._cache_off:
            client, (line, raw) = names.CACHE_ON_DEMAND[name], self.params[name]
            key = f"{client}.connection_cache_time_limit"
            if key in self.out.settings and key not in self._defaulted():
                self.out.notes.append(f"{self.out.origins[key]} applies to nothing: {name} = {raw} without "
                                      f"{client}_connection_cache_destinations caches no session")
            self.out.settings[key] = convert(f"{client}_connection_cache_time_limit", key, "0s", self.out.notes)
            self.out.origins[key] = (f"{line.where}: {name} = {raw} (no {client}_connection_cache_destinations: "
                                     "Postfix caches no session)")

    def _merged_agree(self, name: str) -> bool:
        """Refused unless every Postfix name merged into `name`'s mailflow setting (main.cf's value, else Postfix's
        default) takes the same value: one of them would otherwise change the others' (smtp_rset_timeout = 20s
        must not make MAIL and RCPT time out after 20s). True when an earlier one of them has set it."""
        if name not in names.MERGED_DEFAULTS:
            return False
        merged_timeouts_agree(name, lambda n: self._expand(n, *self.params[n]) if n in self.params else None,
                              mark_defaults=True)
        return names.SETTINGS[name][0] in self.out.settings

    def _in_queue_directory(self, value: object) -> object:
        return from_queue_directory(value, self.queue_directory(), self.out.notes)

    def _chain_files_set(self) -> bool:
        """Whether main.cf sets smtpd_tls_chain_files (one it cannot expand too: Postfix would take it)."""
        try:
            return bool((self._main_value("smtpd_tls_chain_files") or "").strip())
        except Unexpanded:
            return True

    def _main_value(self, name: str) -> str | None:
        """main.cf's value of `name`, expanded (None: main.cf does not set it)."""
        return self.expander.expand(self.params[name][1]) if name in self.params else None

    def queue_directory(self) -> str:
        """Postfix's queue_directory (main.cf's, else its default): where its relative unix: paths are."""
        return self.expander.expand(self.expander.raw["queue_directory"])

    def _transport_limit(self, name: str, line: Line, raw: str, value: str) -> bool:
        found = names.per_transport(name)
        if found is None:
            return False
        transport, key = found
        self.out.set_entry(key, transport, convert(name, key.replace("transport_", ""), value, self.out.notes),
                           f"{line.where}: {name} = {raw}")
        return True

    def _special(self, name: str, line: Line, raw: str, value: str) -> None:
        if name == "smtpd_tls_chain_files":
            files = split_list(value)
            if not files:
                self.out.notes.append(f"{line.where}: {name} = {raw} is empty: smtpd_tls_cert_file and "
                                      "smtpd_tls_key_file apply, as Postfix takes it")
                return
            cert, key = chain_files_pair(files, self.queue_directory(), self.out.notes)
            self._set(name, line, raw, "smtpd.tls_cert_file", cert)
            self._set(name, line, raw, "smtpd.tls_key_file", key)
        elif name == "smtpd_banner":
            m = re.match(r"\$(?:myhostname|\{myhostname\}|\(myhostname\))(?:\s+|$)", raw)
            if not m:
                raise Refused("mailflow's greeting always starts with myhostname (smtpd.banner is what follows)")
            self._set(name, line, raw, "smtpd.banner", self.expander.expand(raw[m.end():]))
        elif name == "smtp_sasl_security_options":
            self._set(name, line, raw, "smtp.sasl_tls_required", "noplaintext" in split_list(value.lower()))
        elif name in LEGACY_TLS:  # Postfix 3.7: the level when none is set (_tls_levels, after every line)
            section = name.split("_")[0]
            if section != "postscreen" and self._main_value(f"{section}_tls_security_level"):
                self.out.notes.append(f"{line.where}: {name} = {raw} applies to nothing: "
                                      f"{section}_tls_security_level is set")
        elif name in ("postscreen_use_tls", "postscreen_enforce_tls"):
            if not (self._main_value("postscreen_tls_security_level") or self._main_value("smtpd_tls_security_level")):
                self._set(name, line, raw, "smtpd.postscreen.tls_security_level", self._postscreen_tls_level())
        elif name == "smtpd_sasl_path":
            self._set(name, line, raw, "smtpd.sasl_path",
                      dovecot_sasl_path(value, self._main_value("smtpd_sasl_type"), self.queue_directory(),
                                        self.out.notes, line.where))
        elif name == "smtp_sasl_password_maps":
            enabled = self.params.get("smtp_sasl_auth_enable", (line, "no"))[1]
            if enabled.lower() != "yes":
                raise Refused("smtp_sasl_auth_enable is not yes, so Postfix does not use it")
            self._set(name, line, raw, "smtp.sasl_password_maps",
                      convert(name, "smtp.sasl_password_maps", value, self.out.notes))
        elif name == "reject_tempfail_action":
            action = reject_tempfail_action(value)
            for setting in names.REJECT_TEMPFAIL_ACTIONS:
                if setting not in self.params:
                    self._set(name, line, raw, f"smtpd.{setting}", action)
        elif name == "smtp_sasl_auth_enable":
            self.out.notes.append(f"{line.where}: {name} = {raw}: {names.CONVERTED[name]}")
        elif name == "inet_interfaces":
            self.used.add(name)  # applied with master.cf's ports in _listen
        elif name == "postscreen_greet_banner":
            self._set(name, line, raw, "smtpd.postscreen.greet_banner", value)  # the teaser's text as written
        elif name in names.FORBIDDEN_COMMANDS:
            self._set(name, line, raw, names.FORBIDDEN_COMMANDS[name], self._forbidden_words(line, name, value))

    def _postscreen_tls_level(self) -> str:
        """Postfix 3.7's postscreen_enforce_tls and postscreen_use_tls (defaults: smtpd's) as a security level."""
        def yes(name: str) -> bool:
            value = self._main_value(f"postscreen_{name}")
            return self._yes(f"smtpd_{name}") if value is None else value.lower() == "yes"
        return legacy_tls_level(yes("enforce_tls"), yes("use_tls"))

    def _yes(self, name: str, default: str = "no") -> bool:
        """A yes/no parameter of main.cf (Postfix's `default` when main.cf does not set it)."""
        return (self._main_value(name) or default).lower() == "yes"

    def _bare_newline_default(self) -> None:
        """A note when main.cf leaves smtpd_forbid_bare_newline at Postfix 3.7.11's default, `no`: mailflow's default
        (true, as `reject`) stays, for security, and refuses the bare LF Postfix took from clients outside the
        exclusions."""
        if "smtpd_forbid_bare_newline" not in self.params:
            self.out.notes.append("(no smtpd_forbid_bare_newline in main.cf) Postfix 3.7.11's default is no (a bare "
                                  "<LF> taken from every client, a stray <CR> stored as a space: "
                                  "cleanup_replace_stray_cr_lf); mailflow's smtpd.forbid_bare_newline stays true "
                                  "(Postfix's reject, 521 5.5.2 and a disconnect, for a bare <CR> too) for the "
                                  "clients outside smtpd.forbid_bare_newline_exclusions (unset: mynetworks): set it "
                                  f"to false for Postfix 3.7's behaviour; but under false too, {COMMAND_LINE_CR}")

    def _tls_levels(self) -> None:
        """smtpd's and smtp's level when main.cf sets no (non-empty) *_tls_security_level: Postfix 3.7's from
        *_enforce_tls, *_use_tls (and smtp_tls_enforce_peername), `none` when none of them is set, as Postfix 3.7's
        defaults (mailflow's own default, may, would offer or use STARTTLS where Postfix did not)."""
        for section in ("smtpd", "smtp"):
            if self._main_value(f"{section}_tls_security_level"):
                continue
            peername = self._yes("smtp_tls_enforce_peername", "yes") if section == "smtp" else False
            level = legacy_tls_level(self._yes(f"{section}_enforce_tls"), self._yes(f"{section}_use_tls"), peername)
            given = [n for n in (f"{section}_enforce_tls", f"{section}_use_tls") if n in self.params]
            origin = (", ".join(f"{self.params[n][0].where}: {n} = {self.params[n][1]}" for n in given) if given
                      else f"(no {section}_use_tls, {section}_enforce_tls or {section}_tls_security_level in main.cf) "
                           "Postfix 3.7's default")
            self.out.settings[f"{section}.tls_security_level"] = level
            self.out.origins[f"{section}.tls_security_level"] = origin

    def _forbidden_words(self, line: Line, name: str, value: str) -> list[str]:
        """smtpd_/postscreen_forbidden_commands: the words; Postfix's default rule `regexp:{{/^[^A-Z]/ Bogus}}` is
        mailflow's built-in one (noted when the list leaves it out); any other table is refused."""
        words = split_list(value)
        if _NON_LETTER_RULE not in words:
            self.out.notes.append(f"{line.where}: {name}: mailflow refuses a command that does not begin with a "
                                  f"letter whatever the list (Postfix's default {_NON_LETTER_RULE})")
        words = [word for word in words if word != _NON_LETTER_RULE]
        tables = [word for word in words if ":" in word]
        if tables:
            raise Refused(f"{tables[0]}: mailflow's forbidden commands are words, not tables")
        return words

    def _restriction_classes(self) -> set[str]:
        if "smtpd_restriction_classes" not in self.params:
            return set()
        line, raw = self.params["smtpd_restriction_classes"]
        self.used.add("smtpd_restriction_classes")
        value = self._expand("smtpd_restriction_classes", line, raw)
        classes: dict[str, list[str]] = {}
        for cls in split_list(value or ""):
            if cls not in self.params:
                self.out.leave_out(line.where, "smtpd_restriction_classes", raw, f"class {cls} has no definition")
                continue
            cline, craw = self.params[cls]
            cvalue = self._expand(cls, cline, craw)
            try:
                if cvalue is not None:
                    items = restriction_items([table_spec(t, self.out.notes) for t in split_list(cvalue)])
                    classes[cls] = [str(self._in_queue_directory(item)) for item in items]
            except Refused as e:
                self.out.leave_out(cline.where, cls, craw, str(e))
        if classes:
            self._set("smtpd_restriction_classes", line, raw, "smtpd.restriction_classes", classes)
        return set(split_list(value or ""))

    # --- listeners --------------------------------------------------------------------------------------------

    def interfaces(self) -> list[str]:
        raw = self.params["inet_interfaces"][1] if "inet_interfaces" in self.params else "all"
        protocols = self.expander.expand(self.params["inet_protocols"][1] if "inet_protocols" in self.params
                                         else "all").lower()
        ipv4 = protocols in ("all", "") or "ipv4" in protocols
        ipv6 = protocols == "all" or "ipv6" in protocols
        out = []
        for item in split_list(self.expander.expand(raw).lower()):
            if item == "all":
                out += (["0.0.0.0"] if ipv4 else []) + (["[::]"] if ipv6 else [])
            elif item in ("loopback-only", "localhost"):
                out += (["127.0.0.1"] if ipv4 else []) + (["[::1]"] if ipv6 else [])
            else:
                out.append(f"[{item}]" if ":" in item and not item.startswith("[") else item)
        return out

    def _listen(self) -> None:
        smtp = [s for s in self.services or () if s.kind == "inet" and s.name == "smtp"]
        if self.services is not None and not smtp:
            self.out.settings["smtpd.listen"] = []
            self.out.origins["smtpd.listen"] = "master.cf has no smtp inet service"
            return
        try:
            addresses = [f"{host}:25" for host in self.interfaces()]
        except Unexpanded as e:
            already = {(item.where, item.name) for item in self.out.left_out}
            for name in ("inet_interfaces", "inet_protocols"):
                if name in self.params and (self.params[name][0].where, name) not in already:
                    line, raw = self.params[name]
                    self.out.leave_out(line.where, name, raw, f"refers to {e} (smtpd.listen is not written)")
            return
        where = (f"{self.params['inet_interfaces'][0].where}: inet_interfaces = {self.params['inet_interfaces'][1]}"
                 if "inet_interfaces" in self.params else "(no inet_interfaces in main.cf) Postfix's default: all")
        self.out.settings["smtpd.listen"] = addresses
        self.out.origins["smtpd.listen"] = where + ", master.cf's smtp service (port 25)"

    def _service(self, service: Service) -> None:
        translate_service(self, service)

    def _relay_transport(self) -> None:
        """Every route to `relay` when master.cf's `relay` is not an smtp service: relay_transport (main.cf's, or
        its default `relay`), any other `*_transport` or content_filter setting (default_transport = relay, a
        listener's -o content_filter), and each entry of a transport table (transport_maps,
        sender_dependent_default_transport_maps, address verification's) naming it. Postfix hands that mail to
        master.cf's relay whatever runs it, and defers it when master.cf has none (qmgr: `warning: connect to
        transport private/relay: …`, then error(8)'s `status=deferred (mail transport unavailable)`, 4.3.0).
        mailflow's `relay` is its built-in SMTP relay, so each route is written to name what does the same
        (`_relay_route`); an entry of a table file, which the import does not write, is reported (its line, and
        what to write there). Nothing changes for relay_transport without relay_domains (no mail is
        relay_transport's) unless main.cf sets it."""
        relay = next((s for s in self.services or () if s.name == RELAY), None)
        if relay is not None and relay.command == "smtp":
            return
        if self.out.settings.get("relay_domains") and "relay_transport" not in self.out.settings:
            self.out.settings["relay_transport"] = RELAY
            self.out.origins["relay_transport"] = "relay_transport's default, relay"
        for key, value in list(self.out.settings.items()):
            if _transport_named(key, value) == RELAY:
                self._reroute_setting(key, str(value), relay)
            elif key.rpartition(".")[2] in RELAY_ROUTING_TABLES and isinstance(value, list):
                self.out.settings[key] = [self._reroute_table(key, spec, relay) for spec in value]
            else:
                for spec in _filter_tables(key, value):
                    self._report_filters(key, spec, relay)
        for listener in self.out.listeners:
            overrides = listener.get("overrides")
            for name, setting in (overrides.items() if isinstance(overrides, dict) else ()):
                for spec in _filter_tables(f"smtpd.{name}", setting):
                    self._report_filters(f"{listener.get('origin', '')} -o {name}", spec, relay)
            value = overrides.get("content_filter") if isinstance(overrides, dict) else None
            route = self._relay_route(str(value), relay) if _transport_named("content_filter", value) == RELAY \
                else None
            if isinstance(overrides, dict) and route is not None:
                overrides["content_filter"] = route[0]
                self.out.notes.append(f"{listener.get('origin', '')} -o content_filter = {route[0]}: {route[1]}")

    def _relay_route(self, value: str, relay: Service | None) -> tuple[str, str] | None:
        """(what to write for `value`, `relay` or `relay:nexthop`, why) as Postfix routes it: master.cf's relay as
        mailflow has it (the transport it became, postfix_master, with the next hop), or ABSENT_RELAY, a transport
        mailflow does not define, when master.cf has no relay (its qmgr defers that mail so, with a warning; an
        `error:` transport would not do: smtpd refuses its recipients at RCPT, as Postfix's smtpd_check does).
        None when master.cf's relay was left out (its line says why)."""
        nexthop = value.partition(":")[2]
        if relay is None:
            return ABSENT_RELAY, (
                f"master.cf has no relay service: Postfix's qmgr defers its mail (warning: connect to transport "
                f"private/relay, then 4.3.0 mail transport unavailable), as mailflow's defers mail for "
                f"{ABSENT_RELAY}, a transport it does not define (an error: transport would be refused at RCPT)")
        if not self.out.relay_service:
            return None
        route = self.out.relay_service + (f":{nexthop}" if nexthop else "")
        return route, f"master.cf's relay runs {relay.command} ({relay.line.where}): mailflow's {route} does the same"

    def _reroute_setting(self, key: str, value: str, relay: Service | None) -> None:
        route = self._relay_route(value, relay)
        origin = self.out.origins.get(key, key)
        if route is None:
            assert relay is not None
            del self.out.settings[key]
            where, colon, _ = self.out.origins.pop(key, "").partition(": ")
            self.out.leave_out(where if colon else relay.line.where, key, value, _relay_left_out(relay, key))
            return
        self.out.settings[key] = route[0]
        self.out.origins[key] = f"{origin}; {route[1]}"
        self.out.notes.append(f"{key} = {route[0]}: {route[1]}")

    def _reroute_table(self, key: str, spec: str, relay: Service | None) -> str:
        """`spec` with each entry naming relay rerouted (inline:, static:: the spec is the table), or as it is,
        each such entry of its texthash: file reported with its line and what to write there."""
        entries = self._inline_entries(key, spec, relay, _names_relay, "an entry naming relay")
        if entries is None or not any(_names_relay(value) for _, value in entries):
            return spec
        rerouted = []
        for lookup, value in entries:
            route = self._relay_route(value, relay) if _names_relay(value) else None
            if route is not None:
                self.out.notes.append(f"{key}: {lookup or 'static'} {value} is {route[0]}: {route[1]}")
            elif _names_relay(value):
                assert relay is not None
                where, colon, _ = self.out.origins.get(key, "").partition(": ")
                self.out.leave_out(where if colon else relay.line.where, f"{key} entry {lookup or 'static'}", value,
                                   _relay_left_out(relay, "this entry"))
            rerouted.append((lookup, route[0] if route else value))
        if spec.partition(":")[0] == "static":
            return f"static:{{ {rerouted[0][1]} }}"
        return "inline:{ " + ", ".join(f"{{ {lookup} = {value} }}" for lookup, value in rerouted) + " }"

    def _inline_entries(self, key: str, spec: str, relay: Service | None, names_relay: Callable[[str], bool],
                        what: str) -> tuple[tuple[str, str], ...] | None:
        """The (lookup, value) entries of an inline:, static: or fail: `spec`, the tables whose entries the import
        handles one by one; None for any other table, each of whose entries `names_relay` is reported here (a
        texthash:, regexp:, pcre: or cidr: file's with its line; a table the import cannot read, as one where `what`
        may be), and for a malformed spec (the validation leaves it out with its reason)."""
        kind, _, name = spec.partition(":")
        if kind in SCANNED_TABLE_FILES:
            self._report_table_file(key, kind, name, relay, names_relay)
            return None
        if kind not in ("inline", "static", "fail"):
            self._report_unread_table(key, spec, relay, what)
            return None
        try:
            return table_entries(spec) or ()
        except ConfigError:
            return None

    def _report_table_file(self, key: str, kind: str, path: str, relay: Service | None,
                           names_relay: Callable[[str], bool]) -> None:
        """Each entry of a texthash:, regexp:, pcre: or cidr: file whose value `names_relay` (a route, or a FILTER
        action, to relay), reported with its line: the file is read as it is, so mailflow would send that mail over its
        SMTP relay."""
        try:
            text = read_regular_file(path, TABLE_LIMIT, null_is_empty=True).decode("utf-8", errors="replace")
            entries = table_file_entries(kind, text)
        except (OSError, ValueError):
            return  # (the import reported an unreadable table already, or `config check` will)
        for number, lookup, value in entries:
            if not names_relay(value):
                continue
            action, _, target = value.partition(" ") if _filter_names_relay(value) else ("", "", value)
            route = self._relay_route(target.strip(), relay)
            instead = (f"write {f'{action} ' if action else ''}{route[0]} there ({route[1]})" if route
                       else _relay_left_out(relay, "this entry"))
            self.out.leave_out(f"{path}:{number}", f"{key} entry {lookup}", value,
                               f"mailflow's relay is its SMTP relay, and it reads this file as it is: {instead}")

    def _report_unread_table(self, key: str, spec: str, relay: Service | None, what: str) -> None:
        """A table the import cannot read (sqlite:, unix:: its answers come from elsewhere) where `what` would go
        over mailflow's SMTP relay, not master.cf's relay: reported, for the user to check."""
        where, colon, _ = self.out.origins.get(key, "").partition(": ")
        runs = f"runs {relay.command} ({relay.line.where})" if relay else "is missing (Postfix defers that mail)"
        self.out.leave_out(where if colon else key, f"{key} table", spec,
                           f"the import cannot read this table's entries: {what} would go over mailflow's SMTP "
                           f"relay where master.cf's relay {runs}: check that none does")

    def _report_filters(self, key: str, spec: str, relay: Service | None) -> None:
        """Each `FILTER relay[:nexthop]` of an access or content-check table, reported as a transport table's
        route to relay is (the import rewrites no access table: an inline: one is reported with its entry)."""
        for lookup, value in self._inline_entries(key, spec, relay, _filter_names_relay,
                                                  "a FILTER action naming relay") or ():
            if _filter_names_relay(value):
                route = self._relay_route(value.partition(" ")[2].strip(), relay)
                instead = f"write FILTER {route[0]} there ({route[1]})" if route \
                    else _relay_left_out(relay, "this entry")
                where, colon, _ = self.out.origins.get(key, "").partition(": ")
                self.out.leave_out(where if colon else key, f"{key} entry {lookup or 'static'}", value,
                                   f"mailflow's relay is its SMTP relay: {instead}")

    def _check_transports(self) -> None:
        """A setting naming a transport mailflow does not have (`default_transport = slow` with master.cf's `slow`
        left out or not given) is left out: written, it would load and defer all mail (transport not defined)."""
        known = set(BUILTIN_TRANSPORTS) | set(self.out.pipes) | set(self.out.clients) | {ABSENT_RELAY}
        hint = ("master.cf has no service of that name mailflow translates" if self.services is not None
                else "no master.cf given (--master) to say what it is")
        for key, value in list(self.out.settings.items()):
            transport = _transport_named(key, value)
            if transport and transport not in known:
                self._drop_setting(key, f"{transport} is not a transport mailflow has: {hint}")
        for key, entries in self.out.entry_origins.items():
            for transport in [t for t in entries if t not in known and key in self.out.settings]:
                self.out.drop_entry(key, transport, f"{transport} is not a transport mailflow has: {hint}")
        for listener in self.out.listeners:
            overrides = listener.get("overrides")
            transport = _transport_named("content_filter", overrides.get("content_filter")) \
                if isinstance(overrides, dict) else None
            if isinstance(overrides, dict) and transport and transport not in known:
                self.out.leave_out(str(listener.get("origin", "")), f"listener {listener.get('address')} "
                                   "-o content_filter", str(overrides.pop("content_filter")),
                                   f"{transport} is not a transport mailflow has: {hint}")

    def _check_certificate(self) -> None:
        """smtpd's certificate and key (main.cf's, and a listener's own `-o`) as files that are there. Postfix's
        smtpd runs on without them (`cannot get RSA certificate from file ...: disabling TLS support`, STARTTLS
        `454 4.7.0 TLS not available due to local problem`): where every level using the pair is may/none it takes
        mail in the clear, so the pair is left out (both: a key alone, or a certificate read without its key, means
        another thing), naming the file; where one is encrypt it takes no mail (MAIL: `530 5.7.0 Must issue a
        STARTTLS command first`), so the pair is kept as written and reported (exit 1): the output then fails
        `config check` and the start naming the file, as leaving it out would take that mail in the clear."""
        self._tls_files_from_queue_directory()
        users = [listener for listener in self.out.listeners if not _own_pair(listener)]
        requirers = [self._tls_requirer(None)] + [self._tls_requirer(listener) for listener in users]
        self._check_main_pair(next((r for r in requirers if r), None))
        for listener in self.out.listeners:
            if _own_pair(listener):
                self._check_listener_pair(listener)

    def _note_proxy_clients(self) -> None:
        """A listener that takes the PROXY protocol (main.cf's smtpd_upstream_proxy_protocol, or its `-o`): Postfix
        takes the header from any peer, mailflow only from smtpd.upstream_proxy_clients (loopback by default), so a
        balancer elsewhere (mailcow's HAProxy, in another container) would get every connection dropped. Noted,
        naming the key: which addresses are the balancer's, main.cf does not say."""
        main = self.out.settings.get("smtpd.upstream_proxy_protocol")
        listen = self.out.settings.get("smtpd.listen")
        proxied = [(self.out.origins.get("smtpd.listen", "main.cf"), ", ".join(map(str, listen)))] \
            if main and isinstance(listen, list) and listen else []
        services: dict[str, list[str]] = {}  # a master.cf line -> its addresses
        for listener in self.out.listeners:
            overrides = listener.get("overrides")
            own = overrides.get("upstream_proxy_protocol", main) if isinstance(overrides, dict) else main
            if own:
                services.setdefault(str(listener.get("origin", "")), []).append(str(listener.get("address")))
        proxied += [(where, ", ".join(addresses)) for where, addresses in services.items()]
        clients = self.out.settings.get("smtpd.upstream_proxy_clients", ("127.0.0.0/8", "::1/128"))
        clients = clients if isinstance(clients, (list, tuple)) else (clients,)
        for where, address in proxied:
            self.out.notes.append(
                f"{where}: listener {address} takes the PROXY protocol (smtpd_upstream_proxy_protocol): Postfix takes "
                f"its header from any peer, mailflow only from smtpd.upstream_proxy_clients "
                f"({', '.join(map(str, clients))}): "
                "write the load balancer's addresses there (or in the listener's overrides), else each connection "
                "from it is dropped (`not an upstream_proxy_clients address`)")

    def _tls_files_from_queue_directory(self) -> None:
        """A relative TLS certificate, key or CA file (main.cf's, a listener's `-o`) as Postfix opens it: its daemons
        chdir to queue_directory before they read them (master/multi_server.c). Made absolute from there (noted),
        the file checked here is the one Postfix reads and the output's loader (which would take a relative path
        from the output file's directory) reads, whatever directory the import ran in."""
        for key in [k for k in self.out.settings if k.rpartition(".")[2] in TLS_FILES]:
            self.out.settings[key] = self._from_queue_directory(self.out.settings[key])
        for listener in self.out.listeners:
            overrides = listener["overrides"]
            assert isinstance(overrides, dict)
            for key in [k for k in TLS_FILES if k in overrides]:
                overrides[key] = self._from_queue_directory(overrides[key])

    def _from_queue_directory(self, path: object) -> object:
        if not isinstance(path, str) or not path or os.path.isabs(path):
            return path
        absolute = os.path.join(self.queue_directory(), path)
        self.out.notes.append(f"{path} is {absolute} (Postfix opens a relative TLS file from queue_directory)")
        return absolute

    def _tls_requirer(self, listener: dict[str, object] | None) -> str | None:
        """The line whose smtpd_tls_security_level = encrypt applies to `listener` (None: the main settings'),
        None when its level is may/none."""
        overrides = listener.get("overrides") if listener else None
        if isinstance(overrides, dict) and "tls_security_level" in overrides:
            if overrides["tls_security_level"] != "encrypt":
                return None
            sources = listener.get("sources") if listener else None
            source = sources.get("tls_security_level") if isinstance(sources, dict) else None
            return f"{listener.get('origin') if listener else ''} " \
                   f"{source or 'role ' + str(listener.get('role') if listener else '')}"
        if self.out.settings.get("smtpd.tls_security_level") != "encrypt":
            return None
        return self.out.origins.get("smtpd.tls_security_level", "smtpd.tls_security_level = encrypt")

    def _check_main_pair(self, requirer: str | None) -> None:
        keys = [key for key in TLS_PAIR if self.out.settings.get(key)]
        missing = next(((key, why) for key in keys if (why := missing_file(str(self.out.settings[key])))), None)
        if missing is None:
            return
        key, why = missing
        if requirer is not None:
            where, _, text = self.out.origins.get(key, key).partition(": ")
            self.out.leave_out(where, text.partition(" = ")[0] or key, "",
                               _kept_for_tls(f"{self.out.settings[key]}: {why}", requirer))
            return
        told = f"{self.out.settings[key]}: {why}; mailflow does not start without it, Postfix's smtpd runs on " \
               f"without TLS (STARTTLS: 454 4.7.0): set {key} (and its pair) once the file is there"
        for each in keys:
            self._drop_setting(each, told if each == key else f"left out with {key}, whose file is not there")

    def _check_listener_pair(self, listener: dict[str, object]) -> None:
        """A listener's own `-o smtpd_tls_cert_file`/`_key_file`, as main.cf's: kept and reported under encrypt,
        else left out, the listener then without TLS (its pair set to "", not main.cf's), as Postfix's."""
        overrides, sources = listener["overrides"], listener.get("sources", {})
        assert isinstance(overrides, dict) and isinstance(sources, dict)
        keys = [key for key in ("tls_cert_file", "tls_key_file") if overrides.get(key)]
        missing = next(((key, why) for key in keys if (why := missing_file(str(overrides[key])))), None)
        if missing is None:
            return
        key, why = missing
        name = f"listener {listener.get('address')} -o smtpd_{key}"
        where, requirer = str(listener.get("origin", "")), self._tls_requirer(listener)
        if requirer is not None:
            self.out.leave_out(where, name, "", _kept_for_tls(f"{overrides[key]}: {why}", requirer))
            return
        self.out.leave_out(where, name, str(sources.get(key, "")).partition("=")[2],
                           f"{overrides[key]}: {why}; Postfix's smtpd runs on without TLS there (STARTTLS: 454 "
                           "4.7.0): the listener has no certificate (its pair set to \"\")")
        overrides["tls_cert_file"] = overrides["tls_key_file"] = ""

    # --- the whole, as mailflow loads it ----------------------------------------------------------------------

    def _validate(self) -> None:
        rounds = len(self.out.settings) + len(self.out.listeners) + len(self.out.pipes) + 1
        rounds += sum(len(service) for service in self.out.clients.values())
        for _ in range(rounds):
            try:
                config_from_dict(self.out.document(), "<imported>")
                return
            except ConfigError as e:
                self._drop(e.key, e.reason)
        raise AssertionError("the imported settings never validated")  # each round removes one

    def _refusal(self) -> tuple[str, str] | None:
        """(key, reason) of mailflow's refusal of what is imported now, None when it loads."""
        try:
            config_from_dict(self.out.document(), "<imported>")
        except ConfigError as e:
            return e.key, e.reason
        return None

    def _drop(self, key: str, reason: str) -> None:
        """Leave out what mailflow refuses: the setting, pipe or listener (override) `key` names, else the one
        whose removal ends the refusal (a check across settings), else the whole section or listener."""
        parts = re.sub(r"\[(\d+)\]", r".\1", key).split(".")
        why = f"mailflow refuses it: {reason}"
        listener = _LISTENER_REFUSAL.match(reason)
        client = _client_refusal(parts, self.out.clients)
        orphan = self._orphan_entry(reason)
        if client is not None:
            self._drop_in_client(*client, why, (key, reason))
        elif parts[0] == "pipe" and len(parts) > 1 and parts[1] in self.out.pipes:
            origin = str(self.out.pipes[parts[1]].pop("origin", ""))
            del self.out.pipes[parts[1]]
            self.out.leave_out(origin, f"pipe service {parts[1]}", "", why)
            self._check_transports()
        elif orphan is not None:
            self.out.drop_entry(*orphan, why)
        elif parts[:2] == ["smtpd", "listeners"] and len(parts) > 2 and parts[2].isdigit():
            self._drop_listener(int(parts[2]), why)
        elif parts == ["smtpd"] and listener and int(listener.group(1)) < len(self.out.listeners):
            self._drop_in_listener(int(listener.group(1)), listener.group(2), listener.group(3), (key, reason))
        else:
            prefixes = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]  # smtpd.postscreen.greet_wait first
            setting = next((p for p in prefixes if p in self.out.settings), None)
            if setting is None:  # a check across settings (`sasl_auth_enable needs sasl_user_maps`)
                setting = self._culprit(parts[0], reason, (key, reason))
            entry = self._culprit_entry(setting, (key, reason)) if setting else None
            if setting is None:
                self._drop_section(parts[0], why)
            elif entry is not None:
                self.out.drop_entry(setting, entry, why)
            else:
                self._drop_setting(setting, why)

    def _orphan_entry(self, reason: str) -> tuple[str, str] | None:
        """(setting, transport) of a per-transport table entry mailflow refuses as naming no transport."""
        found = _ENTRY_REFUSAL.search(reason)
        table = self.out.settings.get(found.group(1)) if found else None
        if found and isinstance(table, dict) and found.group(2) in table:
            return found.group(1), found.group(2)
        return None

    def _drop_in_client(self, name: str, key: str, why: str, refusal: tuple[str, str]) -> None:
        """Leave out the -o of a client service that mailflow refuses: the one the refusal names, else the one whose
        removal ends it (a check across the merged settings: `-o smtp_tls_cert_file=` under main.cf's key); the
        whole service only when it is no one -o's, and then the settings and table entries naming it too."""
        service = self.out.clients[name]
        sources = service["sources"]
        assert isinstance(sources, dict)
        if key not in sources:
            key = self._culprit_option(service, list(sources), refusal) or key
        if key in sources:
            del service[key]
            self.out.leave_out(str(service["origin"]), f"master.cf {name} {sources.pop(key)}", "", why)
            return
        del self.out.clients[name]
        self.out.leave_out(str(service["origin"]), f"master.cf {name}", "", why)
        self._check_transports()

    def _first_removal_ending(self, items: dict, keys: Iterable[str], refusal: tuple[str, str]) -> str | None:
        """The first of `keys` whose removal from `items` alone ends `refusal` (each put back after the trial), None
        when none does."""
        for candidate in keys:
            value = items.pop(candidate)
            ended = self._refusal() != refusal
            items[candidate] = value
            if ended:
                return candidate
        return None

    def _culprit_option(self, service: dict[str, object], keys: list[str], refusal: tuple[str, str]) -> str | None:
        """The key of a client service's -o whose removal ends `refusal`, None when none does alone."""
        return self._first_removal_ending(service, keys, refusal)

    def _culprit_entry(self, setting: str, refusal: tuple[str, str]) -> str | None:
        """The entry of a per-transport table whose removal ends `refusal` (the others stay)."""
        table = self.out.settings[setting]
        if setting not in self.out.entry_origins or not isinstance(table, dict):
            return None
        return self._first_removal_ending(table, list(table), refusal)

    def _drop_setting(self, setting: str, why: str) -> None:
        if self.out.entry_origins.get(setting):  # a per-transport table: each entry with its own line
            for transport in list(self.out.settings[setting]):  # type: ignore[call-overload]
                self.out.drop_entry(setting, transport, why)
            return
        del self.out.settings[setting]
        origin = self.out.origins.pop(setting, setting)
        where, _, text = origin.partition(": ")
        name, _, value = text.partition(" = ")
        self.out.leave_out(where, name or setting, value, why)

    def _culprit(self, section: str, reason: str, refusal: tuple[str, str]) -> str | None:
        """The imported setting of `section` whose removal ends `refusal`: those the reason names first."""
        mine = [k for k in self.out.settings if k == section or k.startswith(f"{section}.")]
        named = [k for k in mine if re.search(rf"(?<![\w.]){re.escape(k.removeprefix(section + '.'))}(?![\w.])",
                                              reason)]
        return self._first_removal_ending(self.out.settings, named + [k for k in reversed(mine) if k not in named],
                                          refusal)

    def _drop_section(self, section: str, why: str) -> None:
        for setting in [k for k in self.out.settings if k == section or k.startswith(f"{section}.")]:
            self._drop_setting(setting, why)
        if section == "smtpd":
            for _ in range(len(self.out.listeners)):
                self._drop_listener(0, why)

    def _drop_listener(self, index: int, why: str) -> None:
        listener = self.out.listeners.pop(index)
        self.out.leave_out(str(listener.get("origin", "")), f"listener {listener.get('address')}", "", why)

    def _drop_in_listener(self, index: int, override: str | None, reason: str, refusal: tuple[str, str]) -> None:
        """A listener's override mailflow refuses (`overrides.X: …`) or a check across its settings: the override
        whose removal ends it, else the listener. An override a role presets goes with its listener (without it the
        role's preset, not Postfix's value, would apply)."""
        listener = self.out.listeners[index]
        overrides = listener["overrides"]
        assert isinstance(overrides, dict)
        role_presets = LISTENER_ROLES[str(listener["role"])]
        if override is None:
            for candidate in [k for k in overrides if k not in role_presets and k != "postscreen"]:
                value = overrides.pop(candidate)
                ended = self._refusal() != refusal
                overrides[candidate] = value
                if ended:
                    override = candidate
                    break
        why = f"mailflow refuses it: {refusal[1]}"
        if override is None or override not in overrides or override in role_presets:
            self._drop_listener(index, why)
            return
        value = overrides.pop(override)
        sources = listener.get("sources", {})
        assert isinstance(sources, dict)
        self.out.leave_out(str(listener.get("origin", "")), f"listener {listener.get('address')} "
                           f"{sources.get(override, 'smtpd.' + override)}", format_setting(override, value)
                           .partition(" = ")[2], why)


_ENTRY_REFUSAL = re.compile(r"(queue\.transport_[a-z_]+): '([^']+)' is not a transport")  # an orphaned entry


def _names(raw: str, parameter: str) -> bool:
    """`raw` is nothing but a reference to `parameter` ($name, ${name}, $(name))."""
    return raw.strip() in (f"${parameter}", f"${{{parameter}}}", f"$({parameter})")


def _client_refusal(parts: list[str], clients: dict[str, dict[str, object]]) -> tuple[str, str] | None:
    """(service, key) when mailflow's refusal is of an imported client service ("smtp.services.NAME.KEY", a check
    of its merged settings too), else None."""
    if len(parts) >= 3 and parts[1] == "services" and parts[2] in clients:
        return parts[2], parts[3] if len(parts) > 3 else ""
    return None


_VALUE_READ = ("queue_directory", "inet_protocols", "mail_name")  # not needed as settings, their values read
TLS_PAIR = ("smtpd.tls_cert_file", "smtpd.tls_key_file")  # smtpd's certificate and its key, read at start
TLS_FILES = ("tls_cert_file", "tls_key_file", "tls_ca_file")  # smtpd's and smtp's, a listener's: files read at start


def _own_pair(listener: dict[str, object]) -> bool:
    """Whether a listener names its own certificate or key (`-o smtpd_tls_cert_file`), not main.cf's."""
    overrides = listener.get("overrides")
    return isinstance(overrides, dict) and ("tls_cert_file" in overrides or "tls_key_file" in overrides)


def _kept_for_tls(missing: str, requirer: str) -> str:
    """Why a certificate or key whose file is not there is kept: `requirer` (a line) requires TLS."""
    return f"{missing}; kept as written: {requirer} requires TLS, and Postfix's smtpd then takes no mail without " \
           "it (MAIL: 530 5.7.0): the output fails `config check` and the start until the file is there"


def missing_file(path: str) -> str | None:
    """Why `path` names no file mailflow could read ("no such file", "a directory"), None when it is there or
    cannot be told by this user (a directory it may not search: the server may run as another)."""
    try:
        found = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "no such file"
    except OSError:
        return None
    return None if stat.S_ISREG(found.st_mode) else "not a regular file"


def _names_relay(value: str) -> bool:
    """Whether a transport table's value (`transport[:nexthop]`) names relay."""
    return _transport_named("_transport", value) == RELAY


def _filter_names_relay(value: str) -> bool:
    """Whether an access or check table's value is a FILTER action (any case) to relay (`FILTER relay:[h]:10025`)."""
    action, _, target = value.strip().partition(" ")
    return action.upper() == "FILTER" and _names_relay(target.strip())


# the restriction items whose argument is a table that may answer FILTER (access(5))
_FILTER_TABLE_ITEMS = frozenset((*ACCESS_CHECKS, *SERVER_ACCESS_CHECKS, REVERSE_CLIENT_ACCESS))
_CHECK_TABLES = ("header_checks", "mime_header_checks", "nested_header_checks", "body_checks")


def _filter_tables(key: str, value: object) -> list[str]:
    """The table specs of a setting that may answer FILTER: cleanup's header/body checks (`checks.*`), and the
    access tables of a restriction list or of the restriction classes."""
    leaf = key.rpartition(".")[2]
    if key.startswith("checks.") and leaf in _CHECK_TABLES and isinstance(value, list):
        return [str(spec) for spec in value]
    items: list[str] = []
    if leaf.endswith("_restrictions") and isinstance(value, list):
        items = [str(item) for item in value]
    elif leaf == "restriction_classes" and isinstance(value, dict):
        items = [str(item) for members in value.values() for item in members]
    return [arg for name, arg in map(split_item, items) if name in _FILTER_TABLE_ITEMS]


def _relay_left_out(relay: Service | None, name: str) -> str:
    """Why a route to relay is not translated: master.cf's relay (`relay`, not an smtp service) was left out."""
    command = relay.command if relay else "relay"
    mail = "relay_domains mail" if name == "relay_transport" else f"{name}'s mail"
    return (f"master.cf's relay ({command}) is left out, so {mail} would go over mailflow's SMTP relay where "
            f"Postfix's goes to that {command} service: set {name} to what does the same")


def _transport_named(key: str, value: object) -> str | None:
    """The transport a `*_transport` or `content_filter` setting's value names (`smtp` of `smtp:[host]:25`)."""
    if not key.endswith(("_transport", "content_filter")) or not isinstance(value, str):
        return None
    return transport_name(value) or None


_LISTENER_REFUSAL = re.compile(r"listener (\d+) \([^)]*\): (?:overrides\.(\w+): )?(.*)", re.S)


def import_postfix(main_cf: str, master_cf: str | None = None, hostname: str | None = None) -> Imported:
    """Translate `main_cf` (and `master_cf`); `hostname`: what $myhostname is when main.cf does not set it
    (default: this system's name as Postfix takes it, gethostname() with .$mydomain or .localdomain when it has no
    dot). Raises UnreadableFile."""
    return Importer(main_cf, master_cf, hostname).run()


def _pattern_files(value: object) -> Iterator[tuple[str, str]]:
    """(kind, path) of each regexp: or pcre: file a written setting names: a table spec, or a restriction's
    (`check_sender_access pcre:/etc/postfix/access`), in any string of `value`'s lists and tables (a listener's
    overrides too); an inline `regexp:{ ... }` names no file (a relative path is not looked for: it is not taken
    from the importer's directory)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _pattern_files(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _pattern_files(item)
    elif isinstance(value, str):
        for word in value.split():
            kind, colon, path = word.partition(":")
            if colon and kind in ("regexp", "pcre") and path.startswith("/"):
                yield kind, path

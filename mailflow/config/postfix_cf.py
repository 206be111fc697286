"""The reading half of `mailflow config import` (mailflow.config.postfix_import): Postfix's files and values.

    logical_lines(path), read_main_cf(path), read_master_cf(path)   UnreadableFile(file, line, reason)
    Expander(raw, hostname).expand(value)        $name expansion; Unexpanded for a name it cannot know
    convert(name, key, value, notes)             a Postfix value as mailflow's setting `key` takes it; Refused(why)
    time_in_seconds(value)                       a Postfix time value in seconds (None: not one)
    merged_timeouts_agree(name, given, mark_defaults=False)   Refused when the Postfix timeouts merged with `name`
                                                 into one mailflow setting take different values
    SETTING_TYPES                                every setting `key` may name (its default: its type), with
                                                 [smtpd.postscreen]'s as `smtpd.postscreen.name`
    table_spec(token, notes), split_list(value)  `type:name` in mailflow's form; a Postfix list's entries
    from_queue_directory(value, queue, notes)    relative `unix:` paths made absolute, as Postfix reads them
    sasl_path_from_queue_directory(...)          a relative smtpd_sasl_path made absolute, as Postfix opens it
    dovecot_sasl_path(value, sasl_type, ...)     smtpd_sasl_path when smtpd_sasl_type is dovecot (that, made
                                                 absolute); Refused under cyrus, Postfix's default type
    Imported, LeftOut                            what an import produces (settings, listeners, pipe and client
                                                 services...), and its TOML
    printable(text)                              non-printable characters escaped (comments, the terminal)
    ImportState                                  what postfix_master's service translation reads and writes

See postfix_import's docstring for the rules.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from mailflow.config import postfix_names as names
from mailflow.files import RefusedFile, read_regular_file
from mailflow.config.main import DEFAULTS
from mailflow.config.show import flat_settings, format_setting
from mailflow.config_source import MAX_FILE_BYTES  # as a mailflow configuration file: a main.cf is a few kilobytes
from mailflow.restriction_vocabulary import list_setting_items


class UnreadableFile(Exception):
    """A main.cf or master.cf that cannot be read: `file:line: reason` (line 0: the file as a whole)."""

    def __init__(self, file: str, line: int, reason: str):
        self.file, self.line, self.reason = file, line, reason
        super().__init__(f"{file}:{line}: {reason}" if line else f"{file}: {reason}")


@dataclass(frozen=True)
class Line:
    """One logical line: where it starts, and its text (continuations joined with a space)."""
    file: str
    number: int
    text: str

    @property
    def where(self) -> str:
        return f"{Path(self.file).name}:{self.number}"


@dataclass(frozen=True)
class LeftOut:
    where: str
    name: str
    value: str
    why: str


@dataclass
class Imported:
    settings: dict[str, object] = field(default_factory=dict)      # "key" / "section.key" -> value
    listeners: list[dict[str, object]] = field(default_factory=list)
    pipes: dict[str, dict[str, object]] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)           # setting -> "main.cf:3: name = value"
    notes: list[str] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)
    # a regexp:/pcre: file line (or a whole file) mailflow's table refuses: the setting is kept, the table fails
    refused_table_lines: list[LeftOut] = field(default_factory=list)
    # a master.cf smtp/lmtp service -> its [smtp.services.NAME] (or lmtp) settings, and `client`: smtp or lmtp
    clients: dict[str, dict[str, object]] = field(default_factory=dict)
    # a per-transport table's entries' lines: "queue.transport_concurrency_limit" -> transport -> "where: name = value"
    entry_origins: dict[str, dict[str, str]] = field(default_factory=dict)
    # the transport master.cf's `relay` is in mailflow when it is not an smtp service ("": none translated)
    relay_service: str = ""

    def set_entry(self, key: str, transport: str, value: object, origin: str) -> None:
        """One entry of a per-transport table (queue.transport_*), its line kept to leave it out alone."""
        table = dict(self.settings.get(key, {}))  # type: ignore[call-overload]
        table[transport] = value
        self.settings[key] = table
        self.entry_origins.setdefault(key, {})[transport] = origin
        self.origins[key] = "; ".join(self.entry_origins[key].values())

    def drop_entry(self, key: str, transport: str, why: str) -> None:
        table = self.settings[key]
        assert isinstance(table, dict)
        del table[transport]
        origin = self.entry_origins.get(key, {}).pop(transport, key)
        where, _, text = origin.partition(": ")
        name, _, value = text.partition(" = ")
        self.leave_out(where, name or f"{key}.{transport}", value, why)
        if table:
            self.origins[key] = "; ".join(self.entry_origins[key].values())
        else:
            del self.settings[key]
            self.origins.pop(key, None)

    def leave_out(self, where: str, name: str, value: str, why: str) -> None:
        self.left_out.append(LeftOut(where, name, value, why))

    def document(self) -> dict[str, object]:
        """The settings as the TOML document's tables."""
        doc: dict[str, object] = {}
        for key, value in self.settings.items():
            *sections, inner = key.split(".")  # smtpd.postscreen.enable: a table in a table
            target = doc
            for section in sections:
                target = target.setdefault(section, {})  # type: ignore[assignment]
                assert isinstance(target, dict)
            target[inner] = value
        if self.listeners:
            smtpd = doc.setdefault("smtpd", {})
            assert isinstance(smtpd, dict)
            smtpd["listeners"] = [_without_origin(listener) for listener in self.listeners]
        if self.pipes:
            doc["pipe"] = {name: _without_origin(service) for name, service in self.pipes.items()}
        for name, client in self.clients.items():
            client_section = doc.setdefault(str(client["client"]), {})
            assert isinstance(client_section, dict)
            client_section.setdefault("services", {})[name] = _without_origin(client)
        return doc

    def toml(self) -> str:
        out = ["# mailflow configuration written by `mailflow config import` from a Postfix configuration.",
               "# Check it with `mailflow config check`; compare with `mailflow config show -n`.",
               "# queue_directory is mailflow's own queue (not Postfix's spool): var/ beside this file unless set."]
        if self.left_out:
            out.append("#")
            out.append(f"# Left out ({len(self.left_out)}): Postfix lines with no translation here.")
            out += [printable(f"#   {item.where}: {item.name}{' = ' + item.value if item.value else ''}  -- {item.why}")
                    for item in self.left_out]
        if self.refused_table_lines:
            out.append("#")
            out.append(f"# Table lines mailflow refuses ({len(self.refused_table_lines)}): each table is kept as "
                       "written and fails whole (4.3.0 on every lookup) until they are fixed.")
            out += [printable(f"#   {item.where}: {item.name}  -- {item.why}") for item in self.refused_table_lines]
        if self.notes:
            out.append("#")
            out += [printable(f"# Note: {note}") for note in dict.fromkeys(self.notes)]
        top = [k for k in self.settings if "." not in k]
        out.append("")
        out += self._lines(top)
        for section in dict.fromkeys(k.rpartition(".")[0] for k in self.settings if "." in k):
            out += ["", f"[{section}]"]
            out += self._lines([k for k in self.settings if k.rpartition(".")[0] == section])
        for listener in self.listeners:
            out += ["", "[[smtpd.listeners]]"]
            out += [format_setting(k, v) for k, v in listener.items() if k not in _PRIVATE]
        for name, service in self.pipes.items():
            out += ["", f"[pipe.{_toml_key(name)}]"]
            out += [format_setting(k, v) for k, v in service.items() if k not in _PRIVATE]
        for name, client in self.clients.items():
            out += ["", f"[{client['client']}.services.{_toml_key(name)}]"]
            out += [format_setting(k, v) for k, v in client.items() if k not in _PRIVATE]
        return "\n".join(out) + "\n"

    def _lines(self, keys: list[str]) -> list[str]:
        out = []
        for key in keys:
            if key in self.origins:
                out.append(printable(f"# {self.origins[key]}"))
            out.append(format_setting(key.rpartition(".")[2], self.settings[key]))
        return out


def printable(text: str) -> str:
    """`text` with each control or other non-printable character as `\\xNN`/`\\uNNNN`: a TOML comment or a terminal
    line stays one line of text (a NUL or an escape sequence from main.cf would break either)."""
    return "".join(c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
                   for c in text)


# where a listener, pipe or client service came from (its line, each setting's -o), a client's kind: not written
_PRIVATE = ("origin", "sources", "client")


def _without_origin(table: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in table.items() if k not in _PRIVATE}


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else '"' + name.replace('"', '\\"') + '"'




# --- reading the files ------------------------------------------------------------------------------------------

def logical_lines(path: str) -> list[Line]:
    """The file's logical lines (postconf(5) SYNTAX); UnreadableFile when it cannot be read."""
    try:
        text = read_regular_file(path, MAX_FILE_BYTES).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnreadableFile(path, 0, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UnreadableFile(path, 0, e.strerror or str(e)) from None
    lines: list[Line] = []
    for number, raw in enumerate(text.split("\n"), 1):  # as Postfix's readlline: \n ends a line, nothing else
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if raw[0] in " \t":
            if not lines:
                raise UnreadableFile(path, number, "a continuation line (it starts with whitespace) before any "
                                                   "line it could continue")
            last = lines[-1]
            lines[-1] = Line(last.file, last.number, f"{last.text} {stripped}")
        else:
            lines.append(Line(path, number, stripped))
    return lines


def read_main_cf(path: str) -> dict[str, tuple[Line, str]]:
    """name -> (its line, raw value), the last definition of each name winning as in Postfix."""
    params: dict[str, tuple[Line, str]] = {}
    for line in logical_lines(path):
        name, eq, value = line.text.partition("=")
        name = name.strip()
        if not eq or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise UnreadableFile(path, line.number, "missing '=' after a parameter name" if not eq
                                 else f"{name!r} is not a parameter name")
        params.pop(name, None)
        params[name] = (line, value.strip())
    return params


@dataclass(frozen=True)
class Service:
    line: Line
    name: str
    kind: str
    maxproc: str
    command: str
    args: tuple[str, ...]


def read_master_cf(path: str) -> list[Service]:
    services = []
    for line in logical_lines(path):
        fields = line.text.split()
        if len(fields) < 8:
            raise UnreadableFile(path, line.number, "a master.cf service needs 8 fields: service type private "
                                                    "unpriv chroot wakeup maxproc command")
        services.append(Service(line, fields[0], fields[1], fields[6], fields[7], tuple(fields[8:])))
    return services


# --- $name expansion --------------------------------------------------------------------------------------------

class Unexpanded(Exception):
    """A $name the importer cannot know (a Postfix default other than the few it has)."""

    def reason(self) -> str:
        return f"refers to {self}, a Postfix default the importer does not know"


class Unsupported(Unexpanded):
    """A `${…}` form the importer does not evaluate (a relational `${{$a} == {b}?…}`, a function call) or one
    Postfix itself refuses (unbalanced braces, an empty name, nesting past 100): the reason."""

    def reason(self) -> str:
        return str(self)


# Postfix 3.7.11's defaults (postconf -d) of the tables that decide which local mail is accepted and where it goes
POSTFIX_TABLE_DEFAULTS = {"alias_maps": "hash:/etc/aliases, nis:mail.aliases",
                          "local_recipient_maps": "proxy:unix:passwd.byname $alias_maps"}
_NAME = re.compile(r"[A-Za-z0-9_]+")
_WHITESPACE = " \t\r\n"
MAX_NESTING = 100  # mac_expand's "unreasonable macro call nesting"


class Expander:
    """$name expansion over main.cf's raw values and Postfix's defaults that matter."""

    def __init__(self, raw: dict[str, str], hostname: str):
        self.raw = dict(raw)
        self.resolved: set[str] = set()  # every name a $name expansion looked up
        self.raw.setdefault("myhostname", hostname)
        if "mydomain" not in self.raw:
            try:
                self.raw["mydomain"] = _parent(self.expand(self.raw["myhostname"]))
            except Unexpanded:
                pass  # myhostname refers to a name the importer cannot know: so does $mydomain (left out)
        self.raw.setdefault("myorigin", "$myhostname")
        self.raw.setdefault("mydestination", "$myhostname, localhost.$mydomain, localhost")
        self.raw.setdefault("mail_name", "Postfix")
        self.raw.setdefault("alias_maps", POSTFIX_TABLE_DEFAULTS["alias_maps"])
        self.raw.setdefault("local_recipient_maps", POSTFIX_TABLE_DEFAULTS["local_recipient_maps"])
        self.raw.setdefault("queue_directory", "/var/spool/postfix")

    def with_names(self, extra: dict[str, str]) -> "Expander":
        """This expansion with more names (master.cf's $service_name and $service_type for a service's -o)."""
        other = Expander.__new__(Expander)
        other.raw = {**self.raw, **extra}
        other.resolved = self.resolved
        return other

    def expand(self, value: str, stack: tuple[str, ...] = ()) -> str:
        """`value` with `$name`, `${name}`, `$(name)`, `${name?text}`, `${name:text}`, `${name?{text}:{text}}` and
        `$$` expanded as mac_parse/mac_expand do (balanced braces, names' values recursively)."""
        if len(stack) > MAX_NESTING:
            raise Unsupported("unreasonable $name nesting (Postfix stops at 100)")
        out, i = [], 0
        while i < len(value):
            char = value[i]
            if char != "$":
                out.append(char)
                i += 1
            elif value[i + 1:i + 2] == "$":
                out.append("$")
                i += 2
            elif value[i + 1:i + 2] in ("{", "("):
                inner, i = _balanced(value, i + 1)
                out.append(self._expression(inner, stack))
            else:
                m = _NAME.match(value, i + 1)
                if not m:
                    raise Unsupported(f"an empty $name at {value[i:i + 20]!r} (Postfix refuses it)")
                out.append(self._lookup(m.group(), stack))
                i = m.end()
        return "".join(out)

    def _lookup(self, name: str, stack: tuple[str, ...]) -> str:
        if name in stack:
            loop = stack[stack.index(name):] + (name,)
            raise Unsupported(f"a $name loop ({' -> '.join('$' + n for n in loop)}): Postfix refuses it")
        if name not in self.raw:
            raise Unexpanded(f"${name}")
        self.resolved.add(name)
        return self.expand(self.raw[name], stack + (name,))

    def _expression(self, text: str, stack: tuple[str, ...]) -> str:
        """The inside of `${…}`: a name, then nothing, `?text`, `:text` or `?{text}:{text}` (mac_expand_callback)."""
        body = text.lstrip(_WHITESPACE)
        m = _NAME.match(body)
        rest = body[m.end():].lstrip(_WHITESPACE) if m else body
        if not m or (rest and rest[0] not in "?:"):
            raise Unsupported(f"expansion form not supported: ${{{text}}}")
        current = self._lookup(m.group(), stack)
        if not rest:
            return current
        branches = {"?": "", ":": ""}
        operator, rest = rest[0], rest[1:]
        if rest.lstrip(_WHITESPACE).startswith("{"):
            branches[operator], rest = _curly(rest.lstrip(_WHITESPACE), text)
            if operator == "?" and rest.startswith(":"):
                if not rest[1:].lstrip(_WHITESPACE).startswith("{"):
                    raise Unsupported(f"expansion form not supported: ${{{text}}}")
                branches[":"], rest = _curly(rest[1:].lstrip(_WHITESPACE), text)
            if rest:
                raise Unsupported(f"unexpected text after }} in ${{{text}}} (Postfix refuses it)")
        else:
            branches[operator] = rest
        chosen = branches["?"] if current else branches[":"]
        return self.expand(chosen, stack)


def _balanced(value: str, start: int) -> tuple[str, int]:
    """The text inside the `{…}` or `(…)` at `start` (nesting counted as mac_parse does), and where it ends."""
    opening = value[start]
    closing = "}" if opening == "{" else ")"
    level, i = 1, start + 1
    while level:
        if i >= len(value):
            raise Unsupported(f"truncated $name reference in {value!r} (Postfix refuses it)")
        level += (value[i] == opening) - (value[i] == closing)
        i += 1
    return value[start + 1:i - 1], i


def _curly(text: str, whole: str) -> tuple[str, str]:
    """`{payload} rest` -> (payload, rest with leading whitespace skipped), as mac_exp_extract_curly_payload."""
    level, i = 0, 0
    while True:
        if i >= len(text):
            raise Unsupported(f"unbalanced {{}} in ${{{whole}}} (Postfix refuses it)")
        level += (text[i] == "{") - (text[i] == "}")
        if level == 0:
            return text[1:i], text[i + 1:].lstrip(_WHITESPACE)
        i += 1


def _parent(hostname: str) -> str:
    return hostname.partition(".")[2] or "localdomain"


# --- values -------------------------------------------------------------------------------------------------------

_INDEXED_TYPES = ("hash", "btree", "lmdb", "cdb", "dbm", "sdbm")  # postmap(1)'s: mailflow reads their source
_FOREIGN_TYPES = ("mysql", "pgsql", "ldap", "memcache", "socketmap", "tcp", "nis", "nisplus", "netinfo", "pipemap",
                  "unionmap", "randmap", "environ", "internal")
SETTING_TYPES = {**flat_settings(DEFAULTS),
                 **{f"smtpd.postscreen.{k}": v for k, v in DEFAULTS.smtpd.postscreen.model_dump().items()},
                 "smtpd.postscreen.command_time_limit": 300.0,  # (unset by default: smtpd's timeout; a duration)
                 # (unset by default: smtpd's; lists)
                 "smtpd.postscreen.discard_ehlo_keywords": (), "smtpd.postscreen.discard_ehlo_keyword_address_maps": (),
                 "smtpd.forbid_bare_newline_exclusions": ()}  # (unset by default: mynetworks)


class Refused(Exception):
    """A value the importer cannot translate (the reason)."""


def split_list(value: str) -> list[str]:
    """A Postfix list: entries separated by commas or blanks; `{ … }` groups kept whole."""
    items, depth, current = [], 0, ""
    for char in value:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if depth == 0 and (char == "," or char.isspace()):
            if current:
                items.append(current)
            current = ""
        else:
            current += char
    if current:
        items.append(current)
    return items


def table_spec(token: str, notes: list[str]) -> str:
    """A `type:name` token in mailflow's form: a proxy: prefix dropped, hash:-like types as texthash: of the same
    file (pcre: is mailflow's too); Refused for a type mailflow has no counterpart of."""
    kind, colon, rest = token.partition(":")
    if not colon or not re.fullmatch(r"[a-z0-9]+", kind):
        return token
    if kind == "proxy":
        return table_spec(rest, notes)
    if kind in _INDEXED_TYPES:
        _check_source(kind, rest, notes)
        notes.append(f"{token} is texthash:{rest} (texthash: reads the source file itself, no postmap)")
        return f"texthash:{rest}"
    if kind in _FOREIGN_TYPES:
        raise Refused(f"mailflow has no {kind}: lookup table")
    return token


_COMPILED_SUFFIX = {"hash": ".db", "btree": ".db", "lmdb": ".lmdb", "cdb": ".cdb", "dbm": ".pag", "sdbm": ".pag"}


def _check_source(kind: str, source: str, notes: list[str]) -> None:
    """A hash:-like table becomes texthash: of its source file: Refused when that file is missing (only Postfix's
    compiled file is there); a note when the compiled file is older or newer than the source (postmap not run
    since the source changed, or the compiled file made from something else)."""
    compiled = Path(source + _COMPILED_SUFFIX[kind])
    try:
        source_time = Path(source).stat().st_mtime
    except OSError:
        extra = f" (only Postfix's compiled {compiled.name} is there)" if compiled.exists() else ""
        raise Refused(f"{kind}:{source}: its source file {source} is missing{extra}, and texthash: reads the "
                      "source") from None
    try:
        compiled_time = compiled.stat().st_mtime
    except OSError:
        return
    if source_time > compiled_time + 1:
        notes.append(f"{source} is newer than {compiled}: Postfix reads the older {compiled.name} until postmap is "
                     "run; texthash: reads the source as it is now")
    elif compiled_time > source_time + 60:
        notes.append(f"{compiled} is newer than {source}: it may hold entries the source lacks (check before "
                     "relying on the source)")


_QUEUE_RELATIVE = re.compile(r"(^|[\s:])unix:(?!/)(?!(?:passwd|group)\.byname\b)(\S+)")


def from_queue_directory(value: object, queue: str, notes: list[str]) -> object:
    """Each relative `unix:path` in `value` (a transport's `lmtp:unix:private/dovecot-lmtp`, a milter's
    `unix:opendkim/opendkim.sock`, a policy service's) from `queue`, as Postfix takes it; the unix: tables stay."""
    if isinstance(value, list):
        return [from_queue_directory(v, queue, notes) for v in value]
    if isinstance(value, dict):
        return {k: from_queue_directory(v, queue, notes) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    new = _QUEUE_RELATIVE.sub(lambda m: f"{m.group(1)}unix:{queue.rstrip('/')}/{m.group(2)}", value)
    if new != value:
        notes.append(f"{value} is {new} (Postfix takes a relative unix: path from queue_directory)")
    return new


def sasl_path_from_queue_directory(value: str, queue: str, notes: list[str], where: str) -> str:
    """smtpd_sasl_path as Postfix's smtpd opens it: a relative path (`private/auth`) is in queue_directory."""
    if not value or value.startswith(("/", "inet:", "unix:")):
        return value
    absolute = f"{queue.rstrip('/')}/{value}"
    notes.append(f"{where}: smtpd_sasl_path {value} is {absolute} (Postfix takes it from queue_directory)")
    return absolute


POSTFIX_SASL_TYPE = "cyrus"  # Postfix's default smtpd_sasl_type (postconf -d)


def dovecot_sasl_path(value: str, sasl_type: str | None, queue: str, notes: list[str], where: str) -> str:
    """smtpd_sasl_path under `sasl_type` (the smtpd_sasl_type that applies to it, expanded; None: none is set, so
    Postfix's default, cyrus): Dovecot's auth socket, as sasl_path_from_queue_directory takes it. Under any other
    type it is a Cyrus SASL application's name (Postfix's default path `smtpd` is one), not a socket: Refused,
    as mailflow speaks only Dovecot's protocol (a path under queue_directory would name a file nothing serves)."""
    kind = (sasl_type or POSTFIX_SASL_TYPE).strip().lower()
    if kind != "dovecot":
        told = f"smtpd_sasl_type is {kind}" if sasl_type is not None else \
            f"smtpd_sasl_type is {POSTFIX_SASL_TYPE} (Postfix's default: no smtpd_sasl_type line)"
        raise Refused(f"{told}, so {value or '(empty)'} names a Cyrus SASL application, not Dovecot's auth socket; "
                      f"mailflow speaks only Dovecot's protocol (smtpd.sasl_type = \"dovecot\")")
    return sasl_path_from_queue_directory(value, queue, notes, where)


def time_in_seconds(value: str) -> float | None:
    """A Postfix time value (`300s`, `5m`, a bare number of seconds) in seconds; None when it is not one."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", value)
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)] if m else None


def merged_timeouts_agree(name: str, given: Callable[[str], str | None], *, mark_defaults: bool = False) -> None:
    """Refused when `name` is one of the Postfix timeouts mailflow merges into one setting (smtp_mail_timeout,
    smtp_rcpt_timeout… -> smtp.command_timeout) and their values differ: one would change the others'. Each
    value is what `given` says (asked once a name), else Postfix's default (`(default)` after it with
    `mark_defaults`)."""
    if name not in names.MERGED_DEFAULTS:
        return
    merged = [n for n, keys in names.SETTINGS.items() if keys == names.SETTINGS[name]]
    told = {n: given(n) for n in merged}
    values = {n: told[n] or names.MERGED_DEFAULTS[n] for n in merged}
    if len({time_in_seconds(v) for v in values.values()}) > 1:
        shown = ", ".join(f"{n} = {v}{' (default)' if mark_defaults and told[n] is None else ''}"
                          for n, v in values.items())
        raise Refused(f"mailflow's {names.SETTINGS[name][0]} is one value for {len(merged)} Postfix timeouts, and "
                      f"they differ ({shown})")


def reject_tempfail_action(value: str) -> str:
    """reject_tempfail_action's value (Postfix reads it without regard to case), as the tempfail actions it stands
    for take it; Refused, once for all of them, with the reason."""
    action = value.strip().lower()
    if action not in ("defer_if_permit", "defer"):
        raise Refused(f"not defer_if_permit or defer (the value of smtpd.{', '.join(names.REJECT_TEMPFAIL_ACTIONS)} "
                      "unless set)")
    return action


# postscreen_tls_security_level's levels Postfix's postscreen takes as encrypt, with a warning (psc_smtpd_init)
_POSTSCREEN_ENCRYPT_LEVELS = ("secure", "verify", "fingerprint")


# what mailflow refuses under every smtpd_forbid_bare_newline word and for the excluded clients, where Postfix 3.7.11
# takes it (its smtpd ends a command at a LF only): the one difference left under no
COMMAND_LINE_CR = ("a bare <CR> in a command line gets 521 5.5.2 and a disconnect from mailflow, from every client "
                   "(Postfix takes it)")


def _forbid_bare_newline(name: str, value: str, notes: list[str]) -> bool:
    """Postfix 3.7.11's smtpd_forbid_bare_newline words (any case, postconf(5)) as smtpd.forbid_bare_newline: reject
    is true; normalize, its alias yes, and no are false (Postfix's no: a bare LF ends a line, a "." line ends DATA
    whatever its line ends, a stray CR is stored as a space as cleanup_replace_stray_cr_lf stores it). Each
    difference from Postfix's behaviour is noted: reject's reply and disconnect, and its bare CR; normalize's end of
    DATA; for every word, the bare CR in a command line (COMMAND_LINE_CR)."""
    word = value.lower()
    if word not in ("normalize", "yes", "reject", "no"):
        raise Refused("not normalize, yes, reject or no")
    if word == "reject":
        notes.append(f"{name} = {value}: mailflow replies 521 5.5.2 and disconnects, after a command as in DATA; "
                     "Postfix 3.7.11 replies smtpd_forbid_bare_newline_reject_code (550) and disconnects after a "
                     "command, but after DATA only refuses the message. mailflow also refuses a bare <CR> so, which "
                     "Postfix takes (its cleanup_replace_stray_cr_lf stores a space). smtpd_forbid_bare_newline_"
                     "exclusions (smtpd.forbid_bare_newline_exclusions) spares mynetworks by default in both: their "
                     f"bare <LF> ends a line and a stray <CR> is stored as a space; but {COMMAND_LINE_CR}")
        return True
    if word == "no":
        notes.append(f"{name} = {value}: mailflow's false is Postfix's no; but {COMMAND_LINE_CR}")
    else:
        notes.append(f"{name} = {value}: mailflow's false is Postfix's no: a \".\" line ends DATA whatever its line "
                     "ends, for every client; Postfix's normalize ends DATA only at <CR><LF>.<CR><LF> for the "
                     "clients outside smtpd_forbid_bare_newline_exclusions (and drops one <CR> before their <LF>, "
                     f"where no drops them all); and {COMMAND_LINE_CR}" + (
                         "; before Postfix 3.7.10, yes meant reject (and disconnect)" if word == "yes" else ""))
    return False


def legacy_tls_level(enforce: bool, use: bool, peername: bool = False) -> str:
    """Postfix 3.7's level without a *_tls_security_level (smtpd.c, smtp_tls_policy.c, postscreen): enforce is
    encrypt (verify with smtp_tls_enforce_peername), else use_tls is may, else none."""
    return ("verify" if peername else "encrypt") if enforce else "may" if use else "none"


SASL_OPTIONS = ("smtpd_sasl_security_options", "smtpd_sasl_tls_security_options")  # judged together


def sasl_security_options(name: str, value: str, tls_options: str | None) -> str:
    """smtpd_sasl_security_options or smtpd_sasl_tls_security_options as Postfix 3.7.11's smtpd takes them: a TLS
    session (the only one where mailflow offers AUTH) is judged on the tls options, whose default is the others
    (smtpd.c). `tls_options`: the tls options' value where set, else None. Refused when a TLS session's options hold
    noplaintext or mutual_auth (Postfix then offers neither PLAIN nor LOGIN, mailflow's mechanisms); the reason of
    the note otherwise: PLAIN and LOGIN refused only outside TLS, as mailflow (when the tls options refuse neither),
    or not needed."""
    excluding = ", ".join(w for w in split_list(value.lower()) if w in ("noplaintext", "mutual_auth"))
    if not excluding:
        return f"not needed: {names.NOT_NEEDED[name]}"
    if name == "smtpd_sasl_security_options" and tls_options is not None:
        if any(w in ("noplaintext", "mutual_auth") for w in split_list(tls_options.lower())):
            return (f"not needed: {excluding} judges sessions outside TLS, where mailflow offers no AUTH (TLS "
                    f"sessions: smtpd_sasl_tls_security_options = {tls_options}, judged on its own)")
        return (f"{excluding} outside TLS only (smtpd_sasl_tls_security_options = {tls_options}): Postfix offers "
                "PLAIN and LOGIN only after STARTTLS, as mailflow does")
    raise Refused(f"with {excluding}, Postfix offers neither PLAIN nor LOGIN" + (
        "" if name == "smtpd_sasl_security_options" else " in TLS sessions") + "; mailflow offers both (over TLS)")


_PEM_BEGIN = re.compile(r"^-----BEGIN ([A-Z0-9 ]+)-----", re.MULTILINE)
_PEM_FILE_BYTES = 1 << 20


LEGACY_CERTIFICATES = ("smtpd_tls_cert_file", "smtpd_tls_key_file", "smtpd_tls_dcert_file", "smtpd_tls_dkey_file",
                       "smtpd_tls_eccert_file", "smtpd_tls_eckey_file")  # ignored under smtpd_tls_chain_files


def chain_files_pair(files: list[str], queue: str, notes: list[str]) -> tuple[str, str]:
    """smtpd_tls_chain_files (PEM files that, concatenated, are key1, cert1, [chain1], key2, …) as mailflow's one
    (certificate file, key file): one key, first, its certificate and chain in one file (the key's or the next).
    A relative file is taken from `queue` (queue_directory: Postfix's smtpd opens its TLS files from there; noted).
    A file this user cannot read (a key readable by root only) is told by its place: the only file holds both, a
    file before one of certificates is the key, a file after a key alone holds the certificates. Refused: several
    keys (mailflow's smtpd serves one certificate), or other layouts of one key (its certificate and chain in two
    files, the key's and another's: the reason says to concatenate them), or files whose roles cannot be told."""
    files = [_tls_file_from_queue_directory(path, queue, notes) for path in files]
    kinds: list[list[str] | None] = []
    for path in files:
        try:
            text = read_regular_file(path, _PEM_FILE_BYTES).decode("ascii", errors="replace")
        except (OSError, RefusedFile):
            kinds.append(None)  # (a missing one is named by the certificate check, as smtpd_tls_cert_file's)
            continue
        kinds.append(["key" if label.endswith("PRIVATE KEY") else "cert" for label in _PEM_BEGIN.findall(text)
                      if label.endswith(("PRIVATE KEY", "CERTIFICATE"))])
    if len(files) == 1:
        known = kinds[0]
        if known is None or (known[:1] == ["key"] and known.count("key") == 1):
            return files[0], files[0]
    elif len(files) == 2:
        first, second = kinds
        if (first is None or first == ["key"]) and (second is None or (second and "key" not in second)) and \
                (first, second) != (None, None):
            return files[1], files[0]
    keys = sum(known.count("key") for known in kinds if known is not None)
    if keys > 1:
        raise Refused(f"{keys} keys with their certificates: mailflow's smtpd serves one certificate (set "
                      "smtpd.tls_cert_file and smtpd.tls_key_file to one of the pairs)")
    raise Refused("mailflow's smtpd takes one key and its certificate chain, the certificates in one file (the "
                  "key's or the next): "
                  + ("a file here cannot be read to tell which holds what; " if None in kinds else "")
                  + "concatenate the certificate files into one (cat cert.pem chain.pem > fullchain.pem) and set "
                    "smtpd.tls_cert_file and smtpd.tls_key_file")


def _tls_file_from_queue_directory(path: str, queue: str, notes: list[str]) -> str:
    if not path or os.path.isabs(path):
        return path
    absolute = os.path.join(queue, path)
    notes.append(f"{path} is {absolute} (Postfix opens a relative TLS file from queue_directory)")
    return absolute


def convert(name: str, key: str, value: str, notes: list[str]) -> object:
    """`value` (expanded) as mailflow's `key` takes it; Refused with the reason."""
    if key == "smtpd.postscreen.tls_security_level" and value.lower() in _POSTSCREEN_ENCRYPT_LEVELS:
        notes.append(f"{name} = {value} is encrypt, as Postfix's postscreen takes it (unsupported TLS level)")
        return "encrypt"
    if key == "smtpd.forbid_bare_newline":
        return _forbid_bare_newline(name, value, notes)
    default = SETTING_TYPES[key]
    if isinstance(default, bool):
        if value.lower() not in ("yes", "no", "true", "false"):
            raise Refused("not yes or no")
        return value.lower() in ("yes", "true")
    if isinstance(default, int):
        if not re.fullmatch(r"-?\d+", value):
            raise Refused("not a number")
        return int(value)
    if isinstance(default, float):
        m = re.fullmatch(r"(\d+)([smhdw]?)", value)
        if not m:
            raise Refused("not a Postfix time value (a number with an optional s, m, h, d or w)")
        return f"{m.group(1)}{m.group(2) or names.DURATION_UNITS.get(name, 's')}"
    if isinstance(default, tuple):
        tokens = [table_spec(t, notes) for t in split_list(value)]  # (a domain list's /file/name as it is)
        return list_setting_items(tokens, key)
    return table_spec(value, notes) if key.endswith("_transport") or "maps" in key else value


class ImportState(Protocol):
    """What the translation of master.cf's services reads (main.cf's parameters, its expansion, the services, the
    listen addresses) and writes (the result)."""
    out: Imported
    params: dict[str, tuple[Line, str]]
    expander: Expander
    services: list[Service] | None

    def interfaces(self) -> list[str]: ...

    def queue_directory(self) -> str: ...



"""What every configuration section is made of: the frozen base model and the value types shared by sections.

    Section                  pydantic base: frozen, unknown keys rejected, no integer beyond 64 bits, no true or
                             false for an integer
    Duration                 seconds, from a number or "30s", "5m", "1h", "5d", "1w" (mailflow.syntax)
    Restriction              one smtpd restriction list item, checked against mailflow.restriction_vocabulary
                             (a name of the section's `restriction_classes`, validated before it, is one too)
    RestrictionClasses       smtpd's restriction classes: name (any case, kept in lower case) -> list of items, as
                             a FrozenMap (a read-only, hashable dict: a section stays immutable and hashable)
    TableSpecs               a list of `type:name` lookup tables (mailflow.tables.check_spec: a known type; an
                             inline:, static: or unix: table that opens)
    InlineTableSpecs         the same, none of a type whose lookup may wait (sqlite:, unix:): for a setting
                             looked up on the event loop for each line as mail streams or each reply (content
                             checks, reply filter, postscreen's reply footers), where no lookup may be moved off
                             the loop
    Networks                 a network list as Postfix's mynetworks (mailflow.tables.networks): networks
                             ("10.0.0.0/8", "::1/128"; Postfix's "[::1]/128" is taken, the brackets dropped),
                             "!pattern", "/file/name", "cidr:/path"; host bits set ("10.0.0.1/8") or a netmask
                             ("/255.0.0.0") are refused (Postfix takes them and fails every lookup reaching them)
    HostPorts                a list of "host:port" addresses
    PostfixInt               an integer setting whose Postfix parameter is a C int: at most POSTFIX_INT_MAX
    Relayhost, Transport     a relayhost, a `transport[:nexthop]` setting (check_relayhost, check_transport);
    TransportOverride        the latter or "" (the main setting's, for a section that overrides it)
    BUILTIN_TRANSPORTS       the transport names a [pipe.NAME] or an SMTP/LMTP client service may not take
    RELAY                    `relay`: relay_transport's default, an SMTP client of its own (Postfix's master.cf
                             service of that name)
    each_one_of(items, allowed)  the items, when each is one of `allowed` (a list of keywords)
    check_transport(value)   a `transport` or `transport:nexthop` setting (TRANSPORT_NAME: a transport's name)
    transport_name(value)    the transport of a `transport[:nexthop]` value, stripped ("" for `:nexthop`)
    check_service_names(services, replaceable=())  the services, when each name is a transport's and no built-in
                             one's but `replaceable`'s
    check_relayhost(value)   a relayhost: host, host:port, [host] or [address], with :port or not
    validation_key(err)      one pydantic error's place as the dotted KEY ("smtpd.listen", "pipe.x.argv[0]"; ""
                             for the top level)
    validation_reason(err)   one pydantic error as the REASON of `FILE: KEY: REASON` (one string where a list is
                             wanted: the TOML array it means, `["a", "b"]` for main.cf's "a, b", as `config
                             import` splits it)
    NestedRefusal(key, reason)   a model validator's refusal of a key below its model (a service's merged
                             settings: `services.NAME.KEY`), which validation_key and validation_reason name
    overlay(section, layers, exclude=, merged_tables=)   the section with each layer's keys in place of its own,
                             validated as the section is (a service's and a listener's effective settings)

Failure behaviour: the validators raise ValueError; `mailflow.config.load` turns the first one into a
`ConfigError` naming the file and the dotted key.
"""
from __future__ import annotations

import json
import re
from typing import Annotated, Iterable, Mapping, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import ErrorDetails

from mailflow.restriction_vocabulary import check_classes, check_item, list_setting_items
from mailflow.address import is_valid_domain
from mailflow.syntax import (BLOCKING_TABLE_TYPES, parse_duration, parse_hostport, parse_ip, split_outside_braces,
                             table_type)
from mailflow.tables import check_spec
from mailflow.tables.match_list import PatternFiles
from mailflow.tables.networks import check_network_list


MAX_INT = 2**63 - 1
POSTFIX_INT_MAX = 2**31 - 1  # a Postfix int parameter's largest (mail_conf_int.c: "bad numerical configuration")
# Postfix's relay_transport default: the smtp service its stock master.cf runs under that name (the one place
# that spells it: the config's SMTP clients, the import and the transports read it here).
RELAY = "relay"
# The transports mailflow has built in: a [pipe.NAME] or a [smtp.services.NAME] / [lmtp.services.NAME] takes none.
BUILTIN_TRANSPORTS = ("local", "virtual", "smtp", RELAY, "lmtp", "discard", "error", "capture")
TRANSPORT_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a transport (built in or [pipe.NAME]) as transport_maps name it
_TRANSPORT_NEXTHOP = re.compile(rf"{TRANSPORT_NAME.pattern}(:.*)?")  # transport or transport:nexthop


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_truth_value_for_a_number(cls, value, info: ValidationInfo):
        """pydantic's lax mode takes true as 1: `hopcount_limit = true` made every message a mail loop. Postfix
        refuses `yes` for a number ("bad numerical configuration"); so does this (a duration's own parser does)."""
        if isinstance(value, bool) and cls.model_fields[info.field_name or ""].annotation is int:
            raise ValueError(f"{str(value).lower()} is not a number")
        return value

    @field_validator("*")
    @classmethod
    def _within_64_bits(cls, value):
        """A number given as a string ("999999999999999999999") is taken as an int without limit; no setting
        needs more than SQLite and the OS take (a signed 64-bit integer), and past it a limit breaks the code
        that uses it, not the start."""
        if isinstance(value, int) and not isinstance(value, bool) and not -MAX_INT <= value <= MAX_INT:
            raise ValueError(f"{value} is too large (at most {MAX_INT})")
        return value


def _table_specs(specs: tuple[str, ...]) -> tuple[str, ...]:
    for spec in specs:
        check_spec(spec)
    return specs


def _inline_table_specs(specs: tuple[str, ...]) -> tuple[str, ...]:
    for spec in _table_specs(specs):
        if table_type(spec) in BLOCKING_TABLE_TYPES:
            raise ValueError(f"{spec!r}: a {table_type(spec)}: lookup may wait, and this setting is looked up on the "
                             "event loop (for each line as mail streams, or each reply); use regexp:, pcre:, "
                             "texthash:, "
                             "cidr: or inline:")
    return specs


def _networks(items: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
    files = PatternFiles()
    checked = check_network_list(items, files)
    keep_file_comments(info, files)
    return checked


FILE_COMMENTS = "pattern_file_comments"  # the validation context's list of them (mailflow.config.load fills it)


def keep_file_comments(info: ValidationInfo, files: PatternFiles) -> None:
    """The comments that ended lines of a setting's /files, each `KEY: FILE, line N: …`, added to the validation
    context's FILE_COMMENTS list when the caller gave one (Config.warnings() gives them)."""
    found = (info.context or {}).get(FILE_COMMENTS)
    if found is not None:
        found.extend(f"{info.field_name}: {comment}" for comment in files.comments)


class FrozenMap(dict):
    """A dict that cannot be changed in place and can be hashed, for a table-valued setting of a frozen section."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))  # (equal maps hash alike, whatever their order)

    def _read_only(self, *args, **kwargs):
        raise TypeError("a configuration setting cannot be changed in place")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only


def _restriction(item: object, info: ValidationInfo) -> str:
    return check_item(item, info.data.get("restriction_classes") or ())


def _restriction_classes(value: object) -> dict[str, tuple[str, ...]]:
    """name -> items; the names in lower case (a list item's name is matched in lower case), each item checked
    with every class name allowed, then the classes as a whole (names, references, loops)."""
    if not isinstance(value, dict):
        raise ValueError("a table of restriction classes: name = [\"restriction\", ...]")
    classes: dict[str, tuple[str, ...]] = {}
    for name, items in value.items():
        key = str(name).lower()
        if key in classes:
            raise ValueError(f"{name!r}: restriction class defined twice (names are compared in any case)")
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError(f"{name!r}: a restriction class is a non-empty list of restrictions")
        classes[key] = tuple(items)
    for key, items in classes.items():
        checked = []
        for index, item in enumerate(items):
            try:
                checked.append(check_item(item, classes))
            except ValueError as e:
                raise ValueError(f"{key}[{index}]: {e}") from None
        classes[key] = tuple(checked)
    check_classes(classes)
    return classes


def _host_ports(items: tuple[str, ...]) -> tuple[str, ...]:
    for item in items:
        parse_hostport(item)
    return items


def check_transport(value: str) -> str:
    """A transport setting as trivial-rewrite takes it: `transport` or `transport:nexthop` (Postfix's
    default_transport and the like); the transport's name is letters, digits, '_' and '-'."""
    if not _TRANSPORT_NEXTHOP.fullmatch(value):
        raise ValueError(f"{value!r} is not transport or transport:nexthop")
    return value


def transport_name(value: str) -> str:
    """The transport of a `transport[:nexthop]` value (a route, a content_filter, a FILTER action's target, a
    transport table's answer): `relay` of `relay:[h]:25`, "" for ":[h]" (the next hop only) or ""."""
    return value.partition(":")[0].strip()


def check_relayhost(value: str) -> str:
    """`value` when it is empty or names a host (a host name as Postfix's valid_hostname takes it, or an IP address,
    `ipv6:` before it or not) and maybe a port."""
    if value:
        host, _ = parse_hostport(value, default_port=25)
        address = host[5:] if host[:5].lower() == "ipv6:" else host
        if not (is_valid_domain(host) or parse_ip(address)):
            raise ValueError(f"{value!r}: {host!r} is not a host name or an IP address")
    return value


def each_one_of(items: tuple[str, ...], allowed: tuple[str, ...]) -> tuple[str, ...]:
    for item in items:
        if item not in allowed:
            raise ValueError(f"{item!r}: not one of {', '.join(allowed)}")
    return items


Duration = Annotated[float, BeforeValidator(parse_duration)]
Restriction = Annotated[str, BeforeValidator(_restriction)]
RestrictionClasses = Annotated[dict[str, tuple[str, ...]], BeforeValidator(_restriction_classes),
                               AfterValidator(FrozenMap)]
# Checked as a whole (not item by item), so that an error names the setting, not `setting[0]`.
TableSpecs = Annotated[tuple[str, ...], AfterValidator(_table_specs)]
InlineTableSpecs = Annotated[tuple[str, ...], AfterValidator(_inline_table_specs)]
Networks = Annotated[tuple[str, ...], AfterValidator(_networks)]
HostPorts = Annotated[tuple[str, ...], AfterValidator(_host_ports)]
Relayhost = Annotated[str, AfterValidator(check_relayhost)]  # "" (none) or a host, maybe with a port
Transport = Annotated[str, AfterValidator(check_transport)]
# an integer setting whose Postfix parameter is an int (its daemons' CONFIG_INT_TABLE / CONFIG_NINT_TABLE): at most
# POSTFIX_INT_MAX, as Postfix takes it (tests/unit/test_postfix_ranges.py sweeps them)
PostfixInt = Annotated[int, Field(le=POSTFIX_INT_MAX)]
TransportOverride = Annotated[str, AfterValidator(lambda v: check_transport(v) if v else v)]  # "": the main one


class NestedRefusal(ValueError):
    """A model validator's refusal of a key below its model (`services.NAME.KEY` of a service's merged settings):
    validation_key and validation_reason name that key and its reason, as pydantic's own refusal of it would."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


def _nested(err: ErrorDetails) -> NestedRefusal | None:
    error = err.get("ctx", {}).get("error")
    return error if isinstance(error, NestedRefusal) else None


def validation_key(err: ErrorDetails) -> str:
    nested = _nested(err)
    loc = list(err["loc"]) + ([nested.key] if nested else [])
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def validation_reason(err: ErrorDetails) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown setting"
    nested = _nested(err)
    if nested:
        return nested.reason
    if err["type"] in LIST_TYPES:
        return _not_a_list(err["input"], validation_key(err))
    if err["type"] in TABLE_TYPES:
        return f"takes a table (TOML {{ key = value }}, or a [section]), not {_kind(err['input'])}"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


LIST_TYPES = frozenset(("tuple_type", "list_type", "set_type", "frozen_set_type"))
TABLE_TYPES = frozenset(("dict_type", "model_type"))


def _not_a_list(value: object, key: str) -> str:
    """The reason for a single value where a setting takes a list (a TOML array), which a Postfix user writes as
    main.cf's one string ("a, b c"): the array that string means, its items as `config import` makes them (split
    at commas and blanks outside `{...}`; a restriction list's `name argument` pairs kept together), written as
    TOML writes strings (non-ASCII as it is)."""
    if isinstance(value, str) and value.strip():
        try:
            words = split_outside_braces(value)
        except ValueError:  # (an unbalanced brace: no array to suggest)
            return "takes a list (a TOML array): [...], not one string"
        items = ", ".join(json.dumps(item, ensure_ascii=False) for item in list_setting_items(words, key))
        return f"takes a list (a TOML array): [{items}], not one string"
    if isinstance(value, dict):
        return "takes a list (a TOML array): [...], not a table"
    return f"takes a list (a TOML array): [...], not {_kind(value)}"


def _kind(value: object) -> str:
    return f"{type(value).__name__} {str(value)[:40]!r}"


S = TypeVar("S", bound=Section)
V = TypeVar("V")


def check_service_names(services: dict[str, V], replaceable: tuple[str, ...] = ()) -> dict[str, V]:
    """Each service's name ([pipe.NAME], [smtp.services.NAME], [lmtp.services.NAME]) is a transport's, as
    transport_maps name it, and none of the built-in transports' but those in `replaceable`."""
    for name in services:
        if name in BUILTIN_TRANSPORTS and name not in replaceable:
            raise ValueError(f"{name!r} is the name of a built-in transport")
        if not TRANSPORT_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a transport name (letters, digits, '_', '-')")
    return services


def overlay(section: S, layers: Iterable[Mapping[str, object]], *, exclude: set[str],
            merged_tables: Iterable[str] = ()) -> S:
    """`section` (without the keys `exclude`) with each layer's keys in place of its values in turn (a table named in
    `merged_tables` merged key by key instead), validated as the section is, its cross-key checks too: the one way
    a service's ([smtp.services.NAME]) and a listener's ([[smtpd.listeners]]) effective settings are made."""
    data = section.model_dump(exclude=exclude)
    tables = set(merged_tables)
    for layer in layers:
        for key, value in layer.items():
            below = data.get(key)
            if key in tables and isinstance(value, dict) and isinstance(below, dict):
                value = {**below, **value}
            data[key] = value
    return type(section).model_validate(data)

"""master.cf services for `mailflow config import` (mailflow.config.postfix_import runs it per service line).

    translate_service(importer, service)

`smtpd` inet services: the `smtp` service's port is the listen addresses' (postfix_import), any other becomes a
`[[smtpd.listeners]]` entry on each inet_interfaces address (or the host the service names: a content filter's return
listener, `127.0.0.1:10025`), its `-o name=value` through the one table as overrides of [smtpd] settings; role
`submissions` for `-o smtpd_tls_wrappermode=yes`, `submission` for `-o smtpd_tls_security_level=encrypt` with AUTH, else
`mta`; the role's presets Postfix's line does not state are written out as overrides with Postfix's values, so the role
changes nothing the line did not say. A `postscreen` inet service turns [smtpd.postscreen] on (smtpd.postscreen.enable)
for its port, which takes the `smtpd pass` service's -o; every smtpd service's listener then gets
`postscreen = {enable = false}` (Postfix screens the postscreen port only). `pipe` services become `[pipe.NAME]` (flags,
user, argv, size, null_sender, directory; a bare argv[0] is the path execvp finds on Postfix's PATH, PIPE_PATH).
Postfix's own services under their own names with no `-o` are built in;
a maxproc on a transport becomes queue.transport_concurrency_limit, on an smtpd service smtpd.max_sessions (the
`smtp` service's in [smtpd], another's as its listener's override where it differs; 0 is left out). Another smtp
or lmtp service (`smtp-amavis`, `slow`) is an `[smtp.services.NAME]` (or lmtp) of its name: each -o that is one of
that client's settings through the one table, syslog_name, max_use and the like noted as not needed, a built-in
behaviour's (disable_dns_lookups = no) noted, anything else left out with the reason; its maxproc as any
transport's; so is Postfix's own `relay` service with an -o that translates (it replaces the built-in relay,
[smtp]'s otherwise). Postfix's own `smtp`/`lmtp`/`relay` with only -o mailflow does not need (syslog_name, max_use)
keep their maxproc, the -o noted (syslog_name as what mailflow logs instead). A `relay` run by another daemon
(lmtp, pipe, discard, error, local, virtual) sets `out.relay_service`, the transport that does the same in mailflow
(that built-in one, or a `relay-lmtp` / `relay-pipe` service of the line), for postfix_import's relay_transport.
Another instance of any other daemon
(`local2 … local`) and anything else is left out with the reason (and postfix_import leaves out a setting naming a
transport mailflow then does not have).
"""
from __future__ import annotations

import dataclasses
import os
import re

from mailflow.config import postfix_names as names
from mailflow.config.base import BUILTIN_TRANSPORTS, RELAY, TRANSPORT_NAME
from mailflow.config.delivery import REPLACEABLE
from mailflow.config.postfix_cf import (LEGACY_CERTIFICATES, SASL_OPTIONS, Expander, ImportState, Refused, Service,
                                        Unexpanded, chain_files_pair, convert,
                                        legacy_tls_level, dovecot_sasl_path, from_queue_directory,
                                        merged_timeouts_agree, reject_tempfail_action, sasl_security_options)
from mailflow.config.smtpd import LISTENER_ROLES, SECTION_ONLY

# Postfix's own daemons: mailflow has each of them built in.
BUILT_IN_SERVICES = ("pickup", "cleanup", "qmgr", "oqmgr", "tlsmgr", "trivial-rewrite", "bounce", "verify", "flush",
                     "proxymap", "showq", "error", "discard", "local", "virtual", "lmtp", "anvil", "scache",
                     "postlogd", "smtp")
TRANSPORTS = ("smtp", "relay", "lmtp", "local", "virtual", "error", "discard")
PORTS = {"smtp": 25, "submission": 587, "smtps": 465, "submissions": 465}
# -o names mailflow does not carry over whatever they say, and why (syslog_name's note is _not_needed_note's own: it
# says which program a service's lines are logged as, which differs for relay)
_NOT_NEEDED_OVERRIDES = {"syslog_name": "mailflow names each line's program itself, under log.syslog_name",
                         "milter_macro_daemon_name": "mailflow sends the milter macros it has itself",
                         **dict.fromkeys(("inet_interfaces", "inet_protocols"),
                                         "Postfix's master(8) binds the service to main.cf's inet_interfaces (or "
                                         "its host:port) whatever its -o says, as mailflow's listener does; the "
                                         "-o only tells its smtpd which addresses are its own "
                                         "(permit_inet_interfaces), which mailflow takes from the connection")}
# parameters an smtpd service's -o may set that its smtpd does not read (a note: applies to nothing)
_NOT_SMTPD_S = {"non_smtpd_milters": "Postfix's smtpd runs its smtpd_milters; non_smtpd_milters are cleanup's, for "
                                     "mail that did not come through smtpd"}
# Daemons a master.cf `relay` may run (instead of smtp) that mailflow has as a built-in transport of the same name,
# reading the same main.cf settings: relay_transport names that one when the service has no -o that matters
_RELAY_AS_BUILT_IN = ("lmtp", "discard", "error", "local", "virtual")


def translate_service(importer: ImportState, service: Service) -> None:
    out = importer.out
    try:
        if service.kind == "inet" and service.command in ("smtpd", "postscreen"):
            _smtpd_service(importer, service)
        elif service.name == RELAY and service.command != "smtp":
            _relay_of_another_daemon(importer, service)
        elif service.command == "pipe":
            _pipe_service(importer, service)
        elif _postfix_s_own(service) and service.name in TRANSPORTS:
            _transport_service(importer, service)
        elif _postfix_s_own(service) and not _options(service):
            pass
        elif service.kind == "pass" and service.command == "smtpd":
            pass  # postscreen's hand-off: its -o were applied with the postscreen service
        elif service.command in ("dnsblog", "tlsproxy"):
            out.notes.append(f"{service.line.where}: {service.name} ({service.command}) serves postscreen only")
        elif service.command in ("smtp", "lmtp"):
            _client_service(importer, service)
        elif service.command in BUILT_IN_SERVICES:
            raise Refused(f"another {service.command} service: mailflow has one {service.command} transport, "
                          f"set in its section (a setting naming {service.name} is left out too)")
        else:
            raise Refused(f"a {service.command} service: mailflow has no counterpart")
    except Refused as e:
        out.leave_out(service.line.where, f"master.cf {service.name}", service.line.text, str(e))
    except Unexpanded as e:
        out.leave_out(service.line.where, f"master.cf {service.name}", service.line.text, e.reason())


def _postfix_s_own(service: Service) -> bool:
    """Whether the service is one of Postfix's own under its own name (`smtp … smtp`, `rewrite … trivial-rewrite`),
    not another instance of a daemon (`slow … smtp`, `local2 … local`) a setting may name as its transport."""
    return service.command in BUILT_IN_SERVICES and service.command in _OWN_NAMES.get(service.name, (service.name,))


_OWN_NAMES = {"rewrite": ("trivial-rewrite",), "defer": ("bounce",), "trace": ("bounce",), "relay": ("smtp",),
              "retry": ("error",), "proxywrite": ("proxymap",), "postlog": ("postlogd",), "qmgr": ("qmgr", "oqmgr")}


def _options(service: Service) -> list[tuple[str, str]]:
    """The `-o name=value` pairs of a service (`-o name = value`, `-o { name = value }` too); Refused for other
    arguments."""
    args, pairs, i = list(service.args), [], 0
    while i < len(args):
        if args[i].lower().startswith("flags=") and service.command in ("smtp", "lmtp"):
            raise Refused(f"{args[i]}: Postfix 3.5's {service.command}(8) flags (D: Delivered-To, O: X-Original-To, "
                          f"R: Return-Path headers; X: final delivery): mailflow's {service.command} client has none")
        if args[i] != "-o" or i + 1 >= len(args):
            raise Refused(f"argument {args[i]!r}: only -o name=value is translated")
        text, i = args[i + 1], i + 2
        if text.startswith("{"):  # Postfix 3.0's `-o { name = value with spaces }`
            while not text.endswith("}") and i < len(args):
                text, i = f"{text} {args[i]}", i + 1
            if not text.endswith("}"):
                raise Refused(f"-o {text}: no closing }}")
            name, eq, value = text[1:-1].partition("=")
            name, value = name.strip(), value.strip()
        else:
            if "=" not in text and i + 1 < len(args) and args[i] == "=":
                text, i = f"{text}={args[i + 1]}", i + 2
            name, eq, value = text.partition("=")
        if not eq:
            raise Refused(f"-o {text}: not name=value")
        pairs.append((name, value))
    return pairs


def _transport_service(importer: ImportState, service: Service) -> None:
    if service.name == RELAY and not any(name == "syslog_name" for name, _ in _options(service)):
        importer.out.notes.append(f"{service.line.where}: relay has no -o syslog_name: Postfix logs its lines as "
                                  "smtp (a master.cf from before Postfix 3.3); mailflow logs them as relay/smtp")
    if service.name in REPLACEABLE.get(service.command, ()) and any(
            not _not_needed(name) for name, _ in _options(service)):
        _client_service(importer, service)  # (`relay … smtp -o …`: an [smtp.services.relay] of its own)
        return
    for name, value in _options(service):
        if not _not_needed(name):
            raise Refused(f"-o {name}={value}: mailflow's transports take their settings from the sections only")
        importer.out.notes.append(_not_needed_note(service, name, value))
    if service.name in TRANSPORTS:
        _concurrency_limit(importer, service)


def _relay_of_another_daemon(importer: ImportState, service: Service) -> None:
    """master.cf's `relay` run by lmtp, pipe, discard, error, local or virtual: Postfix hands relay_transport's mail
    (relay_domains') to it. The transport that does the same in mailflow becomes `importer.out.relay_service`
    (postfix_import points relay_transport at it): the built-in transport of that daemon when no -o matters (its
    main.cf settings are the section's), else a service of its own named `relay-DAEMON` ([lmtp.services.relay-lmtp],
    [pipe.relay-pipe]: `relay` is the built-in SMTP relay's name). Refused otherwise (postfix_import reports it)."""
    options = _options(service) if service.command != "pipe" else []
    needed = [(name, value) for name, value in options if not _not_needed(name)]
    if service.command in _RELAY_AS_BUILT_IN and not needed:
        for name, value in options:
            importer.out.notes.append(_not_needed_note(service, name, value))
        importer.out.relay_service = service.command
        return
    if service.command not in ("lmtp", "pipe"):
        raise Refused(f"a {service.command} relay with -o {needed[0][0]}: mailflow's {service.command} transport "
                      "takes its settings from its section only" if needed else
                      f"a {service.command} relay: mailflow has no {service.command} transport")
    renamed = dataclasses.replace(service, name=f"{RELAY}-{service.command}")
    (_client_service if service.command == "lmtp" else _pipe_service)(importer, renamed)
    importer.out.relay_service = renamed.name


def _not_needed(name: str) -> str:
    """Why an -o of a transport service is not needed in mailflow (syslog_name, max_use…), "" when it may be."""
    return _NOT_NEEDED_OVERRIDES.get(name) or names.NOT_NEEDED.get(name, "")


def _not_needed_note(service: Service, name: str, raw: str) -> str:
    """The note for an -o mailflow does not carry over (_not_needed says which): syslog_name's says how mailflow
    logs the service's lines and how Postfix's would (the same for relay's stock `postfix/$service_name`)."""
    where, what = service.line.where, f"{service.name} -o {name}={raw}"
    if name != "syslog_name":
        return f"{where}: {what} not needed: {_not_needed(name)}"
    if service.name == RELAY and service.command == "smtp":
        same = raw.endswith(("/$service_name", "/${service_name}", "/$(service_name)", f"/{RELAY}"))
        return (f"{where}: {what} not carried over: mailflow logs every line of relay's client as relay/smtp "
                f"(under log.syslog_name)" + (", as this makes Postfix's" if same else f"; Postfix's as {raw}/smtp"))
    return (f"{where}: {what} not carried over: mailflow logs this service's lines under log.syslog_name as "
            f"{service.command}'s; Postfix's as {raw}/{service.command}")


def _client_service(importer: ImportState, service: Service) -> None:
    """Another smtp or lmtp service (a content filter's `smtp-amavis`, a `slow` one): an `[smtp.services.NAME]`
    (or lmtp) of the same name, each -o that is one of that client's settings translated through the one table
    (the others left out or noted, as a listener's), its maxproc its queue.transport_concurrency_limit entry."""
    if not TRANSPORT_NAME.fullmatch(service.name):
        raise Refused(f"{service.name!r} is not a transport name mailflow takes (letters, digits, '_', '-'); a "
                      f"setting naming it is left out too")
    _refuse_a_built_in_name(service)
    settings: dict[str, object] = {}
    sources: dict[str, str] = {}
    options = _options(service)
    for name, raw in options:
        for key, value in _client_option(importer, service, name, raw, options).items():
            settings[key] = value
            sources[key] = f"-o {name}={raw}"
    if settings or service.name not in REPLACEABLE.get(service.command, ()):  # (a relay with none is [smtp])
        importer.out.clients[service.name] = {**settings, "client": service.command, "origin": service.line.where,
                                              "sources": sources}
    _concurrency_limit(importer, service)


def _client_option(importer: ImportState, service: Service, name: str, raw: str,
                   options: list[tuple[str, str]]) -> dict[str, object]:
    """One -o of a client service as its settings ({} when it is noted or left out, with the reason)."""
    where, client = service.line.where, service.command
    expander = _service_expander(importer, service, options)
    try:
        value = expander.expand(raw)
        if _noted_option(importer, service, expander, name, raw, value):
            return {}
        keys = names.SETTINGS.get(name, ())
        if not keys or not all(k.startswith(f"{client}.") for k in keys):
            raise Refused(names.why_not(name) if not keys else f"not a setting of mailflow's {client} services")
        merged_timeouts_agree(name, lambda n: _service_value(importer, expander, n, dict(options)))
        notes: list[str] = []
        converted = {key.removeprefix(f"{client}."): from_queue_directory(convert(name, key, value, notes),
                                                                           importer.queue_directory(), notes)
                     for key in keys}
        importer.out.notes.extend(f"{where}: {service.name} -o {note}" for note in notes)
        return converted
    except Refused as e:
        importer.out.leave_out(where, f"master.cf {service.name} -o {name}", raw, str(e))
    except Unexpanded as e:
        importer.out.leave_out(where, f"master.cf {service.name} -o {name}", raw, e.reason())
    return {}


def _service_value(importer: ImportState, expander: Expander, name: str, options: dict[str, str]) -> str | None:
    """A client service's value of a Postfix parameter, its -o over main.cf's, expanded as the service's daemon
    does (`expander`: `_service_expander`; None: neither sets it)."""
    raw = options[name] if name in options else importer.params[name][1] if name in importer.params else None
    return None if raw is None else expander.expand(raw)


def _service_expander(importer: ImportState, service: Service, options: list[tuple[str, str]]) -> Expander:
    """The $name expansion the service's daemon makes (as `postconf -P -x` shows it): main.cf's values under the
    service's -o values, with $service_name and $service_type the service's, main.cf's values included (master
    passes them to each daemon it runs)."""
    return importer.expander.with_names({**dict(options), "service_name": service.name, "service_type": service.kind})


def _noted_option(importer: ImportState, service: Service, expander: Expander, name: str, raw: str, value: str,
                  tls_required: bool = False, options: list[tuple[str, str]] | None = None) -> bool:
    """True, with a note, when a service's -o is one mailflow does not need (syslog_name, max_use…) or its
    built-in behaviour (disable_dns_lookups = no; smtpd_tls_auth_only = no where Postfix forces it: on a service
    that requires TLS, `tls_required`); Refused when it asks another behaviour than the built-in one. `expander`:
    the service's (`_service_expander`)."""
    where = service.line.where
    if name == "smtpd_tls_auth_only" and value.lower() == "no" and tls_required:
        importer.out.notes.append(f"{where}: {service.name} -o {name}={raw} applies to nothing: Postfix forces "
                                  "smtpd_tls_auth_only = yes where TLS is required (wrapper mode or encrypt), as "
                                  "mailflow offers AUTH only after TLS")
        return True
    if name in SASL_OPTIONS:
        tls_options = (dict(options or ()).get("smtpd_sasl_tls_security_options")
                       or importer.params.get("smtpd_sasl_tls_security_options", (None, None))[1])
        try:
            tls_options = None if tls_options is None else expander.expand(tls_options)
        except Unexpanded:
            tls_options = None  # (judged as the value it defaults to)
        why = sasl_security_options(name, value, tls_options)
        importer.out.notes.append(f"{where}: {service.name} -o {name}={raw} {why}")
        return True
    if _not_needed(name):
        importer.out.notes.append(_not_needed_note(service, name, raw))
        return True
    if name not in names.BUILT_IN:
        return False
    fixed, why = names.BUILT_IN[name]
    if value.lower() != fixed:
        raise Refused(f"only {name} = {fixed} is mailflow's behaviour: {why}")
    importer.out.notes.append(f"{where}: {service.name} -o {name}={raw} is built in: {why}")
    return True


def _smtpd_service(importer: ImportState, service: Service) -> None:
    host, _, port_text = service.name.rpartition(":")
    port = PORTS.get(port_text) or (int(port_text) if port_text.isdigit() else None)
    if port is None:
        raise Refused(f"service {service.name!r}: not a port mailflow knows")
    options = _options(service)
    if service.command == "postscreen":
        importer.out.settings["smtpd.postscreen.enable"] = True
        importer.out.origins["smtpd.postscreen.enable"] = f"{service.line.where}: {service.line.text}"
        options += _pass_options(importer)
    overrides = _overrides(importer, service, options)
    if service.command == "smtpd" and _screened_elsewhere(importer):
        overrides["postscreen"] = {"enable": False}  # [smtpd.postscreen] screens the postscreen service's port only
    _max_sessions(importer, service, overrides)
    if service.name == "smtp" and not overrides:
        return  # the listen addresses (postfix_import)
    role = _role(overrides)
    expander = _service_expander(importer, service, options)
    for preset, value in LISTENER_ROLES[role].items():
        if preset != "postscreen":  # (the role's own: Postfix runs smtpd, not postscreen, on such a port)
            overrides.setdefault(preset, _postfix_value(importer, expander, preset, overrides))
    for host_name in ([host] if host else importer.interfaces()):
        importer.out.listeners.append({"address": f"{host_name}:{port}", "role": role, "overrides": dict(overrides),
                                       "origin": service.line.where, "sources": _sources(options)})
    if service.name == "smtp":
        importer.out.settings.pop("smtpd.listen", None)
        importer.out.settings["smtpd.listen"] = []


def _max_sessions(importer: ImportState, service: Service, overrides: dict[str, object]) -> None:
    """maxproc (the `smtpd pass` service's behind postscreen; `-`: default_process_limit) as smtpd.max_sessions:
    the `smtp` service's in [smtpd], another service's as its listener's override where it differs."""
    limit = _session_limit(importer, service)
    if limit is None:
        return
    if service.name == "smtp" and service.maxproc != "-":  # else default_process_limit's, as main.cf says
        importer.out.settings["smtpd.max_sessions"] = limit
        importer.out.origins["smtpd.max_sessions"] = f"{service.line.where}: {service.line.text}"
    if limit != _section_session_limit(importer):
        overrides["max_sessions"] = limit


def _section_session_limit(importer: ImportState) -> int | None:
    smtp = [s for s in importer.services or () if s.kind == "inet" and s.name == "smtp"
            and s.command in ("smtpd", "postscreen")]
    return _session_limit(importer, smtp[0], quiet=True) if smtp else _default_process_limit(importer)


def _session_limit(importer: ImportState, service: Service, quiet: bool = False) -> int | None:
    """The service's smtpd processes at once; None (left out, with the reason unless `quiet`) when mailflow has no
    such limit (maxproc 0: none) or it is not a number."""
    holder = next((s for s in importer.services or () if s.kind == "pass" and s.command == "smtpd"), service) \
        if service.command == "postscreen" else service
    if holder.maxproc == "-":
        return _default_process_limit(importer)
    if holder.maxproc.isdigit() and int(holder.maxproc) > 0:
        return int(holder.maxproc)
    if not quiet:
        importer.out.leave_out(holder.line.where, f"master.cf {holder.name} maxproc", holder.maxproc,
                               "mailflow's max_sessions is a number of sessions, at least 1 (maxproc 0: no limit)"
                               if holder.maxproc == "0" else "not a number")
    return None


def _default_process_limit(importer: ImportState) -> int | None:
    if "default_process_limit" not in importer.params:
        return 100  # Postfix's default
    value = importer.expander.expand(importer.params["default_process_limit"][1])
    return int(value) if value.isdigit() and int(value) > 0 else None


def _sources(options: list[tuple[str, str]]) -> dict[str, str]:
    """Each override's Postfix line (`-o smtpd_sasl_path=private/auth`), to name it when it is left out."""
    return {key.removeprefix("smtpd."): f"-o {name}={raw}" for name, raw in options
            for key in names.SETTINGS.get(name, ())}


def _screened_elsewhere(importer: ImportState) -> bool:
    """Whether master.cf runs postscreen on some port: then an smtpd service's listener is not screened."""
    return any(s.kind == "inet" and s.command == "postscreen" for s in importer.services or ())


def _pass_options(importer: ImportState) -> list[tuple[str, str]]:
    for other in importer.services or ():
        if other.kind == "pass" and other.command == "smtpd":
            return _options(other)
    return []


def _tls_level(importer: ImportState, expander: Expander, options: list[tuple[str, str]]) -> str:
    """Postfix 3.7 smtpd's TLS level on this service: its smtpd_tls_security_level (an empty one is unset), else
    legacy_tls_level of its smtpd_enforce_tls and smtpd_use_tls (smtpd.c), each its -o over main.cf's."""
    level = _smtpd_value(importer, expander, options, "smtpd_tls_security_level")
    return level or legacy_tls_level(_smtpd_value(importer, expander, options, "smtpd_enforce_tls") == "yes",
                                     _smtpd_value(importer, expander, options, "smtpd_use_tls") == "yes")


def _smtpd_value(importer: ImportState, expander: Expander, options: list[tuple[str, str]], name: str) -> str:
    """A service's value of `name`, its -o over main.cf's, expanded, stripped and lower case ("": unset)."""
    raw = dict(options).get(name, importer.params[name][1] if name in importer.params else "")
    return expander.expand(raw).strip().lower()


def _tls_required(importer: ImportState, expander: Expander, options: list[tuple[str, str]]) -> bool:
    """Whether Postfix 3.7's smtpd requires TLS on this service (smtpd.c: wrapper mode, or a level other than none
    and may: `_tls_level`); False when a value cannot be expanded."""
    try:
        return (_smtpd_value(importer, expander, options, "smtpd_tls_wrappermode") == "yes"
                or _tls_level(importer, expander, options) not in ("none", "may"))
    except Unexpanded:
        return False


def _legacy_tls_option(importer: ImportState, service: Service, expander: Expander, options: list[tuple[str, str]],
                       name: str, raw: str, overrides: dict[str, object]) -> None:
    """An -o smtpd_use_tls / smtpd_enforce_tls: the listener's tls_security_level as Postfix 3.7 maps them
    (`_tls_level`), unless the service has a smtpd_tls_security_level (which Postfix takes instead: noted)."""
    where = f"{service.line.where}: {service.name} -o {name}={raw}"
    if _smtpd_value(importer, expander, options, "smtpd_tls_security_level"):
        importer.out.notes.append(f"{where} applies to nothing: smtpd_tls_security_level is set, Postfix takes it")
        return
    overrides["tls_security_level"] = level = _tls_level(importer, expander, options)
    importer.out.notes.append(f"{where} is tls_security_level = {level}, as Postfix 3.7 maps it")


def _overrides(importer: ImportState, service: Service, options: list[tuple[str, str]]) -> dict[str, object]:
    overrides: dict[str, object] = {}
    expander = _service_expander(importer, service, options)
    tls_required = _tls_required(importer, expander, options)
    for name, raw in options:
        if name in _NOT_NEEDED_OVERRIDES:  # whatever it refers to
            importer.out.notes.append(_not_needed_note(service, name, raw))
            continue
        try:
            value = expander.expand(raw)
        except Unexpanded as e:
            importer.out.leave_out(service.line.where, f"master.cf {service.name} -o {name}", raw,
                                   e.reason())
            continue
        if name == "smtpd_tls_wrappermode":
            overrides["_wrapper"] = value.lower() == "yes"
            continue
        if name in ("smtpd_use_tls", "smtpd_enforce_tls"):
            try:
                _legacy_tls_option(importer, service, expander, options, name, raw, overrides)
            except Unexpanded as e:
                importer.out.leave_out(service.line.where, f"master.cf {service.name} -o {name}", raw, e.reason())
            continue
        if name == "reject_tempfail_action":
            _reject_tempfail_overrides(importer, service, options, raw, value, overrides)
            continue
        if name == "smtpd_restriction_classes":  # (main.cf's: a list of the names whose values are the classes)
            if value.strip():
                importer.out.leave_out(service.line.where, f"master.cf {service.name} -o {name}", raw,
                                       "a listener's own restriction classes are not translated: write them in its "
                                       "overrides.restriction_classes")
            else:
                overrides["restriction_classes"] = {}  # none, as Postfix's smtpd then knows none
            continue
        if name in LEGACY_CERTIFICATES and _chain_files(importer, expander, options):
            importer.out.notes.append(f"{service.line.where}: {service.name} -o {name}={raw} applies to nothing: "
                                      "smtpd_tls_chain_files is set for the service, and Postfix then ignores the "
                                      "legacy certificate and key files")
            continue
        if name == "smtpd_tls_chain_files":
            _chain_files_override(importer, service, expander, options, raw, value, overrides)
            continue
        if name in _NOT_SMTPD_S or name.startswith(("smtp_", "lmtp_")):  # (by its prefix, whether mailflow has it)
            importer.out.notes.append(f"{service.line.where}: {service.name} -o {name}={raw} applies to nothing: "
                                      + _NOT_SMTPD_S.get(name, "Postfix's smtpd does not read its delivery clients' "
                                                               "parameters"))
            continue
        keys = names.SETTINGS.get(name, ())
        try:
            if not keys and _noted_option(importer, service, expander, name, raw, value, tls_required,
                                          options):  # (built in…)
                continue
        except Refused as e:
            importer.out.leave_out(service.line.where, f"master.cf {service.name} -o {name}", raw, str(e))
            continue
        if not keys or not all(k.startswith("smtpd.") and k.removeprefix("smtpd.") not in SECTION_ONLY
                               for k in keys):
            importer.out.leave_out(service.line.where, f"master.cf {service.name} -o {name}", raw,
                                   _not_per_listener(name, keys))
            continue
        try:
            if name == "smtpd_sasl_path":
                value = dovecot_sasl_path(value, _sasl_type(importer, expander, options), importer.queue_directory(),
                                          importer.out.notes, service.line.where)
            notes: list[str] = []
            converted = {key: convert(name, key, value, notes) for key in keys}
        except Refused as e:  # this -o only, not the service
            importer.out.leave_out(service.line.where, f"master.cf {service.name} -o {name}", raw, str(e))
            continue
        importer.out.notes.extend(f"{service.line.where}: {service.name} -o {note}" for note in notes)
        for key, setting in converted.items():
            overrides[key.removeprefix("smtpd.")] = from_queue_directory(setting, importer.queue_directory(),
                                                                         importer.out.notes)
    inherited = _inherited_sasl_path(importer, expander, service, options)
    if inherited:
        overrides["sasl_path"] = inherited
    return overrides


def _chain_files(importer: ImportState, expander: Expander, options: list[tuple[str, str]]) -> bool:
    """Whether the service's smtpd_tls_chain_files (its -o, else main.cf's) is set: Postfix's smtpd then takes it and
    ignores the legacy certificate and key files (tls_certkey.c); one that cannot be expanded counts as set."""
    raw = dict(options).get("smtpd_tls_chain_files",
                            importer.params["smtpd_tls_chain_files"][1] if "smtpd_tls_chain_files" in importer.params
                            else "")
    try:
        return bool(expander.expand(raw).strip())
    except Unexpanded:
        return True


def _chain_files_override(importer: ImportState, service: Service, expander: Expander,
                          options: list[tuple[str, str]], raw: str, value: str, overrides: dict[str, object]) -> None:
    """-o smtpd_tls_chain_files: the listener's certificate pair (chain_files_pair), left out when mailflow cannot
    take it; empty, the legacy files apply: the service's own -o (translated with the others), else main.cf's."""
    where = f"{service.line.where}: {service.name} -o smtpd_tls_chain_files={raw}"
    files = value.replace(",", " ").split()
    if files:
        try:
            overrides["tls_cert_file"], overrides["tls_key_file"] = chain_files_pair(
                files, importer.queue_directory(), importer.out.notes)
        except Refused as e:
            importer.out.leave_out(service.line.where, f"master.cf {service.name} -o smtpd_tls_chain_files", raw,
                                   str(e))
        return
    importer.out.notes.append(f"{where} is empty: the legacy certificate and key files apply, as Postfix takes it")
    if any(name in ("smtpd_tls_cert_file", "smtpd_tls_key_file") for name, _ in options) or \
            not _chain_files(importer, expander, []):
        return  # (its own legacy -o are translated; without main.cf's chain files [smtpd]'s pair is the legacy one)
    try:
        cert = _main_cf_path(importer, expander, "smtpd_tls_cert_file")
        key = _main_cf_path(importer, expander, "smtpd_tls_key_file") or cert  # (Postfix's default: the cert's)
    except Unexpanded as e:
        importer.out.leave_out(service.line.where, f"master.cf {service.name} -o smtpd_tls_chain_files", raw,
                               e.reason())
        return
    overrides["tls_cert_file"], overrides["tls_key_file"] = cert, key


def _main_cf_path(importer: ImportState, expander: Expander, name: str) -> str:
    return expander.expand(importer.params[name][1]).strip() if name in importer.params else ""


def _reject_tempfail_overrides(importer: ImportState, service: Service, options: list[tuple[str, str]], raw: str,
                               value: str, overrides: dict[str, object]) -> None:
    """-o reject_tempfail_action: the service's default of the tempfail actions neither main.cf nor its own -o set
    (Postfix's defaults are $reject_tempfail_action, read in the service), each an override; left out when bad."""
    try:
        action = reject_tempfail_action(value)
    except Refused as e:
        importer.out.leave_out(service.line.where, f"master.cf {service.name} -o reject_tempfail_action", raw, str(e))
        return
    given = set(importer.params) | {name for name, _ in options}
    for setting in names.REJECT_TEMPFAIL_ACTIONS:
        if setting not in given:
            overrides[setting] = action


def _not_per_listener(name: str, keys: tuple[str, ...]) -> str:
    """Why an smtpd service's -o of `name` (mailflow settings `keys`) is not a listener override."""
    if keys:
        return "not a per-listener setting in mailflow"
    return "translated from main.cf only, not as a listener's -o" if name in names.CONVERTED else names.why_not(name)


def _inherited_sasl_path(importer: ImportState, expander, service: Service, options: list[tuple[str, str]]) -> str:
    """main.cf's smtpd_sasl_path for a service whose own `-o smtpd_sasl_type=dovecot` reads it as Dovecot's socket
    (Postfix's smtpd takes the path it inherits under the type it has) while main.cf's type does not ([smtpd] leaves
    it out as a Cyrus name): the path, made absolute from queue_directory, and main.cf's line a note, not left out;
    "" otherwise."""
    if "smtpd_sasl_path" not in importer.params or any(name == "smtpd_sasl_path" for name, _ in options) or \
            not any(name == "smtpd_sasl_type" for name, _ in options) or \
            (_sasl_type(importer, expander, options) or "").strip().lower() != "dovecot" or \
            (_sasl_type(importer, importer.expander, []) or "").strip().lower() == "dovecot":
        return ""
    line, raw = importer.params["smtpd_sasl_path"]
    try:
        path = dovecot_sasl_path(expander.expand(raw), "dovecot", importer.queue_directory(),
                                 importer.out.notes, line.where)
    except Unexpanded:
        return ""
    for item in [i for i in importer.out.left_out if i.where == line.where and i.name == "smtpd_sasl_path"]:
        importer.out.left_out.remove(item)
    importer.out.notes.append(f"{line.where}: smtpd_sasl_path = {raw}: {service.name}'s listener takes it as "
                              f"{path} (its -o smtpd_sasl_type=dovecot); [smtpd] leaves it out (not dovecot there)")
    return path


def _sasl_type(importer: ImportState, expander, options: list[tuple[str, str]]) -> str | None:
    """The smtpd_sasl_type a service's smtpd_sasl_path is read under: its own -o, else main.cf's (expanded; None:
    neither sets it, Postfix's default applies)."""
    given = [(expander, raw) for name, raw in options if name == "smtpd_sasl_type"]
    if not given and "smtpd_sasl_type" in importer.params:
        given = [(expander, importer.params["smtpd_sasl_type"][1])]
    if not given:
        return None
    with_names, raw = given[-1]
    try:
        return with_names.expand(raw)
    except Unexpanded:  # (refused as it is written: no type mailflow speaks)
        return raw


def _role(overrides: dict[str, object]) -> str:
    if overrides.pop("_wrapper", False):
        return "submissions"
    if overrides.get("tls_security_level") == "encrypt" and overrides.get("sasl_auth_enable") is True:
        return "submission"
    return "mta"


def _postfix_value(importer: ImportState, expander: Expander, preset: str, overrides: dict[str, object]) -> object:
    """What Postfix's line gives the setting a role presets: its main.cf value as the service expands it
    (`_service_expander`), or Postfix's default, and for sasl_auth_required whether the line's client restrictions
    are permit_sasl_authenticated then reject."""
    if preset == "sasl_auth_required":
        items = overrides.get("client_restrictions", [])
        return isinstance(items, list) and [i.lower() for i in items] == ["permit_sasl_authenticated", "reject"]
    postfix = {"tls_security_level": "smtpd_tls_security_level", "sasl_auth_enable": "smtpd_sasl_auth_enable"}[preset]
    if postfix in importer.params:
        return convert(postfix, f"smtpd.{preset}", expander.expand(importer.params[postfix][1]), [])
    return {"tls_security_level": "none", "sasl_auth_enable": False}[preset]


def _refuse_a_built_in_name(service: Service) -> None:
    """Refused when the service takes the name of one of mailflow's built-in transports it cannot replace
    (`virtual … smtp`, `relay … lmtp`, `relay … pipe`): only `relay … smtp` replaces one (REPLACEABLE)."""
    if service.name in BUILTIN_TRANSPORTS and service.name not in REPLACEABLE.get(service.command, ()):
        raise Refused(f"a {service.command} service named {service.name}: {service.name} is one of mailflow's "
                      f"built-in transports, which a {service.command} service cannot replace (a setting naming "
                      f"{service.name} reaches the built-in one)")


def _pipe_service(importer: ImportState, service: Service) -> None:
    _refuse_a_built_in_name(service)
    args = list(service.args)
    pipe: dict[str, object] = {}
    argv: list[str] = []
    while args:
        word = args.pop(0)
        key, eq, value = word.partition("=")
        if key == "argv" and eq:
            argv = [value] + args
            break
        if key in ("flags", "user", "null_sender", "directory") and eq:
            pipe[key] = value
        elif key == "size" and eq and value.isdigit():
            pipe["size_limit"] = int(value)
        else:
            raise Refused(f"pipe argument {word!r}: not translated")
    if not argv:
        raise Refused("a pipe service without argv=")
    user = str(pipe.get("user", ""))
    if ":" in user:
        pipe["user"] = user.split(":")[0]
        importer.out.notes.append(f"{service.line.where}: pipe {service.name} runs as {pipe['user']} with that "
                                  f"user's group (Postfix's user={user} names the group)")
    if "/" not in argv[0] and "$" not in argv[0]:
        command = _on_default_path(argv[0])
        importer.out.notes.append(f"{service.line.where}: pipe {service.name}: argv={argv[0]} is {command} (Postfix's "
                                  f"pipe runs a command through execvp with PATH={PIPE_PATH}, _PATH_DEFPATH: the first "
                                  f"of those that holds {argv[0]}" + ("" if os.path.exists(command) else
                                                                      ", none here") + ")")
        argv[0] = command
    pipe["argv"] = [re.sub(r"\$(?!\{)([a-z_]+)", r"${\1}", a) for a in argv]  # pipe(8) takes $name too
    pipe["origin"] = service.line.where
    importer.out.pipes[service.name] = pipe
    _concurrency_limit(importer, service)


PIPE_PATH = "/usr/bin:/bin"  # Postfix's _PATH_DEFPATH on Linux (paths.h), the PATH pipe_command sets


def _on_default_path(name: str) -> str:
    """A bare command name as execvp finds it on PIPE_PATH: the first directory holding an executable `name`, else
    the first directory's (mailflow's pipe needs an absolute path)."""
    directories = PIPE_PATH.split(":")
    return next((f"{d}/{name}" for d in directories if os.access(f"{d}/{name}", os.X_OK)),
                f"{directories[0]}/{name}")


def _concurrency_limit(importer: ImportState, service: Service) -> None:
    """A transport's maxproc as its queue.transport_concurrency_limit entry (`-`, 0: none); not a number: left out."""
    if service.maxproc in ("-", "0"):
        return
    if not service.maxproc.isdigit():
        importer.out.leave_out(service.line.where, f"master.cf {service.name} maxproc", service.maxproc,
                               "not a number")
        return
    importer.out.set_entry("queue.transport_concurrency_limit", service.name, int(service.maxproc),
                           f"{service.line.where}: master.cf {service.name} maxproc = {service.maxproc}")


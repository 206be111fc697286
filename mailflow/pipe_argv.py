"""The grammar of a `[pipe.NAME]` service's `argv` and `flags` (Postfix pipe(8)), shared by config and pipe.

A leaf (standard library only): `mailflow.config` checks a service's argv and flags with it when it loads, and
`mailflow.transports.pipe` parses the argv once and fills it in per delivery.

argv macros: `${name}`, `$name` or `$(name)`; `$$` is a literal `$`. Each value becomes part of one argv
element, never a shell word. Per recipient: ${recipient}, ${original_recipient}, ${user}, ${extension},
${mailbox}, ${domain} (an element holding one of them is repeated once per recipient); per request:
${sender}, ${nexthop}, ${queue_id}, ${size}, and the client who submitted the message (`CLIENT_MACROS`:
${client_address}, ${client_helo}, ${client_hostname}, ${client_port}, ${client_protocol}, ${sasl_method},
${sasl_sender}, ${sasl_username}; empty when not known, as for mail submitted with sendmail).
Flags: pipe(8)'s, `PIPE_FLAGS` (their meaning is in mailflow.transports.pipe).

    parse_argv_element(element) -> ArgTemplate   ('--to=', Macro('recipient')) for '--to=${recipient}'
    parse_argv(argv) -> tuple[ArgTemplate, ...]
    expand_argv(templates, request_values, rcpt_values) -> list[str]
    check_flags(flags) -> flags

Failure behaviour: `parse_argv*` and `check_flags` raise ValueError naming the unknown macro, the stray `$` or
the unknown flags (config reports it as `FILE: pipe.NAME.argv: REASON`); `expand_argv` does not raise for
templates `parse_argv` made and values for every macro.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

PER_RECIPIENT_MACROS = ("recipient", "original_recipient", "user", "extension", "mailbox", "domain")
CLIENT_MACROS = ("client_address", "client_helo", "client_hostname", "client_port", "client_protocol",
                 "sasl_method", "sasl_sender", "sasl_username")
PER_REQUEST_MACROS = ("sender", "nexthop", "queue_id", "size", *CLIENT_MACROS)
PIPE_FLAGS = "BDFORXhqu.>"
_MACRO = re.compile(r"\$(?:\{([^}]*)\}|\(([^)]*)\)|([A-Za-z0-9_]+)|(\$))")


@dataclass(frozen=True)
class Macro:
    name: str


ArgTemplate = tuple  # of str (literal text) and Macro


def parse_argv_element(element: str) -> ArgTemplate:
    """'--to=${recipient}' -> ('--to=', Macro('recipient')). Raises ValueError for an unknown macro or a
    '$' that starts none (write '$$' for a literal '$')."""
    parts: list = []
    pos = 0
    for m in _MACRO.finditer(element):
        if m.start() > pos:
            parts.append(element[pos:m.start()])
        pos = m.end()
        if m.group(4):
            parts.append("$")
            continue
        name = next(g for g in m.groups()[:3] if g is not None)
        if name not in PER_RECIPIENT_MACROS + PER_REQUEST_MACROS:
            raise ValueError(f"unknown macro ${{{name}}} in {element!r} (known: "
                             f"{', '.join(PER_RECIPIENT_MACROS + PER_REQUEST_MACROS)})")
        parts.append(Macro(name))
    rest = element[pos:]
    if "$" in rest:
        raise ValueError(f"a '$' in {element!r} starts no macro (write $$ for a literal $)")
    if rest:
        parts.append(rest)
    return tuple(parts)


def parse_argv(argv: Iterable[str]) -> tuple[ArgTemplate, ...]:
    return tuple(parse_argv_element(a) for a in argv)


def expand_argv(templates: tuple[ArgTemplate, ...], request_values: dict[str, str],
                rcpt_values: list[dict[str, str]]) -> list[str]:
    """Fill in the macros: an element with a per-recipient macro becomes one element per recipient."""
    out: list[str] = []
    for template in templates:
        per_rcpt = any(isinstance(p, Macro) and p.name in PER_RECIPIENT_MACROS for p in template)
        for values in (rcpt_values if per_rcpt else [{}]):
            both = {**request_values, **values}
            out.append("".join(both[p.name] if isinstance(p, Macro) else p for p in template))
    return out


def check_flags(flags: str) -> str:
    unknown = sorted(set(flags) - set(PIPE_FLAGS))
    if unknown:
        raise ValueError(f"unknown flag{'s' if len(unknown) > 1 else ''} {''.join(unknown)!r} "
                         f"(supported: {PIPE_FLAGS})")
    return flags

"""local(8)'s `$name` expansion of luser_relay (Postfix local_expand with mac_expand), standard library only.

    check_local_macros(template)            raises ValueError naming an unknown macro or a stray '$'
    expand_local_macros(template, values)   the template with its macros replaced
    check_macros(template, known), expand_macros(template, values)   the same for another set of names (smtpd's
                                            reject footer, mailflow.reply_footer)
    macro_names(template)                   the names its macros use (postscreen's footer: those it does not know)

Macros (LOCAL_MACROS): $user (the local part without its extension), $local and $mailbox (the local part),
$extension (without the delimiter), $recipient_delimiter, $domain, $recipient (the whole address), $home and
$shell (always "" for luser_relay: its recipient has no account). Forms: `$name`, `${name}`, `$(name)`; `${name?text}`
is `text` when the value is not empty, `${name:text}` when it is, the text itself expanded (and checked) as a
template, as mac_expand does; a bracket pair inside it nests. `$$` is a literal `$`. Postfix 3.x's
`${name?{text}:{text}}` and relational forms are not supported (their braces would be taken as text).
"""
from __future__ import annotations

import re
from typing import Callable

LOCAL_MACROS = ("user", "local", "mailbox", "extension", "recipient_delimiter", "domain", "recipient", "home", "shell")
_NAME = re.compile(r"[A-Za-z0-9_]+")
_BODY = re.compile(r"([A-Za-z0-9_]+)(?:([?:])(.*))?", re.DOTALL)
_CLOSE = {"{": "}", "(": ")"}

# on_macro(name, mark, text) -> what the macro stands for; mark "?" or ":" with its text, else None and None
OnMacro = Callable[[str, "str | None", "str | None"], str]


def check_local_macros(template: str) -> str:
    """`template` when every macro in it, conditional texts included, is one of LOCAL_MACROS; ValueError
    otherwise."""
    return check_macros(template, LOCAL_MACROS)


def expand_local_macros(template: str, values: dict[str, str]) -> str:
    """`template` with each macro replaced by its value in `values` (a missing one is ""); a conditional text
    chosen is expanded in turn. An unknown name expands to "" (the configuration checks the template first, with
    `check_local_macros`); a malformed macro raises ValueError."""
    return expand_macros(template, values)


def check_macros(template: str, known: tuple[str, ...]) -> str:
    """`template` when every macro in it, conditional texts included, is one of `known` (the same syntax serves
    smtpd's reject footer: mailflow.reply_footer); ValueError otherwise."""
    def check(name: str, mark: str | None, text: str | None) -> str:
        if name not in known:
            raise ValueError(f"unknown macro ${name} (known: {', '.join(known)})")
        if text is not None:
            check_macros(text, known)
        return ""
    _walk(template, check)
    return template


def macro_names(template: str) -> list[str]:
    """The names of the macros in `template`, conditional texts included, in order (a malformed macro raises
    ValueError)."""
    names: list[str] = []

    def collect(name: str, mark: str | None, text: str | None) -> str:
        names.append(name)
        if text is not None:
            names.extend(macro_names(text))
        return ""
    _walk(template, collect)
    return names


def expand_macros(template: str, values: dict[str, str]) -> str:
    """`expand_local_macros` for any set of names."""
    def expand(name: str, mark: str | None, text: str | None) -> str:
        value = values.get(name, "")
        if mark is None or text is None:
            return value
        chosen = bool(value) if mark == "?" else not value
        return expand_macros(text, values) if chosen else ""
    return _walk(template, expand)


def _walk(template: str, on_macro: OnMacro) -> str:
    """`template` with each macro replaced by what `on_macro` makes of it, `$$` by `$`."""
    out: list[str] = []
    i = 0
    while i < len(template):
        start = template.find("$", i)
        if start < 0:
            out.append(template[i:])
            break
        out.append(template[i:start])
        i = _macro(template, start, on_macro, out)
    return "".join(out)


def _macro(template: str, start: int, on_macro: OnMacro, out: list[str]) -> int:
    """The macro at `template[start]` (a '$') appended to `out`; the index after it."""
    after = template[start + 1:start + 2]
    if after == "$":
        out.append("$")
        return start + 2
    if after in _CLOSE:
        end = _matching(template, start + 1)
        body = _BODY.fullmatch(template, start + 2, end)
        if body is None:
            raise ValueError(f"{template!r}: bad macro {template[start:end + 1]!r}")
        out.append(on_macro(body[1], body[2], body[3]))
        return end + 1
    name = _NAME.match(template, start + 1)
    if name is None:
        raise ValueError(f"{template!r}: a '$' that starts no macro (write $$ for a '$')")
    out.append(on_macro(name[0], None, None))
    return name.end()


def _matching(template: str, opening: int) -> int:
    """The index of the bracket closing the one at `opening`, brackets of that kind nesting (mac_parse)."""
    open_, close = template[opening], _CLOSE[template[opening]]
    depth = 0
    for i in range(opening, len(template)):
        depth += {open_: 1, close: -1}.get(template[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"{template!r}: a '$' that starts no macro (write $$ for a '$'): {open_!r} not closed")

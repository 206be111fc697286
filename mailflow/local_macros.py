"""local(8)'s `$name` expansion of luser_relay (Postfix local_expand with mac_expand), standard library only.

    check_local_macros(template)            raises ValueError naming an unknown macro or a stray '$'
    expand_local_macros(template, values)   the template with its macros replaced

Macros (LOCAL_MACROS): $user (the local part without its extension), $local and $mailbox (the local part),
$extension (without the delimiter), $recipient_delimiter, $domain, $recipient (the whole address), $home and
$shell ("" for a user without a system account). Forms: `$name`, `${name}`, `$(name)`; `${name?text}` is
`text` when the value is not empty, `${name:text}` when it is; `$$` is a literal `$`.
"""
from __future__ import annotations

import re

LOCAL_MACROS = ("user", "local", "mailbox", "extension", "recipient_delimiter", "domain", "recipient", "home", "shell")
_MACRO = re.compile(r"\$(?:\{([A-Za-z0-9_]+)(?:([?:])([^}]*))?\}|\(([A-Za-z0-9_]+)(?:([?:])([^)]*))?\)"
                    r"|([A-Za-z0-9_]+)|(\$))")


def check_local_macros(template: str) -> str:
    """`template` when every macro in it is one of LOCAL_MACROS; ValueError otherwise."""
    for m in _MACRO.finditer(template):
        name = m.group(1) or m.group(4) or m.group(7)
        if name and name not in LOCAL_MACROS:
            raise ValueError(f"unknown macro ${name} (known: {', '.join(LOCAL_MACROS)})")
    rest = _MACRO.sub("", template)
    if "$" in rest:
        raise ValueError(f"{template!r}: a '$' that starts no macro (write $$ for a '$')")
    return template


def expand_local_macros(template: str, values: dict[str, str]) -> str:
    """`template` with each macro replaced by its value in `values` (a missing one is "")."""
    def replace(m: re.Match) -> str:
        if m.group(8):
            return "$"
        name = m.group(1) or m.group(4) or m.group(7)
        mark = m.group(2) or m.group(5)
        text = m.group(3) if m.group(1) else m.group(6)
        value = values.get(name, "")
        if mark == "?":
            return text if value else ""
        if mark == ":":
            return "" if value else text
        return value
    return _MACRO.sub(replace, template)

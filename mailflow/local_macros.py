"""The one `$name` expander (Postfix's mac_expand): local(8)'s luser_relay (local_expand), and through
check_macros/expand_macros smtpd's and postscreen's reject footers and the DNS lists' replies; standard library only.

    check_local_macros(template)            raises ValueError naming an unknown macro or a stray '$'
    expand_local_macros(template, values)   the template with its macros replaced
    check_macros(template, known), expand_macros(template, values, missing=None)   the same for another set of
                                            names (smtpd's reject footer, mailflow.reply_footer; the DNS lists'
                                            replies, mailflow.rbl_reply); `missing(name)` told of each name without
                                            a value as it is looked up

Macros (LOCAL_MACROS): $user (the local part without its extension), $local and $mailbox (the local part),
$extension (without the delimiter), $recipient_delimiter, $domain, $recipient (the whole address), $home and
$shell (always "" for luser_relay: its recipient has no account). Forms, as Postfix 3.7's mac_expand takes them
(util/mac_expand.c, the same in each of these places): `$name`, `${name}`, `$(name)`; `${name?text}` is `text`
when the value is not empty, `${name:text}` when it is; Postfix 3's `{text}` operands, whitespace around them
ignored: `${name?{text}}`, `${name:{text}}`, `${name?{text1}:{text2}}` (and `${name?{text1}:text2}`); relational
`${{text1} == {text2}}` ("true" or ""), `${{text1} == {text2}?{text3}:{text4}}` (or `?`/`:` alone), with `==`,
`!=`, `<`, `<=`, `>=`, `>` (numbers when both sides are all digits, else text). A text chosen (and each side
compared) is expanded and checked as a template in turn; a bracket pair inside it nests. A text after `?` that
does not start with `{` runs to the end, `:` included (Postfix 2.x's form). `$$` is a literal `$`. Whitespace
around a name is ignored, as mac_expand ignores it. Texts nest at most MAX_NESTING deep (100, as mac_expand's):
deeper is a ValueError, never a RecursionError.
"""
from __future__ import annotations

import re
from typing import Callable, NamedTuple

from mailflow.syntax import ascii_digits
LOCAL_MACROS = ("user", "local", "mailbox", "extension", "recipient_delimiter", "domain", "recipient", "home", "shell")
_NAME = re.compile(r"[A-Za-z0-9_]+")
_CLOSE = {"{": "}", "(": ")"}
_SPACE = " \t\r\n"  # Postfix's CHARS_SPACE
_OPERATOR_CHARS = "<>!=?+-*/~&|%"  # what mac_exp_parse_relational takes as an operator, for its diagnostics
_COMPARE: dict[str, Callable[[int], bool]] = {
    "==": lambda d: d == 0, "!=": lambda d: d != 0, "<": lambda d: d < 0, "<=": lambda d: d <= 0,
    ">=": lambda d: d >= 0, ">": lambda d: d > 0}
TRUE = "true"  # a relational expression's value when it holds ("" when not), as mac_expand's
MAX_NESTING = 100  # texts in texts (mac_expand's limit: deeper is "unreasonable macro call nesting")


class Macro(NamedTuple):
    """One `$name` or `${...}`: a name, or a relation (left text, operator, right text); the texts after `?`
    (if_true) and `:` (if_false), None when it has none."""

    name: str | None
    relation: tuple[str, str, str] | None = None
    if_true: str | None = None
    if_false: str | None = None

    def templates(self) -> list[str]:
        """Its texts that are templates in turn: the relation's sides, then the conditional texts."""
        sides = [self.relation[0], self.relation[2]] if self.relation else []
        return [text for text in (*sides, self.if_true, self.if_false) if text is not None]


# on_macro(macro) -> what the macro stands for
OnMacro = Callable[[Macro], str]


def check_local_macros(template: str) -> str:
    """`template` when every macro in it, conditional texts included, is one of LOCAL_MACROS; ValueError
    otherwise."""
    return check_macros(template, LOCAL_MACROS)


def expand_local_macros(template: str, values: dict[str, str]) -> str:
    """`template` with each macro replaced by its value in `values` (a missing one is ""); a conditional text
    chosen is expanded in turn. An unknown name expands to "" (the configuration checks the template first, with
    `check_local_macros`); a malformed macro raises ValueError."""
    return expand_macros(template, values)


def check_macros(template: str, known: tuple[str, ...], _level: int = 0) -> str:
    """`template` when every macro in it, conditional texts and compared sides included, is one of `known` (the
    same syntax serves the reject footers, mailflow.reply_footer, and the DNS lists' replies, mailflow.rbl_reply);
    ValueError otherwise (also for texts nested more than MAX_NESTING deep)."""
    _nesting(template, _level)

    def check(macro: Macro) -> str:
        if macro.name is not None and macro.name not in known:
            raise ValueError(f"unknown macro ${macro.name} (known: {', '.join(known)})")
        for text in macro.templates():
            check_macros(text, known, _level + 1)
        return ""
    _walk(template, check)
    return template


def expand_macros(template: str, values: dict[str, str], missing: Callable[[str], None] | None = None,
                  _level: int = 0) -> str:
    """`expand_local_macros` for any set of names; `missing(name)` told of each name not in `values` as it is
    looked up (a conditional text only when it is chosen, as mac_expand's lookups)."""
    _nesting(template, _level)

    def expand(macro: Macro) -> str:
        if macro.name is not None and missing is not None and macro.name not in values:
            missing(macro.name)
        value = (values.get(macro.name, "") if macro.name is not None
                 else _related(macro.relation, values, missing, _level + 1))
        if macro.if_true is None and macro.if_false is None:
            return value
        chosen = macro.if_true if value else macro.if_false
        return "" if chosen is None else expand_macros(chosen, values, missing, _level + 1)
    return _walk(template, expand)


def _nesting(template: str, level: int) -> None:
    """ValueError past MAX_NESTING levels of texts in texts (mac_expand's "unreasonable macro call nesting")."""
    if level > MAX_NESTING:
        raise ValueError(f'unreasonable macro call nesting: "{template[:100]}"')


def _related(relation: tuple[str, str, str] | None, values: dict[str, str],
             missing: Callable[[str], None] | None = None, level: int = 0) -> str:
    """TRUE when the relation holds between its two sides expanded, else "" (mac_exp_eval)."""
    assert relation is not None
    left, operator, right = (expand_macros(relation[0], values, missing, level), relation[1],
                             expand_macros(relation[2], values, missing, level))
    if ascii_digits(left) and ascii_digits(right):
        delta = int(left) - int(right)
    else:
        delta = (left > right) - (left < right)
    return TRUE if _COMPARE[operator](delta) else ""


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
        try:
            macro = _parsed(template[start + 2:end])
        except ValueError as e:
            raise ValueError(f"{template!r}: bad macro {template[start:end + 1]!r}: {e}") from None
        out.append(on_macro(macro))
        return end + 1
    name = _NAME.match(template, start + 1)
    if name is None:
        raise ValueError(f"{template!r}: a '$' that starts no macro (write $$ for a '$')")
    out.append(on_macro(Macro(name[0])))
    return name.end()


def _parsed(body: str) -> Macro:
    """The inside of `${...}` as mac_expand_callback reads it: a relation (it starts with `{`) or a name, then
    nothing, `?` or `:` with their texts; ValueError naming what is wrong."""
    text = body.lstrip(_SPACE)
    if text.startswith("{"):
        relation, rest = _relation(text)
        if rest and rest[0] not in "?:":
            raise ValueError(f"'?' or ':' expected at {rest[:20]!r}")
        return Macro(None, relation, *_conditional(rest))
    name = _NAME.match(text)
    rest = text[name.end():].lstrip(_SPACE) if name else text
    if name is None or (rest and rest[0] not in "?:"):
        raise ValueError(f"attribute name syntax error at {rest[:20]!r}" if name else "no name")
    return Macro(name[0], None, *_conditional(rest))


def _relation(text: str) -> tuple[tuple[str, str, str], str]:
    """`{left} op {right} rest` -> ((left, op, right), rest with leading whitespace skipped)."""
    left, rest = _curly(text)
    operator = rest[:len(rest) - len(rest.lstrip(_OPERATOR_CHARS))]
    if operator not in _COMPARE:
        raise ValueError(f"one of {', '.join(_COMPARE)} expected at {rest[:20]!r}")
    rest = rest[len(operator):].lstrip(_SPACE)
    if not rest.startswith("{"):
        raise ValueError(f"'{{text}}' expected after {operator!r}")
    right, rest = _curly(rest)
    return (left, operator, right), rest


def _conditional(rest: str) -> tuple[str | None, str | None]:
    """(if_true, if_false) of what follows a name or a relation: "", `?text`, `:text`, `?{text}:{text}` (or
    `?{text}:text`); a text not in braces runs to the end."""
    if not rest:
        return None, None
    mark, rest = rest[0], rest[1:]
    first, rest = _operand(rest)
    if mark == ":":
        if rest:
            raise ValueError(f"unexpected text after '}}': {rest[:20]!r}")
        return None, first
    if not rest:
        return first, None
    if rest[0] != ":":
        raise ValueError(f"':' expected after '}}' at {rest[:20]!r}")
    second, rest = _operand(rest[1:])
    if rest:
        raise ValueError(f"unexpected text after '}}': {rest[:20]!r}")
    return first, second


def _operand(text: str) -> tuple[str, str]:
    """(the operand, what follows): `{text}` (whitespace around it skipped), or all of `text` as it is."""
    stripped = text.lstrip(_SPACE)
    return _curly(stripped) if stripped.startswith("{") else (text, "")


def _curly(text: str) -> tuple[str, str]:
    """`{payload} rest` -> (payload, rest with leading whitespace skipped), braces balanced
    (mac_exp_extract_curly_payload)."""
    depth = 0
    for i, char in enumerate(text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return text[1:i], text[i + 1:].lstrip(_SPACE)
    raise ValueError(f"unbalanced {{}} in {text!r}")


def _matching(template: str, opening: int) -> int:
    """The index of the bracket closing the one at `opening`, brackets of that kind nesting (mac_parse)."""
    open_, close = template[opening], _CLOSE[template[opening]]
    depth = 0
    for i in range(opening, len(template)):
        depth += {open_: 1, close: -1}.get(template[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"{template!r}: a '$' that starts no macro (write $$ for a '$'): {open_!r} not closed")

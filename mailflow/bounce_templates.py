"""bounce_template_file: the notices' own texts (Postfix's bounce(5)), parsed and expanded; a leaf.

    parse_templates(text, origin) -> Templates     the file's templates; ValueError naming the line and the reason
    load_templates(path) -> Templates              the file read (bounded, regular) and parsed; "" -> no template
    Template                                      one kind's: `from_`, `subject`, `postmaster_subject`, `charset`,
                                                  `text` (its lines, unexpanded); `expand(values)` -> its lines
    template_values(myhostname, mydomain, delay_warning_time, maximal_queue_lifetime) -> the $names a text may use

The file is Postfix's: `failure_template = <<EOF`, the template's lines, a line `EOF` (any end marker of letters
and digits); `#` comments and blank lines between templates; names failure_template, delay_template,
success_template, verify_template (mailflow sends no address verification report: a verify_template is checked
and not used). A template is header lines (`From:`, `Subject:`, `Postmaster-Subject:` for failure and delay only,
`Charset:`), ASCII without control characters but a tab and not empty (Charset an RFC 2045 token), a blank line,
then the text (lines of at most 998 octets, no bare CR or NUL), in which `$name` is expanded as Postfix's
mac_expand: $myhostname, $mydomain, $mail_name ("mailflow"), and $delay_warning_time_UNIT,
$maximal_queue_lifetime_UNIT with UNIT seconds, minutes, hours, days or weeks (the value divided, as an integer).

Unlike Postfix, which warns and keeps its built-in template for a template it cannot use (and stops for an
undefined $name), every problem is the configuration's error (`config check` names it): a notice never goes out
with a text its author did not mean. Non-ASCII text needs a Charset other than us-ascii, as Postfix's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mailflow.config_source import CONTROL
from mailflow.files import read_regular_file
from mailflow.local_macros import check_macros, expand_macros

KINDS = ("failure", "delay", "success", "verify")
MAX_FILE = 1 << 20  # bytes of a template file
UNITS = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400, "weeks": 7 * 86400}
TIMES = ("delay_warning_time", "maximal_queue_lifetime")
NAMES = ("myhostname", "mydomain", "mail_name", *(f"{t}_{u}" for t in TIMES for u in UNITS))
MAIL_NAME = "mailflow"
_HEADER = re.compile(r"([!-9;-~]+)[ \t]*:")  # a header label, as is_header takes it
_MARKER = re.compile(r"[A-Za-z0-9]\S*")
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")  # RFC 2045's token: a Charset is written into Content-Type
MAX_TEXT_LINE = 998  # octets of a text line (RFC 5322 2.1.1), before its $names are expanded


@dataclass(frozen=True)
class Template:
    """One kind's template; None fields keep the built-in ones."""

    kind: str
    text: tuple[str, ...]
    from_: str | None = None
    subject: str | None = None
    postmaster_subject: str | None = None
    charset: str = "us-ascii"

    def expand(self, values: dict[str, str]) -> list[str]:
        return [expand_macros(line, values) for line in self.text]


@dataclass(frozen=True)
class Templates:
    """The file's templates by kind (a kind without one keeps the built-in text)."""

    by_kind: tuple[tuple[str, Template], ...] = ()

    def get(self, kind: str) -> Template | None:
        return dict(self.by_kind).get(kind)


def load_templates(path: str) -> Templates:
    """The templates of the file at `path` ("" -> none). OSError (a file that cannot be read, or is not a regular
    file or too big) or ValueError (its content)."""
    if not path:
        return Templates()
    data = read_regular_file(Path(path), MAX_FILE)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {e.start})") from None
    return parse_templates(text, path)


def parse_templates(text: str, origin: str) -> Templates:
    """bounce_templates_load's file format, each template checked as bounce_template_parse_buffer checks it."""
    found: dict[str, Template] = {}
    lines = text.split("\n")
    n = 0
    while n < len(lines):
        line, n = lines[n], n + 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, eq, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not name:
            raise ValueError(f"line {n}: missing '=' after attribute name: {line.strip()!r}")
        if not value.startswith("<<"):
            raise ValueError(f"line {n}: {name}: a template is given as <<MARKER, its lines, then MARKER")
        marker = value[2:].strip()
        if not _MARKER.fullmatch(marker):
            raise ValueError(f"line {n}: {'missing' if not marker else 'malformed'} end marker after <<")
        start = n
        while n < len(lines) and lines[n].rstrip("\r") != marker:
            n += 1
        if n >= len(lines):
            raise ValueError(f"line {start}: missing {marker!r} end marker")
        body, n = [li.rstrip("\r") for li in lines[start:n]], n + 1
        kind = name.removesuffix("_template")
        if kind == name or kind not in KINDS:
            raise ValueError(f"line {start}: unknown template name: {name} (known: "
                             f"{', '.join(k + '_template' for k in KINDS)})")
        try:
            found[kind] = _template(kind, body)
        except ValueError as e:
            raise ValueError(f"line {start}: {name}: {e}") from None
    return Templates(tuple(found.items()))


def _template(kind: str, lines: list[str]) -> Template:
    fields: dict[str, str] = {}
    n = 0
    while n < len(lines) and (m := _HEADER.match(lines[n])):
        label, value = m.group(1).lower(), lines[n][m.end():].strip()
        n += 1
        if not value:
            raise ValueError(f'empty "{m.group(1)}" header value')
        if not value.isascii():
            raise ValueError(f'non-ASCII "{m.group(1)}" header value')
        if CONTROL.search(value):  # (not in a header value: one line, written as is; a tab aside)
            raise ValueError(f'control character in "{m.group(1)}" header value')
        if label == "postmaster-subject" and kind not in ("failure", "delay"):
            raise ValueError(f'inapplicable "{m.group(1)}" header label')
        if label not in ("charset", "from", "subject", "postmaster-subject"):
            raise ValueError(f'unknown "{m.group(1)}" header label (known: Charset, From, Subject, '
                             f'Postmaster-Subject)')
        fields[label] = value
    while n < len(lines) and not lines[n].strip():
        n += 1
    text = tuple(lines[n:])
    if not text:
        raise ValueError("missing message text")
    charset = fields.get("charset", "us-ascii")
    if not _TOKEN.fullmatch(charset):
        raise ValueError(f"Charset {charset!r} is not a MIME token (RFC 2045)")
    for number, line in enumerate(text, 1):
        if "\r" in line or "\0" in line:
            raise ValueError(f"message text line {number}: a bare CR or a NUL")
        if len(line.encode()) > MAX_TEXT_LINE:
            raise ValueError(f"message text line {number}: longer than {MAX_TEXT_LINE} octets (RFC 5322 2.1.1)")
    if not all(line.isascii() for line in text) and charset.lower() == "us-ascii":
        raise ValueError("8-bit message text: give a Charset other than us-ascii")
    for line in text:
        check_macros(line, NAMES)
    return Template(kind, text, fields.get("from"), fields.get("subject"), fields.get("postmaster-subject"), charset)


def template_values(*, myhostname: str, mydomain: str, delay_warning_time: float,
                    maximal_queue_lifetime: float) -> dict[str, str]:
    """What a template's $names stand for (bounce_template_lookup): the time parameters divided by the unit."""
    values = {"myhostname": myhostname, "mydomain": mydomain, "mail_name": MAIL_NAME}
    times = {"delay_warning_time": delay_warning_time, "maximal_queue_lifetime": maximal_queue_lifetime}
    for name, seconds in times.items():
        for unit, divisor in UNITS.items():
            values[f"{name}_{unit}"] = str(int(seconds) // divisor)
    return values

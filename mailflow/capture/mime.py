"""What a captured message holds, read from its parsed form (`email.message.EmailMessage`, `policy.default`).

    parse(raw) -> EmailMessage                      the whole message; its header only (header_only) when the
                                                    email package fails on it (nested deeper than the parser
                                                    recurses, a Content-Type it cannot read)
    header_only(raw) -> EmailMessage                its header fields (raw_items(), get()), the body not read;
                                                    as compat32 reads them (values unparsed) when policy.default
                                                    fails on one
    text_body(msg) / html_body(msg) -> str          the first text/plain (text/html) body that is not an
                                                    attachment; "" when there is none
    parts(msg) -> [(part_id, part)]                 every leaf part with Mailpit's part id ("1", "2.1", …)
    attachments(msg) -> ([Attachment], [Attachment])  (attachments, inline parts): a part with a Content-ID shown
                                                    inline is an inline part; any other part that is not one of
                                                    the bodies is an attachment
    links(text, html) -> [url]                      http(s) and mailto links of the text and the HTML, in order,
                                                    each once (href and src attributes, and bare URLs)
    header(msg, name) -> str | None                 the first such header, decoded (None when there is none)
    addresses(msg, header) -> [(name, address)]     the addresses of a header (To, Cc, From, Reply-To), the
                                                    names' encoded words decoded
    raw_values(msg, name) -> [str]                  each such header as sent (encoded words kept), unfolded
                                                    (raw_value(value): one value read so)
    unfold(value) -> str                            a header's lines joined as Go's net/textproto (Mailpit's
                                                    reader) joins them: each trimmed of spaces and tabs, one
                                                    space between, none before the first word
    decoded_header(msg, name) -> str                the first such header unfolded so, then its encoded words
                                                    decoded; "" when there is none
    snippet(text, html, limit=250) -> str           the start of the text (else of the HTML without tags), one line

Failure behaviour: a malformed message never raises here: the email package's defects are ignored, an
undecodable part gives "" (or its raw payload for an attachment), and a helper the email package fails in
anyway (Python 3.11's get_content_disposition raises IndexError on `attachment; filename*`) gives what it gives
for a message without such a part or header ("", [], ([], [])); `attachments` leaves out that part alone.
"""
from __future__ import annotations

import email
import email.errors
import email.header
import email.policy
import email.utils
import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from email.message import EmailMessage, MIMEPart
from email.parser import BytesHeaderParser
from html.parser import HTMLParser
from typing import Any, Callable, TypeVar, cast

_Helper = TypeVar("_Helper", bound=Callable[..., Any])
log = logging.getLogger("mailflow.capture")
MALFORMED = (IndexError, RecursionError, ValueError, LookupError, email.errors.MessageError)  # (the email package's)
URL = re.compile(r"""(?:https?://|mailto:)[^\s<>"'()\[\]]+""", re.IGNORECASE)


@dataclass(frozen=True)
class Attachment:
    """One attachment or inline part: its Mailpit part id, file name, type, Content-ID and decoded bytes."""

    part_id: str
    filename: str
    content_type: str
    content_id: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def checksums(self) -> dict[str, str]:
        return {"MD5": hashlib.md5(self.data).hexdigest(), "SHA1": hashlib.sha1(self.data).hexdigest(),
                "SHA256": hashlib.sha256(self.data).hexdigest()}


def parse(raw: bytes) -> EmailMessage:
    try:
        return email.message_from_bytes(raw, policy=email.policy.default)
    except Exception:  # RecursionError: multiparts nested a thousand deep; IndexError: `Content-Type: ;filename*`
        return header_only(raw)


_HEADER_END = re.compile(rb"\r?\n\r?\n")


def header_only(raw: bytes) -> EmailMessage:
    """Parsed from the header's bytes alone: what keeps it holds no copy of the body."""
    end = _HEADER_END.search(raw)
    header = raw[:end.end()] if end else raw
    try:
        return BytesHeaderParser(policy=email.policy.default).parsebytes(header)
    except Exception:  # a Content-Type policy.default's parser fails on: the values kept as text, unparsed
        return BytesHeaderParser(policy=email.policy.compat32).parsebytes(header)  # type: ignore[return-value]


def _never_raises(fallback: Callable[[], object]) -> Callable[[_Helper], _Helper]:
    """A helper the email package fails in on some malformed message (one of MALFORMED) gives `fallback()`
    instead (the module's failure behaviour), logged at debug: one such message must not break a listing, a
    search or a wait for the others. Any other exception is a bug, and raises."""
    def wrap(helper: _Helper) -> _Helper:
        @functools.wraps(helper)
        def guarded(*args, **kwargs):
            try:
                return helper(*args, **kwargs)
            except MALFORMED as e:
                log.debug("capture: %s failed on a malformed message (%s: %.200s): read as without it",
                          helper.__name__, type(e).__name__, e)
                return fallback()
        return cast(_Helper, guarded)
    return wrap


def _content(part) -> str:
    try:
        value = part.get_content()
    except (LookupError, ValueError, AssertionError):
        value = part.get_payload(decode=True) or b""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""


def _body_part(msg: EmailMessage, subtype: str):
    """None when there is none, or when the email package fails on one of the parts it looks at."""
    if not isinstance(msg, MIMEPart):  # (compat32's Message: header_only's last resort, its body not read)
        return None
    try:
        return msg.get_body(preferencelist=(subtype,))
    except (KeyError, TypeError, *MALFORMED):
        return None


@_never_raises(str)
def text_body(msg: EmailMessage) -> str:
    part = _body_part(msg, "plain")
    return _content(part) if part is not None else ""


@_never_raises(str)
def html_body(msg: EmailMessage) -> str:
    part = _body_part(msg, "html")
    return _content(part) if part is not None else ""


def parts(msg: MIMEPart, prefix: str = "") -> list[tuple[str, MIMEPart]]:
    """Leaf parts with their ids: the children of a multipart numbered from 1, nested ids dotted."""
    if not msg.is_multipart():
        return [(prefix or "1", msg)]
    found: list[tuple[str, MIMEPart]] = []
    for index, child in enumerate(msg.iter_parts(), 1):
        found += parts(child, f"{prefix}.{index}" if prefix else str(index))
    return found


def _decoded(part) -> bytes:
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload
    return _content(part).encode("utf-8")


@_never_raises(lambda: ([], []))
def attachments(msg: EmailMessage) -> tuple[list[Attachment], list[Attachment]]:
    """A part the email package fails on is left out, the others not."""
    bodies = {id(p) for p in (_body_part(msg, "plain"), _body_part(msg, "html")) if p is not None}
    found: dict[bool, list[Attachment]] = {False: [], True: []}
    for part_id, part in parts(msg):
        sorted_part = _attachment(part_id, part) if id(part) not in bodies else None
        if sorted_part is not None:
            found[sorted_part[0]].append(sorted_part[1])
    return found[False], found[True]


@_never_raises(lambda: None)
def _attachment(part_id: str, part: MIMEPart) -> tuple[bool, Attachment] | None:
    """(inline?, the part); None for a multipart, a text part shown as a body, or a part the email package
    fails on."""
    if part.get_content_maintype() == "multipart":
        return None
    disposition = part.get_content_disposition()
    content_id = (part.get("Content-ID") or "").strip().strip("<>")
    item = Attachment(part_id, part.get_filename() or "", part.get_content_type(), content_id, _decoded(part))
    if content_id and disposition != "attachment":
        return True, item
    if disposition == "attachment" or item.filename or part.get_content_maintype() != "text":
        return False, item
    return None


class _Links(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value and URL.match(value.strip()):
                self.found.append(value.strip())

    def handle_data(self, data):
        self.text.append(data)


def _html(html: str) -> _Links:
    parser = _Links()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # html.parser copes with nearly anything; a broken document gives what was read
        pass
    return parser


@_never_raises(list)
def links(text: str, html: str) -> list[str]:
    found = URL.findall(text)
    if html:
        found += _html(html).found
    return list(dict.fromkeys(url.rstrip(".,;:!?") for url in found))


@_never_raises(lambda: None)
def header(msg: EmailMessage, name: str) -> str | None:
    value = msg.get(name)
    return None if value is None else str(value)


@_never_raises(list)
def addresses(msg: EmailMessage, header: str) -> list[tuple[str, str]]:
    """Read from the raw values: policy.default's address header objects took 2.4 s for a To of 10 000
    addresses, getaddresses 0.08 s."""
    pairs = email.utils.getaddresses([_shielded(value) for value in raw_values(msg, header)])
    return [(_words_decoded(name), addr) for name, addr in pairs if addr]


_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_SPECIAL = re.compile(r'[(),:;<>@\[\]"\\]')
_BETWEEN_WORDS = re.compile(r"(?<=\?=)[ \t]+(?==\?)")


def _shielded(value: str) -> str:
    """Its encoded words' specials (`=?utf-8?q?Doe,_John?=`, a comma Q-encoding leaves as it is) written as
    their Q-encoding (`=2C`), which decodes to the same: read raw, the comma split the name into two addresses."""
    return _ENCODED_WORD.sub(lambda word: _SPECIAL.sub(lambda c: f"={ord(c.group()):02X}", word.group()), value)


def _words_decoded(text: str) -> str:
    """Each encoded word decoded where it stands (the text around it, 8-bit or not, kept as it is), the blanks
    between two encoded words dropped (RFC 2047 section 6.2); a word that cannot be decoded (an unknown
    charset) kept as sent."""
    if "=?" not in text:
        return text
    return _ENCODED_WORD.sub(_word_decoded, _BETWEEN_WORDS.sub("", text))


def _word_decoded(word: re.Match) -> str:
    try:
        return "".join(data.decode(charset or "ascii", "replace") if isinstance(data, bytes) else data
                       for data, charset in email.header.decode_header(word.group()))
    except (LookupError, ValueError, email.errors.HeaderParseError):  # an unknown charset, a broken word
        return word.group()


def raw_values(msg: EmailMessage, name: str) -> list[str]:
    """As Go's net/textproto reads them (Mailpit's): encoded words kept, unfolded; bytes that are not UTF-8
    replaced, as Go's JSON encoder does."""
    wanted = name.lower()
    return [raw_value(value) for key, value in msg.raw_items() if key.lower() == wanted]


def raw_value(value: str) -> str:
    """Its 8-bit bytes (kept by the parser as surrogate escapes) read as UTF-8, replaced if not; unfolded."""
    return unfold(value.encode("ascii", "surrogateescape").decode("utf-8", "replace"))


_LINE_BREAK = re.compile(r"\r?\n")


def unfold(value: str) -> str:
    """A value that starts on a continuation line (`Subject:` then ` hello`) starts with its first word, as Go
    trims the blanks after the colon of the header's joined line."""
    return " ".join(line.strip(" \t") for line in _LINE_BREAK.split(value)).lstrip(" \t")


@_never_raises(str)
def decoded_header(msg: EmailMessage, name: str) -> str:
    """Mailpit's reading (a tab-folded Subject is one line, trailing blanks gone), where the email package's
    keeps the folding's tab and the blanks."""
    wanted = name.lower()
    for key, value in msg.raw_items():
        if key.lower() == wanted:
            return str(email.policy.default.header_factory(key, unfold(value)))
    return ""


def snippet(text: str, html: str, limit: int = 250) -> str:
    if not text.strip():
        text = " ".join(_html(html).text) if html else ""
    return " ".join(text.split())[:limit]

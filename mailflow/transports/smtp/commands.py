"""The SMTP family's commands and what decides them, sans-IO: the one set of command builders and envelope checks
of the SMTP and LMTP clients (the command side of Postfix smtp_proto).

    Extensions.from_reply(reply) -> Extensions   what an EHLO or LHLO reply offers: lower-case keywords and their
                                  parameters, AUTH methods (also in the old `AUTH=` form)
      .supports(keyword) .size_limit (0: none advertised, or none Postfix would take) .auth_methods
      .with_8bitmime()           the same with 8BITMIME: for a server that offers SMTPUTF8 without it (connect.hello)
    screen_envelope(request) -> (Outcomes, sendable recipients)   an address with CR, LF, NUL or another control
                                  character never reaches the wire: a bad sender bounces every recipient (5.1.7),
                                  a bad recipient bounces itself (5.1.3)
    cannot_take(extensions, peer, request, wire=None) -> PermanentError | None   a reason to bounce before MAIL
                                  FROM: the message needs SMTPUTF8 and the peer does not offer it (5.6.7), or it is
                                  bigger than the peer's SIZE (5.3.4)
    part_headers_may_need_smtputf8(extensions, request, wire=None) -> bool   SMTPUTF8 mail to a peer without it,
                                  its own header section ASCII: the caller reads its MIME parts' header sections
                                  (a byte not ASCII there bounces it too, `smtputf8_refusal(peer)`, as Postfix's)
    content_encoding(extensions, request) -> (encoders, BODY parameter or None)   the content goes as
                                  it is to a peer that offers 8BITMIME, with BODY=8BITMIME or BODY=7BIT as the
                                  message says (none when it says neither), as Postfix's smtp_proto; to a peer
                                  without 8BITMIME every message but one said 7BIT goes through `Downgrade` (entities
                                  labelled 8bit to 7 bit: Postfix's default disable_mime_output_conversion = no).
                                  Header fields go as they are, 8-bit bytes too, whatever the peer offers (Postfix's
                                  smtp(8) encodes none: a DKIM signature over them stays whole)
    mail_command(request, extensions, body, converted=False, wire=None) -> bytes   `MAIL FROM:<sender>` with SIZE
                                  (offered, and the content goes unconverted: Postfix announces no SIZE when it
                                  converts), BODY, SMTPUTF8 (offered, and the message is flagged or needs it), RET
                                  and ENVID (DSN offered)
    rcpt_command(recipient, extensions, address=None, smtputf8=False) -> bytes   `RCPT TO:<address>` with ORCPT
                                  and NOTIFY (DSN offered; ORCPT as Postfix quotes it, see dsn_rcpt_params);
                                  `wire` and `address` put smtp_generic_maps' forms in place
    needs_smtputf8(request, wire=None) -> bool         UTF-8 in the envelope, or in the headers of a message whose
                                  client asked for SMTPUTF8
`wire` (mailflow.transports.generic.WireForm, None: as queued): every SMTPUTF8 decision judges the addresses and
the header section as they go out, not as queued (a queued `jöe@box.local` sent as `joe@example.com` needs no
SMTPUTF8; a queued `ann@box.local` sent as `änn@example.com` does, in the envelope or the header). Postfix judges
the queued message's flags.
    dsn_mail_params(request), dsn_rcpt_params(recipient, smtputf8=False) -> [bytes];  xtext(text), utf8_addr_xtext(text)

Commands come CRLF-terminated. The envelope is sent exactly as queued (no re-parsing).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from mailflow.address import has_unsafe_characters, printable
from mailflow.dsn_parameters import made_up_orcpt
from mailflow.errors import PermanentError
from mailflow.message import HEADER_READ_LIMIT, read_header
from mailflow.model import DeliveryRequest, Recipient
from mailflow.transports.downgrade import Downgrade
from mailflow.transports.encode import Encoder
from mailflow.transports.generic import WireForm
from mailflow.transports.smtp.addr import Peer
from mailflow.transports.smtp.reply import Reply
from mailflow.transports.smtp.trouble import Outcomes

CRLF = b"\r\n"
OFF_T_MAX = 2 ** 63 - 1  # the largest SIZE Postfix takes as a limit
_OLD_STYLE_AUTH = re.compile(r"auth=(.*)", re.IGNORECASE)


@dataclass(frozen=True)
class Extensions:
    """See the module docstring."""

    keywords: dict[str, str] = field(default_factory=dict)
    auth_methods: tuple[str, ...] = ()

    @classmethod
    def from_reply(cls, reply: Reply) -> "Extensions":
        keywords: dict[str, str] = {}
        methods: list[str] = []
        for line in reply.lines[1:]:  # the first line is the server's name
            line = line.strip()
            old_style = _OLD_STYLE_AUTH.fullmatch(line)
            if old_style:  # "AUTH=LOGIN PLAIN", from a draft some servers still follow
                keyword, params = "auth", old_style.group(1)
            else:
                keyword, _, params = line.partition(" ")
                keyword = keyword.lower()
            if keyword:
                keywords[keyword] = params.strip()
            if keyword == "auth":
                methods += [m.lower() for m in params.split()]
        return cls(keywords, tuple(methods))

    def supports(self, keyword: str) -> bool:
        return keyword in self.keywords or keyword.lower() in self.keywords  # (callers name them in lower case)

    def smtputf8_without_8bitmime(self) -> bool:
        return self.supports("smtputf8") and not self.supports("8bitmime")

    def with_8bitmime(self) -> "Extensions":
        """These extensions and 8BITMIME: what a server that offers SMTPUTF8 takes (RFC 6531 3.1 requires it to
        offer 8BITMIME too; Postfix's smtp_proto assumes it when it is missing, rather than convert the content)."""
        return Extensions({**self.keywords, "8bitmime": ""}, self.auth_methods)

    @property
    def size_limit(self) -> int:
        """The first word after SIZE as Postfix's smtp_proto reads it: ASCII digits up to OFF_T_MAX, else no limit
        (0; off_cvt_string's -1). A number too long for int() is never converted."""
        words = self.keywords.get("size", "").split()
        value = words[0] if words else ""
        if not (value.isascii() and value.isdigit()) or len(value) > len(str(OFF_T_MAX)):
            return 0
        return int(value) if int(value) <= OFF_T_MAX else 0


# ---------------------------------------------------------------------------------------------------- checks


def screen_envelope(request: DeliveryRequest) -> tuple[Outcomes, list[Recipient]]:
    """See the module docstring."""
    outcomes = Outcomes()
    if has_unsafe_characters(request.sender):
        bad_sender = PermanentError("5.1.7", f"<{printable(request.sender)}>: Bad sender address syntax")
        outcomes.fail(request.recipients, bad_sender)
        return outcomes, []
    sendable = []
    for r in request.recipients:
        if has_unsafe_characters(r.address):
            outcomes.fail([r], PermanentError("5.1.3", f"<{printable(r.address)}>: Bad recipient address syntax"))
        else:
            sendable.append(r)
    return outcomes, sendable


def cannot_take(extensions: Extensions, peer: Peer, request: DeliveryRequest,
                wire: WireForm | None = None) -> PermanentError | None:
    """See the module docstring."""
    if needs_smtputf8(request, wire) and not extensions.supports("smtputf8"):
        return smtputf8_refusal(peer)
    limit = extensions.size_limit
    size = request.content.size
    if limit and size > limit:
        return PermanentError("5.3.4", f"message size {size} exceeds size limit {limit} of server {peer.name}")
    return None


def smtputf8_refusal(peer: Peer) -> PermanentError:
    """The bounce of a message that needs SMTPUTF8 at a peer that does not offer it (Postfix's words)."""
    return PermanentError("5.6.7", f"SMTPUTF8 is required, but was not offered by host {peer.name}")


def part_headers_may_need_smtputf8(extensions: Extensions, request: DeliveryRequest,
                                   wire: WireForm | None = None) -> bool:
    """Whether a MIME part's header section is still to be read for a byte that is not ASCII before this message
    goes to this peer (after cannot_take found nothing): SMTPUTF8 mail, a peer without SMTPUTF8, and the message's
    own header section as sent all ASCII. Postfix's cleanup flags a non-ASCII header field of any section
    (SMTPUTF8_FLAG_HEADER: cleanup_out_header gets the MIME parts' too) and its smtp(8) bounces such mail there."""
    return request.smtputf8 and not request.verify and not extensions.supports("smtputf8") and (
        _head_sent(request, wire).isascii())


def needs_smtputf8(request: DeliveryRequest, wire: WireForm | None = None) -> bool:
    """See the module docstring."""
    if wire is None:
        envelope = [request.sender, *(r.address for r in request.recipients)]
    else:
        envelope = [wire.sender, *(wire.recipient(r.address) for r in request.recipients)]
    if not all(a.isascii() for a in envelope) or (wire is not None and wire.utf8_head):
        return True
    return request.smtputf8 and not _head_sent(request, wire).isascii()


def _head_sent(request: DeliveryRequest, wire: WireForm | None) -> bytes:
    """The header section as it goes out (smtp_generic_maps' when it changed one; HEADER_READ_LIMIT bytes)."""
    if wire is not None and wire.head is not None:
        return wire.head[1]
    return read_header(request.content, HEADER_READ_LIMIT)[0]


def content_encoding(extensions: Extensions, request: DeliveryRequest) -> tuple[tuple[Encoder, ...], str | None]:
    """See the module docstring."""
    body = request.body_type.upper()
    if extensions.supports("8bitmime"):
        return (), f"BODY={body}" if body in ("8BITMIME", "7BIT") else None
    if body == "7BIT":  # (cleanup marked any message with an entity labelled 8bit 8BITMIME)
        return (), None
    return (Downgrade(),), None


# ---------------------------------------------------------------------------------------------------- commands


def mail_command(request: DeliveryRequest, extensions: Extensions, body: str | None = None, *,
                 converted: bool = False, wire: WireForm | None = None) -> bytes:
    """See the module docstring. `wire`: smtp_generic_maps' forms (the sender said), None: the request's."""
    params = []
    if extensions.supports("size") and not converted:
        params.append(f"SIZE={request.content.size}".encode("ascii"))
    if body:
        params.append(body.encode("ascii"))
    if extensions.supports("smtputf8") and (request.smtputf8 or needs_smtputf8(request, wire)):
        params.append(b"SMTPUTF8")
    if extensions.supports("dsn"):
        params += dsn_mail_params(request)
    said = request.sender if wire is None else wire.sender
    return b" ".join([b"MAIL FROM:<" + said.encode("utf-8") + b">", *params]) + CRLF


def rcpt_command(recipient: Recipient, extensions: Extensions, address: str | None = None,
                 smtputf8: bool = False) -> bytes:
    """See the module docstring. `address`: the one to say (smtp_generic_maps'), None: the recipient's;
    `smtputf8`: the message asked for SMTPUTF8 (the type of an ORCPT made up here)."""
    params = dsn_rcpt_params(recipient, smtputf8) if extensions.supports("dsn") else []
    said = recipient.address if address is None else address
    return b" ".join([b"RCPT TO:<" + said.encode("utf-8") + b">", *params]) + CRLF


def dsn_mail_params(request: DeliveryRequest) -> list[bytes]:
    """RET and ENVID (xtext) for a next hop that offers DSN (RFC 3461 4.3, 4.4), as the client gave them."""
    params = []
    if request.ret:
        params.append(f"RET={request.ret.upper()}")
    if request.envid:
        params.append(f"ENVID={xtext(request.envid)}")
    return [p.encode("ascii") for p in params]


def dsn_rcpt_params(recipient: Recipient, smtputf8: bool = False) -> list[bytes]:
    """ORCPT and NOTIFY for a next hop that offers DSN (RFC 3461 4.1, 4.2), as Postfix's smtp_proto writes them,
    whether or not the next hop offers SMTPUTF8: the queued ORCPT quoted by its own type (`utf-8;` with RFC 6533's
    `\\x{HEX}` escapes; any other type, `rfc822;` with a non-ASCII address too, as xtext: `+HH` of the UTF-8
    bytes), else one made from the address the client first gave (`utf-8;` only for a non-ASCII one of a message
    that asked for SMTPUTF8, else `rfc822;`); NOTIFY as given (none given: none sent, the next hop's default)."""
    params = []
    orcpt = recipient.orcpt or made_up_orcpt(recipient.original, smtputf8)
    if orcpt:
        addr_type, _, addr = orcpt.partition(";")
        if addr_type.lower() == "utf-8":
            params.append(f"ORCPT={addr_type};{utf8_addr_xtext(addr)}")
        else:
            params.append(f"ORCPT={addr_type};{xtext(addr)}")
    if recipient.notify:
        params.append(f"NOTIFY={recipient.notify.upper()}")
    return [p.encode("ascii") for p in params]



_XTEXT_AS_IS = re.compile(r"[!-*,-<>-~]*")  # printable ASCII but "+" (0x2B) and "=" (0x3D)


def xtext(text: str) -> str:
    """RFC 3461 xtext: printable ASCII but '+' and '=' as is, every other byte (of the UTF-8) as +HH."""
    if _XTEXT_AS_IS.fullmatch(text):  # (most addresses: no character to quote, no walk over each)
        return text
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b not in (0x2B, 0x3D) else f"+{b:02X}"
                   for b in text.encode("utf-8"))


def utf8_addr_xtext(text: str) -> str:
    """RFC 6533 utf-8-addr-xtext: like xtext, but a character outside printable ASCII (or '+', '=', '\\')
    is written \\x{HEX} by its code point, at least two hex digits (Postfix's uxtext_quote)."""
    return "".join(c if 0x21 <= ord(c) <= 0x7E and c not in "+=\\" else f"\\x{{{ord(c):02X}}}" for c in text)

"""bounce: the delivery status notifications mailflow sends (Postfix bounce(8)), as pure functions.

Owns the wording and the structure of a notice: RFC 3464 (multipart/report; report-type=delivery-status),
RFC 3461 NOTIFY/RET/ENVID/ORCPT semantics as Postfix applies them, RFC 6533 for SMTPUTF8 mail, RFC 3834
Auto-Submitted. No I/O and no clock: the caller passes the time, the original content and who to report on.

    NoticeRecipient(recipient, action, status, diagnostic, remote_mta="", last_attempt=None)
    wants_notice(recipient, kind) -> bool      does this recipient's NOTIFY ask for a "failure"/"delay"/"success"
    build_notice(*, kind, queue_id, ..., to=None, postmaster_copy=False) -> bytes   the complete notice (CRLF);
                                               `to` (default: the original sender) is its To: address; a
                                               postmaster copy is a double bounce (Postfix's layout for one)
    notice_is_8bit(notice) -> bool             whether the notice needs BODY=8BITMIME

Decisions:
- NOTIFY "" (not given) means FAILURE,DELAY (not SUCCESS); NEVER means nothing; otherwise a comma list.
- The returned original (part 3), its envelope sender first in a Return-Path field as Postfix returns it: in a
  failure notice without RET=HDRS, the whole message when it is at most `size_limit` bytes (bounce_size_limit);
  otherwise (RET=HDRS, a bigger message, any message when the limit is 0, and every delay or success notice,
  whatever RET says, as Postfix's defer and trace services return DSN_RET_HDRS) its header section only
  (text/rfc822-headers), as Postfix's bounce_original does (a truncated message would damage its MIME structure). So a
  notice is never bigger than the limit plus a header section: callers pass `original` read accordingly (the whole
  message when `original_size` <= size_limit, else at least its header section), never a big message whole. The
  original is copied byte for byte.
- The human part (part 1) is Postfix's built-in template for the kind, word for word (a delay notice: "more than
  N hour(s)" from delay_warning_time, "N day(s) old" from the queue lifetime), then a paragraph per recipient,
  `<address>: <reason>`, wrapped at 79 columns as Postfix's line_wrap (a word is never split unless it is longer
  than a line may be).
- A postmaster copy (a failed bounce, sent to double_bounce_recipient; notify_classes' copies of failure and delay
  notices) is laid out as Postfix's: Subject "Postmaster Copy: Undelivered Mail" or "Postmaster Warning: Delayed
  Mail", Auto-Submitted: auto-generated, no template text (only the recipient paragraphs), the whole original
  (within the size limit) when the caller passes RET=FULL (a double bounce), else its header section. A null
  sender is named MAILER-DAEMON@<reporting MTA> in its sender field and Return-Path, as Postfix's bounce(8) names
  it.
- Diagnostic-Code: `smtp; <reply>` when the diagnostic carries a remote SMTP reply, in the transports' wording
  "host H said: <reply> (in reply to X command)" / "host H refused to talk to me: <reply>" (or to start TLS, or
  the SASL refusal "server H said: <reply>"), or is a bare reply
  ("250 2.0.0 Ok") from a named `remote_mta`; only the reply itself goes into the field, whatever its code (a 600 or
  a 199 too) and with the garbage lines the peer sent before it, as Postfix's. Anything else is our own
  reason: `X-Mailflow; <text>` (or the agent's own Diagnostic-Code, `diagnostic_code`: a failed command's
  `x-unix; <its output>`, as Postfix's pipe_command gives it), for a success through an agent (`relay` not
  "none") `X-Mailflow; delivery via <relay>: <text>` as in the human part (Postfix's trace_append puts the relay
  in the reason). Remote-MTA appears with an `smtp` Diagnostic-Code only (`remote_mta` given): a
  reason of our own about a peer (a lost connection, its SIZE, no SMTPUTF8) names none, as with Postfix (its
  dsb_formal names an MTA only with that MTA's reply). A recipient returned for its age ("message expired: "
  before its last reason, from qmgr) gets that last reason in the field and in the human part, as Postfix
  returns one.
- Original-Recipient: the ORCPT (the client's, or the one smtpd or cleanup made up as Postfix's do), else the
  address as the client first gave it, as Postfix always reports one.
- Any control character (CR, LF, TAB, NUL, ...) in a diagnostic, an address or an id becomes a space, so no value
  can add a header line or a field group; runs of white space collapse, except in a diagnostic (a command's output
  keeps its blanks, as in Postfix's notices). Long values are folded at spaces.
- A notice about SMTPUTF8 mail (`smtputf8`: the client asked for it, as Postfix decides; or an address with
  non-ASCII characters) uses message/global-delivery-status, the "utf-8" address type for a non-ASCII address,
  and message/global (or message/global-headers) for the original, whose headers may be UTF-8: RFC 6533. Otherwise
  the delivery-status part is ASCII: non-ASCII characters in its values become "?".
- Non-ASCII bytes anywhere (original content, a UTF-8 diagnostic in the text part) make the notice 8-bit: such
  parts say Content-Transfer-Encoding: 8bit, and `notice_is_8bit` tells the caller to send BODY=8BITMIME.
- The MIME boundary derives from queue_id and notice_id; a suffix is added if it would occur in any part.
Failures: ValueError for an unknown kind, action or RET value, or an empty recipient list.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mailflow import address
from mailflow.bounce_templates import Template
from mailflow.config import DEFAULTS
from mailflow.message import rfc5322_date, split_header
from mailflow.model import Recipient
from mailflow.syntax import is_enhanced_status

CRLF = "\r\n"
KINDS = ("failure", "delay", "success")
ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
SUBJECTS = {
    "failure": "Undelivered Mail Returned to Sender",
    "delay": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}
POSTMASTER_SUBJECTS = {"failure": "Postmaster Copy: Undelivered Mail", "delay": "Postmaster Warning: Delayed Mail"}
_TEMPLATES = {  # Postfix's built-in failure, delay and success templates, between the greeting and the sign-off
    "failure": ["I'm sorry to have to inform you that your message could not",
                "be delivered to one or more recipients. It's attached below."],
    "delay": ["#" * 68,
              "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
              "#" * 68,
              "",
              "Your message could not be delivered for more than {hours} hour(s).",
              "It will be retried until it is {days} day(s) old."],
    "success": ["Your message was successfully delivered to the destination(s)",
                "listed below. If the message was delivered to mailbox you will",
                "receive no further notifications. Otherwise you may still receive",
                "notifications of mail delivery errors from other systems."],
}
_RETURNED = {"failure": "Undelivered ", "delay": "Undelivered ", "success": ""}  # bounce_original's descriptions
_DEFAULT_STATUS = {"failed": "5.0.0", "delayed": "4.0.0"}  # others: 2.0.0
EXPIRED = "message expired: "  # what qmgr puts before the last reason of a recipient returned for its age
_REMOTE_REPLY = re.compile(
    r"(?:Protocol error: )?"  # (a reply where another was due, as Postfix's smtp client words it)
    r"(?:host \S+ (?:said|refused to talk to me)|TLS is required, but host \S+ refused to start TLS"
    r"|SASL authentication failed; server \S+ said): "
    r"(?P<reply>.+?)(?: \(in reply to [^()]* command\))?"  # (any code, garbage lines before it: as the peer said it)
)
_BARE_REPLY = re.compile(r"[0-9]{3}(?:[ -].*)?")
_BOUNDARY_UNSAFE = re.compile(r"[^0-9A-Za-z'()+_,\-./:=?]")
_ID_UNSAFE = re.compile(r"[^0-9A-Za-z!#$%&'*+\-/=?^_`{|}~.]")
FOLD_WIDTH = 78
TEXT_WIDTH = 79  # the human part's lines, as Postfix's bounce_print_wrap
SUCCESSFUL = ("delivered", "relayed", "expanded")  # the actions of a success notice
LONGEST_WORD = 900  # a word longer than this is cut, so that no line exceeds RFC 5322's 998


@dataclass(frozen=True)
class NoticeRecipient:
    """What one notice says about one recipient. `action` is RFC 3464's ("failed", "delayed", "delivered",
    "relayed", "expanded"); `status` the enhanced code; `diagnostic` the remote reply or our own reason;
    `remote_mta` the host name of the MTA that answered, if one did; `relay` where a delivered or relayed copy
    went (`host[addr]:port`, `local`...), which a success notice names as Postfix's do ("delivery via ...").
    `diagnostic_code`: the Diagnostic-Code the agent gave, `type; text` (a command's `x-unix; output`); "" makes
    one from `diagnostic`."""

    recipient: Recipient
    action: str
    status: str
    diagnostic: str
    remote_mta: str = ""
    last_attempt: float | None = None
    relay: str = ""
    diagnostic_code: str = ""


def wants_notice(recipient: Recipient, kind: str) -> bool:
    """RFC 3461 NOTIFY as Postfix applies it: not given -> failure and delay; NEVER -> none; else the list."""
    if kind not in KINDS:
        raise ValueError(f"unknown notice kind {kind!r}")
    notify = recipient.notify.strip()
    if not notify:
        return kind in ("failure", "delay")
    words = {w.strip().upper() for w in notify.split(",")}
    if "NEVER" in words:
        return False
    return kind.upper() in words


def notice_is_8bit(notice: bytes) -> bool:
    """True when the notice has a byte outside ASCII: it must go out with BODY=8BITMIME (or SMTPUTF8)."""
    return not notice.isascii()


def build_notice(
    *,
    kind: str,
    queue_id: str,
    sender: str,
    arrival: float,
    envid: str,
    ret: str,
    recipients: list[NoticeRecipient],
    original: bytes,
    reporting_mta: str,
    now: float,
    will_retry_until: float | None = None,
    notice_id: str,
    size_limit: int = DEFAULTS.queue.bounce_size_limit,
    to: str | None = None,
    original_size: int | None = None,
    delay_warning_time: float = DEFAULTS.queue.delay_warning_time,
    postmaster_copy: bool = False,
    smtputf8: bool = False,
    template: Template | None = None,
    template_values: dict[str, str] | None = None,
) -> bytes:
    """The notice about `recipients` of message `queue_id` (sent by `sender`), as a complete RFC 5322 message.

    It is addressed to `to`, by default the original `sender`; a double bounce passes the postmaster here.
    `original_size` is the original message's size when `original` is only its beginning. A delay notice
    says, as Postfix's, that the message waited more than `delay_warning_time` (in hours) and will be retried
    until it is (`will_retry_until` - `arrival`) days old. A `postmaster_copy` (a double bounce) is Postfix's:
    its own subject, Auto-Submitted: auto-generated, no template text, the whole original only with RET=FULL.
    `smtputf8`: the original was SMTPUTF8 mail (its headers may be UTF-8), reported with the global types.
    `template`: bounce_template_file's for the kind (its From, Subject, Postmaster-Subject, Charset and text, the
    text's $names from `template_values`), else Postfix's built-in one.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown notice kind {kind!r}")
    ret = ret.strip().upper()
    if ret not in ("", "FULL", "HDRS"):
        raise ValueError(f"unknown RET value {ret!r}")
    if not recipients:
        raise ValueError("a notice needs at least one recipient")
    for nr in recipients:
        if nr.action not in ACTIONS:
            raise ValueError(f"unknown action {nr.action!r}")

    global_ = smtputf8 or any(not a.isascii() for a in _addresses(sender, recipients))
    size = len(original) if original_size is None else original_size
    if postmaster_copy and kind not in POSTMASTER_SUBJECTS:
        raise ValueError(f"no postmaster copy of a {kind} notice")
    full = (ret == "FULL" if postmaster_copy else kind == "failure" and ret != "HDRS") and size <= size_limit
    mta = _clean(reporting_mta)
    named_sender = sender or f"MAILER-DAEMON@{mta}"  # the null sender, as Postfix's bounce(8) names it
    returned = _with_return_path(named_sender, original if full else split_header(original)[0])

    if postmaster_copy:
        boilerplate: list[str] = []  # (no template text in a postmaster copy)
    elif template is not None:
        boilerplate = template.expand(template_values or {})
    else:
        boilerplate = _template(kind, mta, delay_warning_time, arrival, will_retry_until)
    charset = template.charset if template is not None and not postmaster_copy else "us-ascii"
    text_part = _text_part(boilerplate, recipients, charset)
    status_part = _status_part(global_, mta, queue_id, named_sender, arrival, envid, recipients, will_retry_until)
    original_part = _original_part(kind, global_, full, returned)
    parts = [text_part, status_part, original_part]
    boundary = _boundary(queue_id, notice_id, parts)

    to_address = sender if to is None else to
    eight_bit = any(not p.isascii() for p in parts) or not to_address.isascii()
    header = [
        f"From: {_from(template, mta)}",
        f"To: <{_clean(to_address)}>",
        f"Subject: {_subject(kind, template, postmaster_copy)}",
        f"Date: {rfc5322_date(now)}",
        f"Message-ID: <{_ID_UNSAFE.sub('-', _clean(notice_id)) or 'notice'}@{mta}>",
        f"Auto-Submitted: {'auto-generated' if postmaster_copy else 'auto-replied'}",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;{CRLF}\tboundary="{boundary}"',
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}",
    ]
    out = [(CRLF.join(header) + CRLF + CRLF).encode("utf-8"),
           b"This is a MIME-encapsulated message.\r\n"]
    delimiter = f"\r\n--{boundary}\r\n".encode("ascii")
    for part in parts:
        out += [delimiter, part]
    out.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


# ---------------------------------------------------------------------------------------------------- the parts


def _from(template: Template | None, mta: str) -> str:
    """The From: field: the template's (an address without a domain qualified, as cleanup does Postfix's), else
    Postfix's."""
    if template is None or template.from_ is None:
        return f"Mail Delivery System <MAILER-DAEMON@{mta}>"
    value = _clean(template.from_)
    if "<" in value:
        return re.sub(r"<([^<>@]+)>", lambda m: f"<{m.group(1)}@{mta}>", value)
    return f"{value}@{mta}" if "@" not in value and " " not in value else value


def _subject(kind: str, template: Template | None, postmaster_copy: bool) -> str:
    """The template's Subject (its Postmaster-Subject in a postmaster copy), else the built-in one."""
    if template is not None:
        chosen = template.postmaster_subject if postmaster_copy else template.subject
        if chosen is not None:
            return _clean(chosen)
    return (POSTMASTER_SUBJECTS if postmaster_copy else SUBJECTS)[kind]


def _text_part(boilerplate: list[str], recipients: list[NoticeRecipient], charset: str) -> bytes:
    """Part 1: what happened, for a human: the template's text (Postfix's built-in one, bounce_templates.c, or
    bounce_template_file's; none in a postmaster copy), then one paragraph per recipient, wrapped as Postfix's
    line_wrap does (79 columns, continuation indent 4). `charset`: the template's (utf-8 when it says us-ascii
    and a recipient's paragraph is not ASCII)."""
    # (each paragraph encoded as it is made: 100 000 recipients' lines, then their text, then its bytes, were held
    # at once)
    body = [b"", (CRLF.join(boilerplate) + CRLF).encode("utf-8") if boilerplate else b""]  # [0]: the head, below
    for nr in recipients:
        r = nr.recipient
        who = f"<{_clean(r.address)}>"
        original = address.shown_original(r.original)  # (needless quotes dropped, as Postfix writes it)
        if original and original != r.address:
            who += f" (expanded from <{_clean(original)}>)"
        said = _via(nr, _reason(nr) or _action_words(nr.action))
        body.append((CRLF + CRLF.join(line_wrap(_cut_long_words(f"{who}: {said}"), TEXT_WIDTH, 4)) + CRLF)
                    .encode("utf-8"))
    ascii_ = all(b.isascii() for b in body)
    if not ascii_ and charset.lower() == "us-ascii":
        charset = "utf-8"
    head = [
        "Content-Description: Notification",
        f"Content-Type: text/plain; charset={charset}",
        f"Content-Transfer-Encoding: {'7bit' if ascii_ else '8bit'}",
    ]
    body[0] = (CRLF.join(head) + CRLF + CRLF).encode("utf-8")  # (joined once: head + join held the part twice)
    return b"".join(body)


def _template(kind: str, mta: str, delay_warning_time: float, arrival: float,
              will_retry_until: float | None) -> list[str]:
    lifetime = (will_retry_until - arrival) if will_retry_until is not None else 0.0
    lines = [f"This is the mail system at host {mta}.", ""]
    lines += [line.format(hours=int(delay_warning_time // 3600), days=int(max(0.0, lifetime) // 86400))
              for line in _TEMPLATES[kind]]
    if kind != "success":
        lines += ["", "For further assistance, please send mail to postmaster.", "",
                  "If you do so, please include this problem report. You can",
                  "delete your own text from the attached returned message."]
    return [*lines, "", "                   The mail system"]


def _status_part(global_: bool, mta: str, queue_id: str, sender: str, arrival: float, envid: str,
                 recipients: list[NoticeRecipient], will_retry_until: float | None) -> bytes:
    """Part 2: RFC 3464 per-message fields, then one field group per recipient."""
    value = _clean if global_ else (lambda s: _ascii(_clean(s)))
    per_message = [f"Reporting-MTA: dns; {mta}"]  # in the order of Postfix's bounce_header_dsn
    if envid:
        per_message.append(f"Original-Envelope-Id: {value(envid)}")
    per_message += [f"X-Mailflow-Queue-ID: {value(queue_id)}", f"X-Mailflow-Sender: {_address_field(sender, global_)}",
                    f"Arrival-Date: {rfc5322_date(arrival)}"]
    # (each group encoded as it is made: 100 000 recipients' fields, then their text, then its bytes, were held at
    # once)
    groups = [b"", _field_group(per_message)]  # [0]: the head, below
    for nr in recipients:
        group = [f"Final-Recipient: {_address_field(nr.recipient.address, global_)}"]
        if nr.recipient.orcpt:
            group.append(f"Original-Recipient: {value(nr.recipient.orcpt)}")
        elif nr.recipient.original:
            # the address the sender used, rewritten or expanded here or not: Postfix "always reports an
            # Original-Recipient field, because it is more useful and more consistent" (bounce_notify_util.c)
            group.append(f"Original-Recipient: {_address_field(nr.recipient.original, global_)}")
        group.append(f"Action: {nr.action}")
        group.append(f"Status: {_status(nr)}")
        diagnostic_type, diagnostic = _diagnostic_code(nr)
        if nr.remote_mta and diagnostic_type == "smtp":
            group.append(f"Remote-MTA: dns; {value(nr.remote_mta)}")
        if diagnostic:
            said = _one_line(diagnostic) if global_ else _ascii(_one_line(diagnostic))
            group.append(f"Diagnostic-Code: {value(diagnostic_type)}; {said}")  # (an agent's type: cleaned too)
        if nr.last_attempt is not None:
            group.append(f"Last-Attempt-Date: {rfc5322_date(nr.last_attempt)}")
        if nr.action == "delayed" and will_retry_until is not None:
            group.append(f"Will-Retry-Until: {rfc5322_date(will_retry_until)}")
        groups.append(_field_group(group))
    content_type = "message/global-delivery-status" if global_ else "message/delivery-status"
    head = ["Content-Description: Delivery report", f"Content-Type: {content_type}"]
    if not all(g.isascii() for g in groups):
        head.append("Content-Transfer-Encoding: 8bit")
    groups[0] = (CRLF.join(head) + CRLF).encode("ascii")  # (joined once; the CRLF that joins makes the blank line)
    return b"\r\n".join(groups)


def _field_group(fields: list[str]) -> bytes:
    """A group of fields, folded, each ending in CRLF, as bytes."""
    return "".join(_fold(field) + CRLF for field in fields).encode("utf-8")


def _with_return_path(sender: str, returned: bytes) -> bytes:
    """The returned original (or its header section) with the envelope sender in a Return-Path field on top, as
    Postfix returns it (cleanup removed the one it may have had: message_drop_headers)."""
    if returned[:12].lower() == b"return-path:":
        return returned
    return f"Return-Path: <{_clean(sender)}>{CRLF}".encode("utf-8") + returned


def _original_part(kind: str, global_: bool, full: bool, returned: bytes) -> bytes:
    """Part 3: the original message, or its header section, byte for byte."""
    if full:
        content_type = "message/global" if global_ else "message/rfc822"
        description = f"{_RETURNED[kind]}Message"
    else:
        content_type = "message/global-headers" if global_ else "text/rfc822-headers"
        description = f"{_RETURNED[kind]}Message Headers"
    head = [f"Content-Description: {description}", f"Content-Type: {content_type}"]
    if not returned.isascii():
        head.append("Content-Transfer-Encoding: 8bit")
    return (CRLF.join(head) + CRLF + CRLF).encode("ascii") + returned


# ---------------------------------------------------------------------------------------------------- fields


def _diagnostic_code(nr: NoticeRecipient) -> tuple[str, str]:
    """('smtp', the reply) when the diagnostic is a remote SMTP reply, else ('X-Mailflow', our reason); for a
    recipient returned for its age, the last reason (as the human part gives it, like Postfix's); the agent's own
    (`diagnostic_code`: a command's `x-unix; output`) when it gave one."""
    given_type, given, given_text = nr.diagnostic_code.partition(";")
    if given:
        return given_type.strip(), given_text.strip()
    text = _reason(nr)
    remote = _REMOTE_REPLY.fullmatch(text)
    if remote:
        return "smtp", remote["reply"]
    if nr.remote_mta and _BARE_REPLY.fullmatch(text):
        return "smtp", text
    return "X-Mailflow", _via(nr, text)


def _reason(nr: NoticeRecipient) -> str:
    """The recipient's diagnostic as both parts give it: cleaned, and for one returned for its age the last reason
    (qmgr's "message expired: " dropped)."""
    return _one_line(nr.diagnostic).removeprefix(EXPIRED)


def _via(nr: NoticeRecipient, said: str) -> str:
    """A success's reason as Postfix's trace_append() hands it to bounce(8): after "delivery via RELAY: " unless
    the relay is "none" (discard(8), an expansion without one)."""
    if nr.action in SUCCESSFUL and nr.relay and nr.relay != "none":
        return f"delivery via {_clean(nr.relay)}: {said}"
    return said


def _status(nr: NoticeRecipient) -> str:
    """The enhanced status code, or the generic one for the action when the given one is malformed."""
    status = nr.status.strip()
    if is_enhanced_status(status):
        return status
    return _DEFAULT_STATUS.get(nr.action, "2.0.0")


def _address_field(address: str, global_: bool) -> str:
    """`rfc822; addr`, or RFC 6533's `utf-8; addr` for an address with non-ASCII characters."""
    address = _clean(address)
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {address}" if global_ else f"rfc822; {_ascii(address)}"


def _addresses(sender: str, recipients: list[NoticeRecipient]) -> list[str]:
    out = [sender]
    for nr in recipients:
        out += [nr.recipient.address, nr.recipient.orcpt]
    return out


def _action_words(action: str) -> str:
    return {"failed": "delivery failed", "delayed": "delivery temporarily failed",
            "delivered": "delivered", "relayed": "relayed", "expanded": "expanded"}[action]


# The characters of Unicode's categories Cc, Zl, Zp and Cs, exactly (a stable set: Unicode never adds to them).
# One substitution, not a category lookup a character: a notice about 10 000 recipients with 2 KB replies took
# 9.5 s of CPU (the GIL held all along, off the event loop but not out of its way), 1.5 s now.
_NOT_IN_A_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _clean(value: str) -> str:
    """One line of text: control and line-separator characters become spaces, white space runs collapse."""
    return " ".join(_NOT_IN_A_LINE.sub(" ", value).split())


def _one_line(value: str) -> str:
    """A reason as one line: control and line-separator characters become spaces, runs of blanks are kept (a
    command's output reaches Postfix's notices so), the ends trimmed."""
    return _NOT_IN_A_LINE.sub(" ", value).strip()


def _ascii(value: str) -> str:
    return value.encode("ascii", "replace").decode("ascii")


def _cut_long_words(text: str) -> str:
    """`text` with each word longer than LONGEST_WORD cut into pieces (a space between): a line stays under 998."""
    words = text.split(" ")
    return " ".join(" ".join(w[i:i + LONGEST_WORD] for i in range(0, len(w), LONGEST_WORD)) or w for w in words)


def _fold(field: str) -> str:
    """`Name: value` folded before spaces so that lines stay near FOLD_WIDTH (RFC 5322 2.2.3)."""
    words = []
    for word in field.split(" "):
        while len(word) > LONGEST_WORD:  # cannot fold inside a word: cut it (adds a space when unfolded)
            words.append(word[:LONGEST_WORD])
            word = word[LONGEST_WORD:]
        words.append(word)
    lines = [words[0] + (" " + words[1] if len(words) > 1 else "")]
    for word in words[2:]:
        if not word:  # a run of blanks: kept while the line has room under LONGEST_WORD, else dropped
            if len(lines[-1]) < LONGEST_WORD:
                lines[-1] += " "
        elif len(lines[-1]) + 1 + len(word) > FOLD_WIDTH:  # never leave a blank continuation line
            lines.append(" " + word)
        else:
            lines[-1] += " " + word
    return CRLF.join(lines)


def _boundary(queue_id: str, notice_id: str, parts: list[bytes]) -> str:
    """A boundary derived from the ids, made unique against the parts' content (RFC 2046: at most 70 chars)."""
    base = _BOUNDARY_UNSAFE.sub("_", f"{queue_id}/{notice_id}")[:60] or "notice"
    candidate, n = base, 0
    while any(candidate.encode("ascii") in part for part in parts):
        n += 1
        candidate = f"{base}.{n}"
    return candidate


def notice_recipient(recipient: str, myhostname: str) -> str:
    """A notice recipient without a domain is one of this host's (Postfix's post_mail has cleanup qualify it with
    myorigin; myhostname here, as the double bounce's): qmgr's notices and smtpd's transcripts."""
    return recipient if "@" in recipient else f"{recipient}@{myhostname}"


def line_wrap(text: str, width: int, indent: int) -> list[str]:
    """Postfix's line_wrap: break before a word that would pass `width` columns (never inside a word), trailing
    blanks stripped; lines after the first indented by `indent` (and `width` less that)."""
    out: list[str] = []
    start, limit, pad = 0, width, 0
    pos = 0
    while True:
        space = _next_blank(text, pos)
        if pos > start and space - start > limit:
            out.append(" " * pad + text[start:pos].rstrip(" \t"))
            while pos < len(text) and text[pos] in " \t":
                pos += 1
            if not out[1:]:
                pad, limit = indent, width - indent
            start = pos
        if space >= len(text):
            break
        pos = space + 1
    out.append(" " * pad + text[start:].rstrip(" \t"))
    return out


_BLANK = re.compile(r"[ \t]")


def _next_blank(text: str, pos: int) -> int:
    """Where the next space or tab at or after `pos` is, else len(text) (one search: a find for each would scan
    to the end of a long text at every word)."""
    match = _BLANK.search(text, pos)
    return match.start() if match else len(text)

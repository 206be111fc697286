"""One catalogue of the SMTP replies mailflow says, each with its enhanced status code (RFC 3463).

Texts are generic and meant for clients: they name the address and the rule, never a config detail.
Every reply smtpd sends is built here; tests compare against these values. `error_reply(error)` is the one
table from an error (mailflow.errors, a store or spool fault) to its reply. `split_leading_dsn(text)`: the
enhanced code an action's text (access table, policy answer, header check) starts with, as Postfix's dsn_split
(mailflow.syntax's, a leaf's: the DNS lists' replies use it too).
`soft_bounced(reply)`: a reply as soft_bounce makes it (5xx -> 4xx, 5.X.X -> 4.X.X), applied where smtpd writes.
`ehlo_lines(host, keywords)`: EHLO's multi-line reply, a line each (smtpd's, sendmail -bs's, postscreen's).
"""
from __future__ import annotations

import errno
import re
import sqlite3
from dataclasses import field, replace
from typing import Callable, Iterable

from mailflow.address import internal_form
from mailflow.errors import ContentRejected, DeliveryError, LookupRetry, MessageTooBig, Overloaded, PermanentError
from mailflow.logs import printable
from mailflow.records import record
from mailflow.syntax import ENHANCED_STATUS, ascii_digits
from mailflow.syntax import split_leading_dsn as split_leading_dsn  # (its callers' name for mailflow.syntax's)


@record
class Reply:
    code: int
    status: str
    text: str
    preceding: tuple[str, ...] = ()  # a multi-line reply's lines before the last, after their "ddd-" (a milter's)
    # the server's own failure, not a policy's verdict: a table that could not answer, a configuration error
    # (Postfix's reject_dict_retry, reject_server_error); warn_if_reject never makes one a warning
    server_fault: bool = field(default=False, compare=False, repr=False)
    # the class smtpd files this refusal under for notify_classes, set where the refusal is made as Postfix's
    # smtpd_check_reject(state, MAIL_ERROR_x, ...) and smtpd.c's error_mask do: policy (a restriction's, the
    # default), protocol, bounce, data, resource, software; None for a refusal Postfix files under none (a failed
    # AUTH, the recipient limit, the server's own 421s). Meaningless for a 2xx/3xx
    error_class: str | None = field(default="policy", compare=False, repr=False)

    def __str__(self) -> str:
        last = f"{self.code} {self.status} {self.text}" if self.status else f"{self.code} {self.text}"
        if not self.preceding:
            return last
        return "".join(f"{self.code}-{line}\r\n" for line in self.preceding) + last

    @property
    def is_ok(self) -> bool:
        return 200 <= self.code < 400


SENDER_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")


def queued(queue_id: str, octets: int | None = None) -> Reply:
    """A message queued; `octets`: the size of a message given by BDAT, which Postfix's reply names."""
    if octets is not None:
        return Reply(250, "2.0.0", f"Ok: {octets} bytes queued as {queue_id}")
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def naming_internal_form(reply: Reply, address: str) -> Reply:
    """`reply` with the address it starts with (`<address>: ...`, as the refusals of an address name it, in
    Postfix's quoting) named in Postfix's internal form (`<"a.b c"@x.test>` is `<a.b c@x.test>`), as Postfix's
    smtpd names the address its extract_addr made in every MAIL, RCPT and VRFY refusal of its own (restrictions,
    policy service; never a milter's reply, whose text Postfix passes on unchanged); the log's from=/to= keep the
    quoting. Any other reply is left as it is."""
    internal = internal_form(address) if '"' in address else address
    if internal == address or not reply.text.startswith(f"<{address}>"):
        return reply
    return replace(reply, text=f"<{internal}>{reply.text[len(address) + 2:]}")


def relay_denied(address: str, code: int = 554) -> Reply:
    """reject_unauth_destination (`code`: relay_domains_reject_code; the enhanced code takes its class)."""
    return Reply(code, f"{code // 100}.7.1", f"<{address}>: Relay access denied")


def relay_domains_denied(address: str, code: int = 554) -> Reply:
    """Postfix 3.7's check_relay_domains: as relay_denied, the subject named as the other recipient refusals
    name theirs (`<a@b>: Recipient address rejected: Relay access denied`)."""
    return Reply(code, f"{code // 100}.7.1", f"<{address}>: Recipient address rejected: Relay access denied")


def relay_deferred(address: str, relay_code: int = 554) -> Reply:
    """defer_unauth_destination (Postfix's default relay restriction): relay_domains_reject_code less 100, 454 by
    default; a relay code of 4xx leaves no refusal code, which Postfix's smtpd_check_reject answers with its
    generic 450 4.7.1 Service unavailable."""
    code = relay_code - 100
    if code < 400:
        return Reply(450, "4.7.1", "Service unavailable")
    return Reply(code, f"{code // 100}.7.1", f"<{address}>: Relay access denied")


def user_unknown(address: str, table: str = "local recipient table", what: str = "Recipient address",
                 code: int = 550) -> Reply:
    """`table`: which list lacks the user ("virtual mailbox table", "relay recipient table", ...); `what`
    "Sender address": reject_unlisted_sender's refusal (Postfix: X.1.0); `code`: the class's
    unknown_*_reject_code (smtpd), the enhanced code's class following it (450 4.1.1), as Postfix's."""
    detail = "1.0" if what == "Sender address" else "1.1"
    return Reply(code, f"{code // 100}.{detail}", f"<{address}>: {what} rejected: User unknown in {table}",
                 error_class="bounce")


def bad_address_syntax(address: str) -> Reply:
    return Reply(501, "5.1.3", f"<{address}>: Bad recipient address syntax", error_class="protocol")


def bad_sender_syntax(address: str) -> Reply:
    return Reply(501, "5.1.7", f"<{address}>: Bad sender address syntax", error_class="protocol")


# A MAIL or RCPT path that cannot be parsed (Postfix's words: no address is named, it is not one).
SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax", error_class="protocol")
RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax", error_class="protocol")
BAD_SIZE_SYNTAX = Reply(501, "5.5.4", "Bad message size syntax", error_class="protocol")
SIZE_EXCEEDS_LIMIT = Reply(552, "5.3.4", "Message size exceeds fixed limit")
SIZE_OVERFLOW = Reply(552, "5.3.4", "Message size exceeds file system imposed limit")  # past OFF_T_MAX
# an AUTH= after one naming a sender
MULTIPLE_AUTH = Reply(503, "5.5.4", "Error: multiple AUTH= options", error_class="protocol")


def unsupported_option(word: str) -> Reply:
    """A MAIL or RCPT parameter mailflow does not know (Postfix: 555 5.5.4 Unsupported option)."""
    return Reply(555, "5.5.4", f"Unsupported option: {printable(word[:100])}", error_class="protocol")


def lookup_failed(address: str) -> Reply:
    return Reply(451, "4.3.0", f"<{address}>: Temporary lookup failure", server_fault=True, error_class="data")


# Postfix's words
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address", error_class=None)
INTERNAL_ERROR = Reply(451, "4.3.0", "Error: internal error, try again later", error_class="software")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients", error_class=None)
QUEUE_FULL = Reply(451, "4.3.1", "Error: queue file write error, try again later", error_class="resource")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage", error_class="resource")
QUEUE_ERROR = Reply(451, "4.3.0", "Error: queue file write error", error_class="resource")
TEMPORARY_LOOKUP_FAILURE = Reply(451, "4.3.0", "Temporary lookup failure", server_fault=True, error_class="data")


# ---- errors as replies: the one table from an error raised while a message or an address is accepted (by
# cleanup, the store, the spool, a table or DNS lookup) to what the client is told. The first row whose class
# matches answers. A DeliveryError brings its own enhanced code and client text (its `reason`, for the log, is
# never shown); the row gives the SMTP code. Postfix keeps the same table in cleanup_strerror.c.

def _disk_full(error: BaseException) -> bool:
    """ENOSPC from a file, SQLITE_FULL from the database: the queue's file system is full."""
    return getattr(error, "errno", None) == errno.ENOSPC or getattr(error, "sqlite_errorname", "") == "SQLITE_FULL"


def _lookup_failed(error: BaseException, address: str) -> Reply:
    return lookup_failed(address) if address else TEMPORARY_LOOKUP_FAILURE


def _delivery_error(code: int, error_class: str = "policy") -> Callable[[BaseException, str], Reply]:
    def reply(error: BaseException, address: str) -> Reply:
        assert isinstance(error, DeliveryError)
        return Reply(code, error.dsn, error.text, error_class=error_class)
    return reply


def _store_fault(error: BaseException, address: str) -> Reply:
    return QUEUE_FULL if _disk_full(error) else QUEUE_ERROR


ERROR_REPLIES: tuple[tuple[type[BaseException], Callable[[BaseException, str], Reply]], ...] = (
    (Overloaded, lambda error, address: QUEUE_FULL),  # the store's write backlog is full: retry soon
    (ContentRejected, _delivery_error(550)),  # header_checks / body_checks REJECT (Postfix: 550 5.7.1)
    (LookupRetry, _lookup_failed),  # a table or DNS cannot answer now; its text may name a table: not shown
    (MessageTooBig, _delivery_error(552, "bounce")),  # a size limit (X.3.4)
    (PermanentError, _delivery_error(554, "bounce")),  # refused for good: a mail loop (5.4.0), ...
    (DeliveryError, _delivery_error(451)),  # refused for now: an alias expansion error (4.6.0), ...
    (OSError, _store_fault),  # the spool or the queue's files: 4.3.1 when the disk is full
    (sqlite3.Error, _store_fault),  # the queue database: locked, I/O error, full
    (BaseException, lambda error, address: QUEUE_ERROR),  # anything else: not queued, try again
)


def error_reply(error: BaseException, address: str = "") -> Reply:
    """The reply to a message (or, with `address`, to the MAIL or RCPT naming it) that `error` stopped."""
    for kind, reply in ERROR_REPLIES:
        if isinstance(error, kind):
            return reply(error, address)
    raise AssertionError("the last row matches every error")


# ---- restrictions (smtpd restriction lists; Postfix SMTPD_ACCESS_README wording and codes)
# `name` is what the rule looked at (<addr>, <host[ip]>, <helo>, <DATA>), `what` its class ("Recipient address",
# "Sender address", "Client host", "Helo command", "Data command", "End-of-data").

def restriction_rejected(code: int, dsn: str, name: str, what: str, text: str, error_class: str = "policy") -> Reply:
    """`554 5.7.1 <name>: What rejected: text`: a reject/defer action, a table or policy answer (`name` and `text`
    made printable, a space for a control as Postfix's smtpd_check_reject: a reply line cannot be split or garbled
    by what a client chose, such as its certificate's name, or by what a policy server answered, a CR or a NUL; the
    enhanced code takes the code's class, as there: a code setting of 4xx makes `REJECT 5.1.2` 4.1.2); filed under
    `error_class` (Reply.error_class)."""
    return Reply(code, f"{code // 100}{dsn[1:]}", printable(f"<{name}>: {what} rejected: {text}", " "),
                 error_class=error_class)


def access_denied(name: str, what: str, text: str = "", dsn: str = "5.7.1", code: int = 554) -> Reply:
    """`reject` (`code`: reject_code) or an access table's REJECT (access_map_reject_code); 554 both by default."""
    return restriction_rejected(code, dsn, name, what, text or "Access denied")


def client_access_denied(client: str) -> Reply:
    """Every command but QUIT of a client the client list refused at connect (delay_reject false; Postfix's
    words, RFC 5321 section 3.1)."""
    return Reply(503, "5.7.0", f"Error: access denied for {client}")


def access_deferred(name: str, what: str, text: str = "", dsn: str = "4.7.1", code: int = 450) -> Reply:
    """An access table's (or policy server's) DEFER (`code`: access_map_defer_code; Postfix's text without one)."""
    return restriction_rejected(code, dsn, name, what, text or "Access denied")


def conditional_deferral(name: str, what: str, text: str = "", dsn: str = "4.7.1", code: int = 450) -> Reply:
    """DEFER_IF_PERMIT / DEFER_IF_REJECT: the deferral that replaces the command's verdict (Postfix's text; `code`
    access_map_defer_code for an access table's or policy server's action, 450 for the others)."""
    return restriction_rejected(code, dsn, name, what, text or "Service unavailable")


def requested_deferral(name: str, what: str, item: str) -> Reply:
    """The defer_if_permit / defer_if_reject restrictions' deferral (Postfix: 450 4.7.0, whatever defer_code)."""
    return conditional_deferral(name, what, f"{item} requested", "4.7.0")


def rule_deferred(name: str, what: str, code: int = 450) -> Reply:
    """The `defer` restriction (`code`: defer_code; Postfix's 4.3.2)."""
    return restriction_rejected(code, "4.3.2", name, what, "Try again later")


def restriction_table_failure(name: str, what: str) -> Reply:
    """An access table that cannot answer: Postfix's check_access gives check_table_result the value `451 4.3.5
    Server configuration error`, a policy's verdict like any table value (warn_if_reject makes it a warning)."""
    return restriction_rejected(451, "4.3.5", name, what, "Server configuration error")


def restriction_config_error(name: str, what: str) -> Reply:
    """An action mailflow does not know (an access value naming a table or an undefined class, lists nested too
    deep): the client retries later; the server's fault (Postfix's reject_server_error), never a warning."""
    return replace(restriction_table_failure(name, what), server_fault=True, error_class="software")


def non_fqdn_address(address: str, what: str, code: int = 504) -> Reply:
    """reject_non_fqdn_sender / _recipient (`code`: non_fqdn_reject_code)."""
    return restriction_rejected(code, "5.5.2", address, what, "need fully-qualified address")


def non_fqdn_helo(name: str, code: int = 504) -> Reply:
    """reject_non_fqdn_helo_hostname (`code`: non_fqdn_reject_code)."""
    return restriction_rejected(code, "5.5.2", name, "Helo command", "need fully-qualified hostname")


def invalid_helo(name: str, code: int = 501) -> Reply:
    """reject_invalid_helo_hostname (`code`: invalid_hostname_reject_code)."""
    return restriction_rejected(code, "5.5.2", name, "Helo command", "Invalid name")


def invalid_helo_address(name: str, code: int = 501) -> Reply:
    """A HELO of digits, dots and colons (permit_naked_ip_address) or an address literal
    (reject_unknown_helo_hostname) that is no IP address (Postfix's reject_invalid_hostaddr; `code`:
    invalid_hostname_reject_code)."""
    return restriction_rejected(code, "5.5.2", name, "Helo command", "invalid ip address")


def unauth_pipelining(name: str, what: str) -> Reply:
    """reject_unauth_pipelining: the session broke RFC 2920's rules (Postfix's SMTPD_FLAG_ILL_PIPELINING)."""
    return restriction_rejected(503, "5.5.0", name, what, "Improper use of SMTP command pipelining")


def multi_recipient_bounce(name: str, what: str, code: int = 550) -> Reply:
    """reject_multi_recipient_bounce: the null sender with more than one recipient (`code`: Postfix's
    multi_recipient_bounce_reject_code, 550; the enhanced code takes its class, X.5.3, as Postfix's reply does)."""
    return restriction_rejected(code, f"{code // 100}.5.3", name, what, "Multi-recipient bounce")


def encryption_required(code: int) -> Reply:
    """reject_plaintext_session (`code`: plaintext_reject_code; the enhanced code takes its class, as Postfix's)."""
    return Reply(code, f"{code // 100}.7.1", "Session encryption is required")


MALFORMED_DNS_REPLY = "Malformed DNS server reply"  # Postfix's smtpd words for a reply naming no host (DNS_INVAL)


def unknown_helo_hostname(name: str, code: int, why: str = "Host not found") -> Reply:
    """reject_unknown_helo_hostname: no A, AAAA or MX record for the HELO name (`code`: unknown_hostname_reject_code;
    450 when the DNS cannot tell now; `why` MALFORMED_DNS_REPLY for a reply naming no host). Postfix's 4.7.1, in
    the code's class."""
    return restriction_rejected(code, f"{code // 100}.7.1", name, "Helo command", why)


def domain_not_found(address: str, code: int, why: str = "Domain not found") -> Reply:
    """reject_unknown_recipient_domain: no MX and no address (`code`: smtpd.unknown_address_reject_code; 450 when
    the DNS cannot tell now, as Postfix's reject_unknown_mailhost: 4.1.2 in either case; `why`
    MALFORMED_DNS_REPLY for a reply naming no host)."""
    return restriction_rejected(code, f"{code // 100}.1.2", address, "Recipient address", why)


def null_mx(address: str, domain: str) -> Reply:
    """The recipient domain publishes a null MX (RFC 7505)."""
    return restriction_rejected(556, "5.1.10", address, "Recipient address",
                                f"Domain {domain} does not accept mail (nullMX)")


def sender_null_mx(address: str, domain: str) -> Reply:
    """reject_unknown_sender_domain: the sender's domain publishes a null MX (RFC 7505: it sends no mail either;
    Postfix's reject_unknown_mailhost, whatever address records it has)."""
    return restriction_rejected(550, "5.7.27", address, "Sender address",
                                f"Domain {domain} does not accept mail (nullMX)")


RBL_REPLY_ERROR = Reply(450, "4.7.1", "Service unavailable")  # a DNS list's reply that is none (Postfix)


def rbl_listed(code: int, dsn: str, text: str) -> Reply:
    """reject_rbl_client and reject_rhsbl_*: the reply default_rbl_reply or an rbl_reply_maps template made
    (mailflow.rbl_reply; `554 5.7.1 Service unavailable; Client host [ip] blocked using list.example; reason` by
    default), the enhanced code in the reply code's class. Not cut: Postfix 3.7 sends a 500-character TXT reason
    whole, past RFC 5321's 512 octets for a reply line."""
    return Reply(code, f"{code // 100}{dsn[1:]}", text)


def unknown_client(client_ip: str, code: int, reverse_only: bool = False) -> Reply:
    """reject_unknown_client_hostname / reject_unknown_reverse_client_hostname (unknown_client_reject_code; 450
    when the DNS cannot tell now): the address has no name, or (not `reverse_only`) that name does not lead back to
    the address. Postfix's enhanced codes: 4.7.25 (RFC 7372: reverse DNS validation failed), the reverse name's
    4.7.1, in the code's class."""
    what = "reverse hostname" if reverse_only else "hostname"
    dsn = f"{code // 100}.7.1" if reverse_only else f"{code // 100}.7.25"
    return Reply(code, dsn, f"Client host rejected: cannot find your {what}, [{client_ip}]")


def sender_domain_not_found(address: str, code: int, why: str = "Domain not found") -> Reply:
    """reject_unknown_sender_domain: no MX and no address (`code`: unknown_address_reject_code; `why` as for a
    recipient)."""
    return restriction_rejected(code, f"{code // 100}.1.8", address, "Sender address", why)


def greylisted(address: str) -> Reply:
    """check_greylist: a triplet seen for the first time, or retried too early."""
    return restriction_rejected(450, "4.2.0", address, "Recipient address", "Greylisted, try again later")


def unverified_address(address: str, what: str, code: int, dsn: str, text: str) -> Reply:
    """reject_unverified_recipient/_sender: the probe deferred, is under way, or (with a 4xx reject code) bounced;
    `text` the probe's (Postfix keeps 250 characters of it)."""
    return restriction_rejected(code, dsn, address, what, f"unverified address: {text[:250]}")


def undeliverable_address(address: str, what: str, code: int, dsn: str, text: str) -> Reply:
    """reject_unverified_recipient/_sender with a 5xx reject code: the probe bounced."""
    return restriction_rejected(code, dsn, address, what, f"undeliverable address: {text}")


def spf_failed(sender: str, client_ip: str) -> Reply:
    """reject_spf_fail: the sender's domain does not authorise the client (RFC 7372: 5.7.23)."""
    return restriction_rejected(550, "5.7.23", sender, "Sender address",
                                f"SPF validation failed for client [{client_ip}]")


def dmarc_rejected(domain: str) -> Reply:
    """reject_dmarc_policy: DMARC failed and the From domain asks for rejection (p=reject)."""
    return Reply(550, "5.7.1", f"Message rejected per DMARC policy of {domain}")


def dmarc_deferred(domain: str) -> Reply:
    """reject_dmarc_policy: the From domain asks for rejection or quarantine, no aligned SPF or DKIM check passed
    and one could not be completed (DMARC temperror: RFC 7489 6.6.2 lets the receiver defer)."""
    return Reply(450, "4.7.1", f"Message deferred per DMARC policy of {domain}: authentication could not be "
                               f"completed, try again later")


# ---- content filters (header/body checks, milters, spamd, clamd; docs/filtering.md)
CONTENT_REJECTED = Reply(550, "5.7.1", "message content rejected")  # header/body checks REJECT (Postfix's cleanup)
FILTER_UNAVAILABLE = Reply(451, "4.7.1", "Service unavailable - try again later")
MILTER_REJECTED = Reply(550, "5.7.1", "Command rejected")
MILTER_SHUTDOWN = Reply(421, "4.7.0", "Server closing connection")  # a milter's SMFIR_SHUTDOWN (Postfix's smtpd)
MILTER_UNAVAILABLE = Reply(550, "5.5.0", "Service unavailable")  # milter_default_action = reject (Postfix's milter8)
# STARTTLS and AUTH while a milter's 4xx holds for the session (Postfix, after Sendmail: any 4xx becomes this one)
MILTER_TRY_AGAIN = Reply(454, "4.3.0", "Try again later")


def milter_connect_refused(host: str, code: int) -> Reply:
    """In the greeting's place when a milter refused the connect event (Postfix's smtpd_proto: its own words,
    whatever the milter said, which is logged): a 421 (the session ends) or any 5xx (554; the session goes on, and
    the milter's reply answers every MAIL). No enhanced code: a greeting."""
    if code == 421:
        return Reply(421, "", f"{host} Service unavailable - try again later")
    return Reply(554, "", f"{host} ESMTP not accepting connections")
# a milter whose own reply (SMFIR_REPLYCODE) is malformed: closed, as Postfix's milter8 does for a configuration error
MILTER_CONFIGURATION_PROBLEM = Reply(451, "4.3.5", "Server configuration problem - try again later",
                                     error_class="software")
# Postfix's configuration errors that make mail wait: in smtpd a restriction that may not permit did
# (check_*_{mx,ns,a}_access answering OK; its reject_server_error); a non_smtpd_milter that refused a recipient of
# mail that came by sendmail
SERVER_CONFIGURATION_ERROR = Reply(451, "4.3.5", "Server configuration error", server_fault=True,
                                   error_class="software")
SPAM_REJECTED = Reply(550, "5.7.1", "Message rejected as spam")


def virus_found(name: str) -> Reply:
    """`name`: clamd's, as its scanner keeps it (scanners.VIRUS_NAME_LIMIT printable ASCII characters)."""
    return Reply(554, "5.7.1", f"Message rejected: virus found ({name})")


def milter_reply(text: str, soft_bounce: bool = False) -> Reply | None:
    """A milter's SMFIR_REPLYCODE text (`550 5.7.1 Go away`; a multi-line one's lines joined by CRLF) as a reply;
    None when it is malformed as Postfix's milter8 judges it (a code that is not 4xx/5xx, no space or `-` after
    it, an enhanced code of another class than the code), or lines that do not share the code and end with one
    final line. As in Postfix, `%%` is `%` and another `%` is dropped (sendmail takes the text as a format).
    A missing enhanced code becomes X.7.1 (RFC 2034: every reply carries one; Postfix sends the line as is).
    `soft_bounce`: each line, once found well-formed, softened as milter8 does (`soft_bounced`)."""
    lines = re.sub(r"%(.?)", r"\1", text, flags=re.DOTALL).split("\r\n")
    code = lines[-1][:3]
    if len(code) != 3 or not ascii_digits(code) or code[0] not in "45":
        return None
    parts = []
    for n, line in enumerate(lines):
        final = n == len(lines) - 1
        if line[:3] != code or line[3:4] != (" " if final else "-"):
            return None
        rest = line[4:].strip()
        if ascii_digits(rest[:1]) and rest[0] != code[0]:
            return None
        if soft_bounce:
            line = _soft_bounced_line(line)
            rest = line[4:].strip()
        reply_code = int(line[:3])  # (the final line's is the reply's: softened too)
        first, _, after = rest.partition(" ")
        if first.count(".") == 2 and ascii_digits(first.replace(".", "")):
            parts.append((first, printable(after.strip() or "Command rejected")))
        else:
            parts.append((f"{line[0]}.7.1", printable(rest or "Command rejected")))
    (enhanced, last) = parts.pop()
    return Reply(reply_code, enhanced, last, tuple(f"{e} {t}" for e, t in parts))


# Enhanced codes for replies whose text the SMTP library writes itself, keyed by the basic code.
# smtpd adds these so that every reply carries one (ENHANCEDSTATUSCODES, RFC 2034).
DEFAULT_ENHANCED = {
    211: "2.0.0", 214: "2.0.0", 220: "2.0.0", 221: "2.0.0", 235: "2.7.0", 250: "2.0.0", 252: "2.5.0",
    421: "4.4.2", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4", 530: "5.7.0", 534: "5.7.9",
    535: "5.7.8", 538: "5.7.11", 550: "5.0.0", 551: "5.1.6", 552: "5.3.4", 553: "5.1.3", 554: "5.0.0",
    555: "5.5.4",
}


# a line the slow test below would leave as it is: three digits, a blank or '-', then `[245]d*.d*.d*` and a blank or
# the end (ASCII digits only; anything else takes the slow test)
_HAS_ENHANCED_CODE = re.compile(r"[0-9]{3}[ -][245][0-9]*\.[0-9]*\.[0-9]*(?= |\Z)")


def with_enhanced_code(line: str) -> str:
    """Give a library-written reply line (`503 Error: …`) its enhanced status code if it lacks one; aiosmtpd's
    `250 OK` (NOOP, RSET) is written as Postfix writes it."""
    if line == "250 OK":
        return str(OK)
    if _HAS_ENHANCED_CODE.match(line) is not None:  # (most lines: the catalogue's replies, as handlers return them)
        return line
    if len(line) < 4 or not ascii_digits(line[:3]) or line[3] not in " -":
        return line
    code, sep, rest = line[:3], line[3], line[4:]
    first = rest.split(" ", 1)[0]
    if first.count(".") == 2 and first[0] in "245" and ascii_digits(first.replace(".", "")):
        return line
    enhanced = DEFAULT_ENHANCED.get(int(code))
    if enhanced is None:
        return line
    return f"{code}{sep}{enhanced} {rest}"


_DSN_AT_START = re.compile(rf"{ENHANCED_STATUS}(?= |$)")  # (a blank, not any space: as the line is written)


def with_footer(reply: str, continues: bool, lines: list[str]) -> str:
    """A 4xx/5xx reply (its lines joined by CRLF) with a footer under it, as Postfix's smtp_reply_footer (smtpd's
    reject_footer: mailflow.reply_footer makes `lines`): each line a copy of the last line's code and enhanced
    status code (when it has one) before its text, the reply's lines before it continuation lines; `continues`:
    the first line goes at the end of the reply's last line instead."""
    if not lines:
        return reply
    head, _, last = reply.rpartition("\r\n")
    code = last[:3]
    dsn = _DSN_AT_START.match(last, 4)
    prefix = f"{dsn[0]} " if dsn else ""
    out = [last]
    if continues:
        out[0] += lines[0]
        lines = lines[1:]
    for i, text in enumerate(lines):
        out.append(f"{code}{'-' if i < len(lines) - 1 else ' '}{prefix}{text}")
    if len(out) > 1:
        out[0] = f"{code}-{out[0][4:]}"
    return "\r\n".join(([head] if head else []) + out)


def soft_bounced(reply: str) -> str:
    """A reply as smtpd sends it under soft_bounce (Postfix smtpd_chat_reply): each line that starts with a 5
    starts with a 4 instead, and so does its enhanced status code when it has one (`550 5.1.1 ...` ->
    `450 4.1.1 ...`); the rest as it was."""
    return "\r\n".join(_soft_bounced_line(line) for line in reply.split("\r\n"))


def _soft_bounced_line(line: str) -> str:
    if line[:1] != "5":
        return line
    line = "4" + line[1:]
    return line[:4] + "4" + line[5:] if line[4:5] == "5" else line


def dsn_class(dsn: str) -> int:
    """2, 4 or 5: the class digit of an enhanced status code."""
    return int(dsn[0]) if ascii_digits(dsn[:1]) else 4


# --- the SMTP protocol layer (smtpd session, wire reader, DSN and BDAT parameters) ---------------------------
# Texts follow Postfix's smtpd where Postfix has the refusal. `host` is myhostname.

# postscreen's (src/postscreen): beyond its screening places; a test's refusal, 521 (drop) or 550 (enforce: every RCPT)
SCREENING_PORTS_BUSY = Reply(421, "4.3.2", "All screening ports are busy")
SCREENING_TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Error: too many connections")  # one client's, at once


def postscreen_unavailable(host: str) -> Reply:
    """The dummy engine's generic 421 (a command count or length limit), without an enhanced code as Postfix's."""
    return Reply(421, "", f"{host} Service unavailable - try again later")


def postscreen_protocol_error(code: int) -> Reply:
    """A pregreet, a pipelined command or a bare newline (and a non-SMTP command under enforce)."""
    return Reply(code, "5.5.1", "Protocol error")


POSTSCREEN_NON_SMTP_DROP = Reply(521, "5.7.0", "Error: I can break rules, too. Goodbye.")
# the dummy engine's answer to every RCPT of a client no test failed: passing, it is to come back later
POSTSCREEN_COME_BACK = Reply(450, "4.3.2", "Service currently unavailable")
# the rest of the dummy engine's replies, in postscreen_smtpd.c's words (those without an enhanced code, as there,
# are functions); those in smtpd's words too are smtpd's (OK, BYE, NEED_HELO, NESTED_MAIL, NEED_MAIL, NEED_RCPT,
# NO_VALID_RECIPIENTS, NOT_IMPLEMENTED, VRFY_DISABLED, SENDER_OK, hello_syntax)
POSTSCREEN_NOT_RECOGNIZED = Reply(502, "5.5.2", "Error: command not recognized")
POSTSCREEN_STARTTLS_SYNTAX = Reply(501, "5.5.4", "Syntax: STARTTLS")
POSTSCREEN_MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
POSTSCREEN_RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
POSTSCREEN_DATA_SYNTAX = Reply(501, "5.5.4", "Syntax: DATA")
POSTSCREEN_BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT count [LAST]")
POSTSCREEN_VRFY_SYNTAX = Reply(501, "5.5.4", "Syntax: VRFY address")
POSTSCREEN_BDAT_NEED_MAIL = Reply(554, "5.5.1", "Error: need MAIL command")


def postscreen_etrn_syntax() -> Reply:
    return Reply(500, "", "Syntax: ETRN domain")


def postscreen_etrn_refused() -> Reply:
    return Reply(458, "", "Unable to queue messages")


def postscreen_denylisted(code: int) -> Reply:
    return Reply(code, "5.3.2", "Service currently unavailable")


def postscreen_dnsbl(code: int, client_ip: str, site: str) -> Reply:
    return Reply(code, "5.7.1", f"Service unavailable; client [{client_ip}] blocked using {site}")


def greeting(host: str, banner: str) -> Reply:
    """`220 host banner`: the greeting (also after XCLIENT), without an enhanced code (RFC 2034)."""
    return Reply(220, "", f"{host} {banner}")


def helo_accepted(host: str) -> Reply:
    """HELO's `250 host` (sendmail -bs's, postscreen's dummy engine's; smtpd's is aiosmtpd's own), no enhanced code."""
    return Reply(250, "", host)


def ehlo_lines(host: str, keywords: Iterable[str]) -> list[str]:
    """EHLO's reply, a line each, as smtpd, sendmail -bs and postscreen's dummy engine give it: `250-host`, a
    `250-KEYWORD` each, the last `250 ` (no enhanced code: no HELO/EHLO reply has one)."""
    lines = [host, *keywords]
    return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]


def hello_syntax(verb: str) -> Reply:
    """HELO/EHLO without a name: like every HELO/EHLO reply, without an enhanced code (Postfix)."""
    return Reply(501, "", f"Syntax: {verb} hostname", error_class="protocol")


def bare_newline(host: str, char: str = "LF") -> Reply:
    """A line ended by a bare LF, or holding a bare CR (Postfix smtpd_forbid_bare_newline = reject); the
    session is closed after it."""
    return Reply(521, "5.5.2", f"{host} Error: {bare_received(char)}", error_class="protocol")


def bare_received(char: str) -> str:
    """What a refusal of a bare line end says, in the reply and in its reject line (Postfix's words)."""
    return f"bare <{char}> received"


def shutting_down(host: str) -> Reply:
    """The server stops (SIGTERM): said to a session between transactions, which is then closed."""
    return Reply(421, "4.3.2", f"{host} Service shutting down, closing transmission channel", error_class=None)


def session_too_long(host: str) -> Reply:
    """session_time_limit reached; the session is closed after it."""
    return Reply(421, "4.4.2", f"{host} Error: session time limit exceeded", error_class=None)


def too_many_errors(host: str) -> Reply:
    """smtpd_hard_error_limit reached; the session is closed after it."""
    return Reply(421, "4.7.0", f"{host} Error: too many errors", error_class="protocol")


def proxy_failed(host: str) -> Reply:
    """In place of the greeting when a PROXY header is missing, malformed or late (Postfix's answer when its
    upstream proxy handshake fails); the connection is closed after it. No class, as Postfix's smtpd.c sends it
    without one: any client that reaches the listener could otherwise have a notice sent for each connection."""
    return Reply(421, "4.3.0", f"{host} Server local error", error_class=None)


def local_data_error(host: str) -> Reply:
    """A table smtpd needs could not answer (Postfix's SMTP_ERR_DATA: the EHLO keywords to discard); the session
    ends."""
    return Reply(421, "4.3.0", f"{host} Server local data error", error_class="data")


def session_timeout(host: str) -> Reply:
    return Reply(421, "4.4.2", f"{host} Error: timeout exceeded", error_class=None)


LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long", error_class="protocol")
# Input sent before the greeting (answered in its place) or pipelined where RFC 2920 forbids it
# (smtpd_forbid_unauth_pipelining); the session is closed after it. Postfix 3.7.11's words: no host name.
PROTOCOL_SYNC = Reply(554, "5.5.0", "Error: SMTP protocol synchronization", error_class=None)
BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax", error_class="protocol")
BAD_UTF8 = Reply(500, "5.5.2", "Error: bad UTF-8 syntax", error_class="protocol")
# 500, as Postfix (RFC 5321: unrecognized)
NOT_RECOGNIZED = Reply(500, "5.5.2", "Error: command not recognized", error_class="protocol")
# a line that is not SMTP at all (smtpd_forbid_cmds, a header as a command): the connection is closed after it
NON_SMTP_COMMAND = Reply(221, "2.7.0", "Error: I can break rules, too. Goodbye.")
# a command this listener knows but does not offer (STARTTLS without a certificate: Postfix's words)
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented", error_class="protocol")
NUL_IN_COMMAND = Reply(500, "5.5.2", "Error: NUL character in command", error_class="protocol")
NUL_IN_DATA = Reply(554, "5.6.0", "Error: NUL character in message content", error_class="protocol")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message file too big", error_class="bounce")
CHUNK_TOO_BIG = Reply(552, "5.3.4", "Chunk exceeds message size limit")  # a BDAT chunk, refused before it is read
VRFY_DISABLED = Reply(502, "5.5.1", "VRFY command is disabled")
# (Postfix's, with smtputf8_enable)
VRFY_SYNTAX = Reply(501, "5.5.4", "Syntax: VRFY address [SMTPUTF8]", error_class="protocol")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
BDAT_MIXED = Reply(503, "5.5.1", "Error: DATA after BDAT", error_class="protocol")  # (Postfix's words)
# a BDAT refused outside a transaction
MAIL_AFTER_BDAT = Reply(503, "5.5.1", "Error: MAIL after BDAT", error_class="protocol")
# then the session closes: its chunk cannot be skipped
BDAT_SYNTAX = Reply(521, "5.5.4", "Syntax: BDAT count [LAST]", error_class="protocol")
# BDAT where CHUNKING is discarded (discard_ehlo_keywords): its chunk would be read as commands, so the session closes
BDAT_NOT_IMPLEMENTED = Reply(521, "5.5.1", "Error: command not implemented", error_class="protocol")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command", error_class="protocol")
# DATA or BDAT after MAIL when no recipient was accepted (Postfix: NEED_RCPT only outside a transaction)
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients", error_class="protocol")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command", error_class="protocol")
# the message's content has begun
RCPT_AFTER_BDAT = Reply(503, "5.5.1", "Error: RCPT after BDAT", error_class="protocol")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command", error_class="protocol")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
OK = Reply(250, "2.0.0", "Ok")
BYE = Reply(221, "2.0.0", "Bye")
STARTTLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first", error_class=None)
TLS_ALREADY_ACTIVE = Reply(554, "5.5.1", "Error: TLS already active", error_class="protocol")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")  # Postfix's words (aiosmtpd: the same, no code)
TRANSACTION_IN_PROGRESS = Reply(503, "5.5.1", "Error: MAIL transaction in progress", error_class="protocol")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted", error_class=None)
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Can't decode base64", error_class=None)
AUTH_RESPONSE_TOO_LONG = Reply(500, "5.5.6", "SASL response limit exceeded", error_class=None)
# ETRN (RFC 1985), in Postfix's words, with enhanced codes (Postfix's have none: deliberate, docs/security.md)
ETRN_SYNTAX = Reply(500, "5.5.4", "Syntax: ETRN domain", error_class="protocol")
ETRN_BAD_SITE = Reply(501, "5.5.4", "Error: invalid parameter syntax", error_class="protocol")
ETRN_STARTED = Reply(250, "2.0.0", "Queuing started")
ETRN_FAILED = Reply(458, "4.3.0", "Unable to queue messages", error_class=None)  # (Postfix: no error_mask)


def vrfy_answer(argument: str) -> Reply:
    """VRFY of an address the checks let by: Postfix's 252 (RFC 5321 3.5.3: not verified, delivery will be tried),
    naming the argument as the client wrote it."""
    return Reply(252, "2.0.0", argument)


def etrn_refused(site: str) -> Reply:
    """ETRN for a site whose mail this server does not hold for it (not in relay_domains): RFC 1985's 459."""
    return Reply(459, "4.3.0", f"<{site}>: service unavailable")


def syntax(usage: str) -> Reply:
    """A command with a malformed argument: `usage` is how it is written ("MAIL FROM:<address>")."""
    return Reply(501, "5.5.4", f"Syntax: {usage}", error_class="protocol")


def no_recipients(in_transaction: bool) -> Reply:
    """DATA or BDAT without an accepted recipient, in Postfix's words: inside a transaction none was valid."""
    return NO_VALID_RECIPIENTS if in_transaction else NEED_RCPT


def bdat_chunk(size: int) -> Reply:
    """A BDAT chunk that is not the last, in Postfix's words."""
    return Reply(250, "2.0.0", f"Ok: {size} bytes")


# BDAT 0 without LAST (RFC 3030 allows a zero-size chunk only as the last); the transaction has failed: its later
# chunks are read and discarded, each answered so, until its last one ends it (Postfix's replies)
NULL_BDAT = Reply(551, "5.7.1", "Null BDAT request")


def bdat_discarded(size: int) -> Reply:
    return Reply(551, "5.0.0", f"Discarded {size} bytes after earlier error")


# A malformed or repeated RFC 3461 parameter, in Postfix's words (its MAIL replies say no "Error:", its RCPT ones do)
BAD_RET = Reply(501, "5.5.4", "Bad RET parameter syntax", error_class="protocol")
BAD_ENVID = Reply(501, "5.5.4", "Bad ENVID parameter syntax", error_class="protocol")
BAD_NOTIFY = Reply(501, "5.5.4", "Error: Bad NOTIFY parameter syntax", error_class="protocol")
BAD_ORCPT = Reply(501, "5.5.4", "Error: Bad ORCPT parameter syntax", error_class="protocol")
# RET, ENVID, NOTIFY, ORCPT where DSN is discarded
DSN_DISABLED = Reply(501, "5.7.1", "DSN support is disabled", error_class="protocol")


# ---- front door (listeners, TLS, AUTH, connection limits)
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Error: authentication failed", error_class=None)
AUTH_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure", error_class=None)
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled", error_class="protocol")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated", error_class="protocol")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
NEED_EHLO = Reply(503, "5.5.1", "Error: send EHLO first", error_class="protocol")
SERVER_BUSY = Reply(421, "4.3.2", "Error: too many sessions, try again later")


def too_many_connections(host: str, ip: str) -> Reply:
    """In place of the greeting past a per-client connection count or rate limit (Postfix's one text for both)."""
    return Reply(421, "4.7.0", f"{host} Error: too many connections from {ip}")


# what a client did too often (anvil.EVENT_LIMITS), in Postfix's words
EVENT_RATE_TEXTS = {"mail": "too much mail", "rcpt": "too many recipients", "auth": "too many AUTH commands"}


def event_rate_exceeded(event: str, ip: str) -> Reply:
    """Past a per-client event rate limit: the command (MAIL, RCPT, VRFY, AUTH) refused, the session goes on (Postfix's
    reply)."""
    return Reply(450, "4.7.1", f"Error: {EVENT_RATE_TEXTS[event]} from {ip}")


def too_many_new_tls_sessions(host: str, client: str) -> Reply:
    """Over the TLS just made, past the client's new TLS session rate: the session ends (Postfix names the client
    `host[ip]` here)."""
    return Reply(421, "4.7.0", f"{host} Error: too many new TLS sessions from {client}")


def starttls_refused(client: str) -> Reply:
    """STARTTLS from a client already past its new TLS session rate: no handshake, the session goes on."""
    return Reply(454, "4.7.0", f"Error: too many new TLS sessions from {client}")


def sender_login_mismatch(sender: str, login: str | None) -> Reply:
    """reject_sender_login_mismatch (Postfix: 553 5.7.1 … not owned by user …)."""
    who = f"not owned by user {login}" if login else "not logged in"
    return Reply(553, "5.7.1", f"<{sender}>: Sender address rejected: {who}")


# ---- trusted front ends (XCLIENT, Postfix XCLIENT_README)
XCLIENT_DENIED = Reply(550, "5.7.0", "Error: insufficient authorization")
XCLIENT_SYNTAX = Reply(501, "5.5.4", "Syntax: XCLIENT attribute=value...", error_class="protocol")
XCLIENT_IN_TRANSACTION = TRANSACTION_IN_PROGRESS
# no "=", or nothing after it
XCLIENT_VALUE_EXPECTED = Reply(501, "5.5.4", "Error: attribute=value expected", error_class="protocol")
# more than 255 octets as sent
XCLIENT_VALUE_TOO_LONG = Reply(501, "5.5.4", "Error: attribute value too long", error_class="protocol")


def xclient_bad_name(name: str) -> Reply:
    """An attribute XCLIENT does not know, named as the client wrote it (Postfix's xclient_cmd)."""
    return Reply(501, "5.5.4", f"Bad XCLIENT attribute name: {name}", error_class="protocol")


def xclient_bad_syntax(attribute: str, value: str) -> Reply:
    """A value the syntax of `attribute` (NAME, ADDR, PORT, PROTO, HELO) refuses, in Postfix's words."""
    return Reply(501, "5.5.4", f"Bad {attribute} syntax: {value}", error_class="protocol")

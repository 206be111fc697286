"""mailflow.status: the reply catalogue and `with_enhanced_code` for replies the SMTP library writes itself."""
from __future__ import annotations

import errno
import re
import sqlite3

import pytest

from mailflow import status
from mailflow.errors import LookupRetry, MessageTooBig, Overloaded, PermanentError, TemporaryError
from mailflow.status import DEFAULT_ENHANCED, Reply, dsn_class, with_enhanced_code


@pytest.mark.parametrize("line, expected", [
    ("503 Error: need RCPT command", "503 5.5.1 Error: need RCPT command"),
    ("500 Error: bad syntax", "500 5.5.2 Error: bad syntax"),
    ("501 Syntax: DATA", "501 5.5.4 Syntax: DATA"),
    ("502 Error: command \"VRFY\" not implemented", "502 5.5.1 Error: command \"VRFY\" not implemented"),
    ("552 Error: Too much mail data", "552 5.3.4 Error: Too much mail data"),
    ("221 Bye", "221 2.0.0 Bye"),
    ("250 OK", "250 2.0.0 Ok"),  # (NOOP, RSET: Postfix's words)
    ("250 OK queued", "250 2.0.0 OK queued"),
    ("252 Cannot VRFY user", "252 2.5.0 Cannot VRFY user"),
    ("421 Service unavailable", "421 4.4.2 Service unavailable"),
    ("535 Authentication credentials invalid", "535 5.7.8 Authentication credentials invalid"),
    ("554 Transaction failed", "554 5.0.0 Transaction failed"),
    ("214-Help line one", "214-2.0.0 Help line one"),  # a continuation line gets one too (RFC 2034)
    ("214 last help line", "214 2.0.0 last help line"),
    ("250 1.2.3 not an enhanced code", "250 2.0.0 1.2.3 not an enhanced code"),
    ("250 2.0 short", "250 2.0.0 2.0 short"),
])
def test_adds_the_enhanced_code(line, expected):
    assert with_enhanced_code(line) == expected


@pytest.mark.parametrize("line", [
    "250 2.1.5 Ok",
    "550 5.1.1 <x@y>: Recipient address rejected",
    "451 4.3.0 Error: queue file write error",
    "250-2.0.0 continuation already coded",
    "421 4.4.2 already",
    "354 End data with <CR><LF>.<CR><LF>",  # 3xx carries no enhanced code
    "334 VXNlcm5hbWU6",
    "599 unknown code stays as it is",
    "25",
    "",
    "abc def",
    "2500 not a reply",
    "250:odd separator",
])
def test_leaves_alone(line):
    assert with_enhanced_code(line) == line


def test_is_idempotent_for_every_known_code():
    for code in DEFAULT_ENHANCED:
        once = with_enhanced_code(f"{code} text")
        assert with_enhanced_code(once) == once
        assert once == f"{code} {DEFAULT_ENHANCED[code]} text"


def test_default_enhanced_codes_match_their_reply_class():
    for code, enhanced in DEFAULT_ENHANCED.items():
        assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", enhanced), enhanced
        assert dsn_class(enhanced) == code // 100, (code, enhanced)


def catalogue() -> list[Reply]:
    replies = [v for v in vars(status).values() if isinstance(v, Reply)]
    replies += [status.queued("ABC123"), status.relay_denied("a@b"), status.user_unknown("a@b"),
                status.bad_address_syntax("a b"), status.bad_sender_syntax("a b"), status.lookup_failed("a@b")]
    return replies


def test_catalogue_helper_sees_the_fixed_replies():
    assert {status.SENDER_OK, status.RCPT_OK, status.QUEUE_FULL, status.TOO_MANY_RECIPIENTS} <= set(catalogue())


@pytest.mark.parametrize("reply", catalogue(), ids=str)
def test_every_catalogue_reply_code_class_matches_its_enhanced_code(reply):
    if reply.code // 100 == 3:
        assert reply.status == ""
        return
    assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", reply.status)
    assert dsn_class(reply.status) == reply.code // 100
    assert reply.is_ok == (reply.code < 400)
    assert str(reply) == f"{reply.code} {reply.status} {reply.text}"
    assert with_enhanced_code(str(reply)) == str(reply)


def test_queued_reply_names_the_queue_id():
    assert str(status.queued("4F2A9C01B2")) == "250 2.0.0 Ok: queued as 4F2A9C01B2"


def test_refusals_name_the_address():
    assert str(status.relay_denied("x@remote.test")) == "554 5.7.1 <x@remote.test>: Relay access denied"
    assert str(status.user_unknown("x@example.test")).startswith("550 5.1.1 <x@example.test>:")


@pytest.mark.parametrize("dsn, klass", [("2.0.0", 2), ("4.3.0", 4), ("5.1.1", 5), ("", 4), ("x.1.1", 4)])
def test_dsn_class(dsn, klass):
    assert dsn_class(dsn) == klass


def test_reply_without_enhanced_code_prints_one_space():
    assert str(Reply(354, "", "End data with <CR><LF>.<CR><LF>")) == "354 End data with <CR><LF>.<CR><LF>"


def test_220_after_the_greeting_gets_a_code():
    # RFC 2034 3 exempts only the greeting and HELO/EHLO replies, which smtpd never passes through here
    assert with_enhanced_code("220 Ready to start TLS") == "220 2.0.0 Ready to start TLS"
    assert with_enhanced_code("220-first") == "220-2.0.0 first"


# ---------------------------------------------------------------------------------------------- errors as replies


def _full_database() -> sqlite3.Error:
    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorname = "SQLITE_FULL"
    return error


@pytest.mark.parametrize("error, reply", [
    (Overloaded(), status.QUEUE_FULL),
    (LookupRetry("table texthash:/etc/mailflow/canonical: cannot read"), status.TEMPORARY_LOOKUP_FAILURE),
    (MessageTooBig("5.3.4", "Error: message header size exceeds limit", "over header_size_limit"),
     Reply(552, "5.3.4", "Error: message header size exceeds limit")),
    (PermanentError("5.4.0", "Error: too many hops", "51 Received headers"),
     Reply(554, "5.4.0", "Error: too many hops")),
    (TemporaryError("4.6.0", "Alias expansion error", "<a@b>: loop"), Reply(451, "4.6.0", "Alias expansion error")),
    (OSError(errno.ENOSPC, "No space left on device"), status.QUEUE_FULL),
    (OSError(errno.EIO, "Input/output error"), status.QUEUE_ERROR),
    (_full_database(), status.QUEUE_FULL),
    (sqlite3.OperationalError("database is locked"), status.QUEUE_ERROR),
    (ValueError("a bug"), status.QUEUE_ERROR),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v))
def test_error_reply_is_one_table_from_an_error_to_what_the_client_is_told(error, reply):
    assert status.error_reply(error) == reply


def test_error_reply_never_shows_the_reason_and_names_the_address_it_is_about():
    error = TemporaryError("4.6.0", "Alias expansion error", "<a@b.test>: loop through /etc/aliases")
    assert "/etc/aliases" not in str(status.error_reply(error))
    timed_out = LookupRetry("table sqlite:/etc/x.cf: timeout")
    assert status.error_reply(timed_out, "a@b.test") == status.lookup_failed("a@b.test")


@pytest.mark.parametrize("sent, soft", [
    ("550 5.1.1 <a@b.test>: Recipient address rejected: User unknown", "450 4.1.1 <a@b.test>: Recipient address "
                                                                       "rejected: User unknown"),
    ("554 5.7.1 <x@y.test>: Relay access denied", "454 4.7.1 <x@y.test>: Relay access denied"),
    ("500 Error: bad syntax", "400 Error: bad syntax"),  # no enhanced code: the reply code alone
    ("550-5.7.1 first\r\n550 5.7.1 last", "450-4.7.1 first\r\n450 4.7.1 last"),  # every line of a multi-line one
    ("452 4.3.1 Insufficient system storage", "452 4.3.1 Insufficient system storage"),
    ("250 2.0.0 Ok: queued as 5.5", "250 2.0.0 Ok: queued as 5.5"),
])
def test_soft_bounce_makes_each_5xx_line_a_4xx_one_as_postfix_smtpd_chat_reply(sent, soft):
    assert status.soft_bounced(sent) == soft


@pytest.mark.parametrize("text, soft", [
    ("550 5.7.1 go away", "450 4.7.1 go away"),
    ("550 %5.7.1 go away", "450 4.7.1 go away"),  # (`%` dropped first, then softened: one parse)
    ("550 go away", "450 4.7.1 go away"),
    ("550-5.7.1 one\r\n550 5.7.1 two", "450-4.7.1 one\r\n450 4.7.1 two"),
    ("451 4.3.0 later", "451 4.3.0 later"),
])
def test_a_milters_reply_under_soft_bounce_is_softened_once_found_well_formed(text, soft):
    assert str(status.milter_reply(text, soft_bounce=True)) == soft
    assert status.milter_reply("550 4.7.1 mixed", soft_bounce=True) is None


def test_a_refusal_cannot_be_split_into_lines_by_the_name_it_quotes():
    """Defence in depth: the name comes from the client (a certificate's CommonName, a HELO name); a space for
    each control, as Postfix's smtpd_check_reject makes its reply printable."""
    reply = status.restriction_rejected(554, "5.7.1", "evil>\r\n250 2.1.5 Ok\r\n<x", "Client certificate", "no")
    assert str(reply) == "554 5.7.1 <evil>  250 2.1.5 Ok  <x>: Client certificate rejected: no"


def test_a_configuration_error_cannot_be_split_into_lines_by_the_name_it_quotes():
    """The server's own failure names what the client chose too (a certificate's CommonName, U+0085 and U+2028
    included): made printable as every refusal, and still the server's fault."""
    reply = status.restriction_config_error("evil\r\n250 ok\u0085\u2028x", "Client certificate")
    assert str(reply) == "451 4.3.5 <evil  250 ok  x>: Client certificate rejected: Server configuration error"
    assert reply.server_fault


@pytest.mark.parametrize("text", ["4\u00b2\u00b2 4.7.1 go away", "\u0665\u0665\u0660 5.7.1 go away"])
def test_a_milters_reply_code_of_other_digits_than_ascii_is_malformed_not_a_crash(text):
    """`4²²` passes str.isdigit and int() refuses it; `٥٥٠` int() reads as 550: both are no reply code to Postfix's
    milter8 (ISDIGIT is ASCII's), so the reply is malformed (None), as a code that is not 4xx/5xx is."""
    assert status.milter_reply(text) is None


def test_a_reply_line_with_other_digits_than_ascii_gets_no_enhanced_code_of_them():
    assert status.with_enhanced_code("550 5.\u0661.1 no") == "550 5.0.0 5.\u0661.1 no"

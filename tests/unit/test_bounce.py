"""bounce (mailflow.stages.bounce): NOTIFY semantics, and notices parsed back with the stdlib email package."""
from __future__ import annotations

import email
import email.policy
import re
import sys
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailflow.model import Recipient
from mailflow.stages.bounce import NoticeRecipient, _fold, build_notice, notice_is_8bit, wants_notice
from mailflow.message import rfc5322_date

NOW = 1_700_000_000.0
ARRIVAL = NOW - 5 * 86400
MTA = "mx.example.test"
ORIGINAL = (b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\nSubject: lunch\r\n"
            b"Message-ID: <m1@example.test>\r\n\r\nSee you at noon.\r\n\r\n-- \r\nAlice\r\n")
REMOTE_REPLY = "host mx.remote.test[192.0.2.1] said: 550 5.1.1 no such user (in reply to RCPT TO command)"
LOCAL_REASON = "delivery temporarily suspended: connect to mx.other.test[192.0.2.9]:25: Connection refused"

BOB = Recipient(0, "bob@remote.test", "bob@remote.test", orcpt="rfc822;Bob@Remote.TEST")
CAROL = Recipient(1, "carol@other.test", "carol@other.test")


def refused(recipient=BOB, diagnostic=REMOTE_REPLY):
    return NoticeRecipient(recipient, "failed", "5.1.1", diagnostic, remote_mta="mx.remote.test",
                           last_attempt=NOW - 60)


def expired(recipient=CAROL, diagnostic=LOCAL_REASON):
    return NoticeRecipient(recipient, "failed", "4.4.1", diagnostic)


def notice(recipients=None, **overrides) -> bytes:
    if recipients is None:
        recipients = [refused(), expired()]
    args = dict(kind="failure", queue_id="18BD2A1C3F0A1B2", sender="alice@example.test", arrival=ARRIVAL,
                envid="", ret="", recipients=recipients, original=ORIGINAL, reporting_mta=MTA, now=NOW,
                notice_id="18BD2A1C3F0A1B2.failure.1700000000")
    args.update(overrides)
    return build_notice(**args)


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def parts(raw: bytes):
    message = parse(raw)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    found = list(message.iter_parts())
    assert len(found) == 3
    return found


def status_groups(raw: bytes) -> list:
    """The delivery-status part as the stdlib sees it: per-message fields, then one group per recipient."""
    report = parts(raw)[1]
    assert report.get_content_type() == "message/delivery-status"
    return report.get_payload()


def raw_status_groups(raw: bytes) -> list[dict[str, str]]:
    """Part 2's field groups read from the bytes (also for message/global-delivery-status, which the stdlib
    parses as one message): unfolded `name -> value` per group."""
    boundary = parse(raw).get_boundary().encode()
    body = raw.split(b"\r\n--" + boundary)[2].split(b"\r\n\r\n", 1)[1].decode("utf-8")
    groups = []
    for block in body.split("\r\n\r\n"):
        fields = {}
        for line in re.sub(r"\r\n[ \t]", " ", block).split("\r\n"):
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
        groups.append(fields)
    return groups


# ---------------------------------------------------------------------------------------------- wants_notice


@pytest.mark.parametrize("notify, failure, delay, success", [
    ("", True, True, False),
    ("NEVER", False, False, False),
    ("never", False, False, False),
    ("SUCCESS", False, False, True),
    ("FAILURE", True, False, False),
    ("DELAY", False, True, False),
    ("FAILURE,DELAY", True, True, False),
    ("success,failure", True, False, True),
    ("Success, Delay", False, True, True),
    ("SUCCESS,FAILURE,DELAY", True, True, True),
])
def test_wants_notice_follows_notify(notify, failure, delay, success):
    r = Recipient(0, "a@b.test", "a@b.test", notify=notify)
    assert (wants_notice(r, "failure"), wants_notice(r, "delay"), wants_notice(r, "success")) == (
        failure, delay, success)


def test_wants_notice_refuses_an_unknown_kind():
    with pytest.raises(ValueError):
        wants_notice(BOB, "bounce")


# ---------------------------------------------------------------------------------------------- the headers


def test_failure_notice_headers():
    message = parse(notice())
    assert message["From"] == f"Mail Delivery System <MAILER-DAEMON@{MTA}>"
    assert message["To"] == "alice@example.test"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Date"] == rfc5322_date(NOW)
    assert message["Message-ID"] == f"<18BD2A1C3F0A1B2.failure.1700000000@{MTA}>"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"


def test_notice_uses_crlf_line_ends_only():
    raw = notice()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")


def test_notice_can_be_addressed_elsewhere_for_a_double_bounce():
    message = parse(notice(sender="", to="postmaster"))
    assert message["To"] == "postmaster"


@pytest.mark.parametrize("kind, subject", [
    ("delay", "Delayed Mail (still being retried)"),
    ("success", "Successful Mail Delivery Report"),
])
def test_subject_per_kind(kind, subject):
    assert parse(notice(kind=kind))["Subject"] == subject


# ---------------------------------------------------------------------------------------------- the parts


def test_human_part_names_each_recipient_with_its_diagnostic():
    text = parts(notice())[0]
    assert text.get_content_type() == "text/plain"
    content = " ".join(text.get_content().split())
    assert f"This is the mail system at host {MTA}." in content
    assert "could not be delivered" in content
    assert f"<bob@remote.test>: {REMOTE_REPLY}" in content
    assert f"<carol@other.test>: {LOCAL_REASON}" in content


def test_two_recipient_failure_report():
    per_message, bob, carol = status_groups(notice())
    assert per_message["Reporting-MTA"] == f"dns; {MTA}"
    assert per_message["X-Mailflow-Queue-ID"] == "18BD2A1C3F0A1B2"
    assert per_message["Arrival-Date"] == rfc5322_date(ARRIVAL)

    assert bob["Final-Recipient"] == "rfc822; bob@remote.test"
    assert bob["Original-Recipient"] == "rfc822;Bob@Remote.TEST"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.remote.test"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert bob["Last-Attempt-Date"] == rfc5322_date(NOW - 60)

    assert carol["Final-Recipient"] == "rfc822; carol@other.test"
    assert carol["Original-Recipient"] == "rfc822; carol@other.test"  # the same address: Postfix names it too
    assert carol["Action"] == "failed"
    assert carol["Status"] == "4.4.1"
    assert "Remote-MTA" not in carol
    assert carol["Diagnostic-Code"] == f"X-Mailflow; {LOCAL_REASON}"
    assert "Last-Attempt-Date" not in carol
    assert "Will-Retry-Until" not in carol


def test_reply_that_is_not_from_a_remote_is_our_own_diagnostic():
    """A local reason stays X-Mailflow even when a remote was talked to (e.g. it lacks SMTPUTF8), and then names
    no Remote-MTA: the remote said nothing of it (Postfix's notice has none either)."""
    reason = "SMTPUTF8 is required, but was not offered by host mx.remote.test[192.0.2.1]"
    nr = NoticeRecipient(BOB, "failed", "5.6.7", reason, remote_mta="mx.remote.test")
    _, bob = status_groups(notice([nr]))
    assert bob["Diagnostic-Code"] == f"X-Mailflow; {reason}"
    assert "Remote-MTA" not in bob


@pytest.mark.parametrize("diagnostic", [
    "TLS is required, but host mx.remote.test[192.0.2.1] refused to start TLS: 502 5.5.1 not now",
    "SASL authentication failed; server mx.remote.test[192.0.2.1] said: 502 5.5.1 not now",
    "Protocol error: host mx.remote.test[192.0.2.1] said: 502 5.5.1 not now (in reply to DATA command)",
])
def test_the_smtp_clients_other_wordings_of_a_remote_reply_type_it_smtp(diagnostic):
    _, bob = status_groups(notice([NoticeRecipient(BOB, "failed", "5.5.1", diagnostic, remote_mta="mx.remote.test")]))
    assert (bob["Diagnostic-Code"], bob["Remote-MTA"]) == ("smtp; 502 5.5.1 not now", "dns; mx.remote.test")


@pytest.mark.parametrize("diagnostic, reply", [
    ("host mx.remote.test[192.0.2.1] said: 600 6.1.1 weird (in reply to RCPT TO command)", "600 6.1.1 weird"),
    ("host mx.remote.test[192.0.2.1] refused to talk to me: 199 hi", "199 hi"),
    ("host mx.remote.test[192.0.2.1] said: oops 550 5.1.1 no (in reply to RCPT TO command)", "oops 550 5.1.1 no"),
])
def test_a_remote_reply_with_an_odd_code_or_garbage_before_it_is_still_the_remotes(diagnostic, reply):
    """Postfix's notice quotes what the peer said, whatever its code and with the lines that were no reply lines
    (its smtp_chat_resp reads past them), and names the peer."""
    _, bob = status_groups(notice([NoticeRecipient(BOB, "failed", "5.5.0", diagnostic, remote_mta="mx.remote.test")]))
    assert (bob["Diagnostic-Code"], bob["Remote-MTA"]) == (f"smtp; {reply}", "dns; mx.remote.test")


def test_an_expired_recipient_is_returned_with_the_remote_reply_it_last_got():
    """As Postfix returns a recipient whose message expired: its last deferral's reply, typed smtp."""
    reason = "message expired: host mx.remote.test[192.0.2.1] said: 451 4.3.0 try again (in reply to RCPT TO command)"
    nr = NoticeRecipient(BOB, "failed", "4.3.0", reason, remote_mta="mx.remote.test")
    _, bob = status_groups(notice([nr]))
    assert bob["Diagnostic-Code"] == "smtp; 451 4.3.0 try again"
    assert bob["Remote-MTA"] == "dns; mx.remote.test"
    text = " ".join(parts(notice([nr]))[0].get_content().split())
    assert f"<bob@remote.test>: {reason.removeprefix('message expired: ')}" in text  # the last reason, as Postfix


def test_reply_code_without_a_remote_is_our_own_diagnostic():
    _, carol = status_groups(notice([expired(diagnostic="550 local policy says no")]))
    assert carol["Diagnostic-Code"] == "X-Mailflow; 550 local policy says no"


def test_success_reply_from_a_remote_is_an_smtp_diagnostic():
    nr = NoticeRecipient(BOB, "relayed", "2.0.0", "250 2.0.0 Ok: queued as 4F1", remote_mta="mx.remote.test")
    _, bob = status_groups(notice([nr], kind="success"))
    assert bob["Action"] == "relayed"
    assert bob["Diagnostic-Code"] == "smtp; 250 2.0.0 Ok: queued as 4F1"


@pytest.mark.parametrize("smtputf8, diagnostic_type, shown", [
    (False, "x-\udcffunix\r\nX-Injected: yes", "x- unix X-Injected: yes"),
    (False, " x-\u00e9unix\t", "x-?unix"),
    (True, " x-\u00e9unix\u2028X-Injected: yes", "x-\u00e9unix X-Injected: yes"),
], ids=["line-break-and-surrogate", "8-bit", "8-bit-smtputf8"])
def test_an_agents_diagnostic_type_is_one_clean_line_like_its_text(smtputf8, diagnostic_type, shown):
    """The type of an agent's own Diagnostic-Code (a command's `x-unix; output`, kept in the queue file) goes
    through the same cleaning as its text: a line break in it started a field of its own in the report, a lone
    surrogate made the notice fail to encode, 8-bit text reached a message/delivery-status part."""
    carol = NoticeRecipient(CAROL, "failed", "5.3.0", "Command died with status 1", relay="local",
                            diagnostic_code=f"{diagnostic_type}; it failed")
    raw = notice([carol], smtputf8=smtputf8)
    [_, group] = raw_status_groups(raw)
    assert group["Diagnostic-Code"] == f"{shown}; it failed"
    assert b"\r\nX-Injected" not in raw


def test_long_diagnostic_is_folded_and_unfolds_to_the_same_text():
    reason = "mailbox full: " + " ".join(f"word{i}" for i in range(60))
    raw = notice([expired(diagnostic=reason)])
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert all(len(line) <= 78 for line in raw.split(b"\r\n") if b"word" in line)
    _, carol = status_groups(raw)
    assert carol["Diagnostic-Code"] == f"X-Mailflow; {reason}"


def test_malformed_status_falls_back_to_the_generic_code_for_the_action():
    _, carol = status_groups(notice([NoticeRecipient(CAROL, "failed", "oops", LOCAL_REASON)]))
    assert carol["Status"] == "5.0.0"


def test_delay_notice_reports_delayed_and_when_retries_end():
    until = ARRIVAL + 5 * 86400 + 3600
    nr = NoticeRecipient(CAROL, "delayed", "4.4.1", LOCAL_REASON, last_attempt=NOW)
    raw = notice([nr], kind="delay", will_retry_until=until, delay_warning_time=4 * 3600 + 59)
    text, _, original = parts(raw)
    _, carol = status_groups(raw)
    assert carol["Action"] == "delayed"
    assert carol["Status"] == "4.4.1"
    assert carol["Will-Retry-Until"] == rfc5322_date(until)
    # Postfix's delay template: its delay_warning_time in whole hours, the lifetime in whole days
    assert ("Your message could not be delivered for more than 4 hour(s).\r\n"
            "It will be retried until it is 5 day(s) old.\r\n") in text.get_content()
    assert original.get_content_type() == "text/rfc822-headers"  # a delay returns headers by default


def test_envid_appears_only_when_given():
    assert "Original-Envelope-Id" not in status_groups(notice())[0]
    assert status_groups(notice(envid="QQ314159"))[0]["Original-Envelope-Id"] == "QQ314159"
    assert list(status_groups(notice(envid="QQ314159"))[0].keys()) == [  # Postfix's order
        "Reporting-MTA", "Original-Envelope-Id", "X-Mailflow-Queue-ID", "X-Mailflow-Sender", "Arrival-Date"]


# ---------------------------------------------------------------------------------------------- the original


def original_part(raw: bytes):
    return parts(raw)[2]


def test_default_returns_the_whole_message():
    part = original_part(notice())
    assert part.get_content_type() == "message/rfc822"
    assert b"\r\n\r\nSee you at noon.\r\n\r\n-- \r\nAlice\r\n\r\n--" in notice()


def test_ret_full_returns_the_original_byte_exact():
    raw = notice(ret="FULL")
    part = original_part(raw)
    assert part.get_content_type() == "message/rfc822"
    inner = part.get_payload()[0]
    assert inner["Subject"] == "lunch"
    assert inner.get_payload() == ORIGINAL.split(b"\r\n\r\n", 1)[1].decode()
    assert ORIGINAL in raw


@pytest.mark.parametrize("kind, action, description", [
    ("delay", "delayed", "Undelivered Message Headers"), ("success", "delivered", "Message Headers")])
def test_delay_and_success_notices_return_the_header_section_even_with_ret_full(kind, action, description):
    """As Postfix's defer and trace services (DSN_RET_HDRS whatever RET says)."""
    raw = notice([NoticeRecipient(CAROL, action, "", "x")], kind=kind, ret="FULL")
    part = original_part(raw)
    assert (part["Content-Description"], part.get_content_type()) == (description, "text/rfc822-headers")
    assert b"See you at noon" not in raw


def test_ret_full_over_the_size_limit_returns_the_header_section_as_postfix_does():
    raw = notice(ret="FULL", size_limit=len(ORIGINAL) - 1)
    assert original_part(raw).get_content_type() == "text/rfc822-headers"
    assert b"See you at noon" not in raw


def test_only_the_size_of_an_original_too_big_to_read_is_needed():
    head = ORIGINAL.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    raw = notice(original=head, original_size=10_000_000)  # what quoted_original reads of a big message
    assert original_part(raw).get_content_type() == "text/rfc822-headers"
    assert head in raw


def test_ret_hdrs_returns_only_the_header_section():
    raw = notice(ret="HDRS")
    part = original_part(raw)
    assert part.get_content_type() == "text/rfc822-headers"
    # the envelope sender first, as Postfix returns it
    head = ORIGINAL.split(b"\r\n\r\n", 1)[0].decode()
    assert part.get_content() == f"Return-Path: <alice@example.test>\r\n{head}\r\n"
    assert b"See you at noon" not in raw


def test_the_returned_message_starts_with_its_envelope_sender_once():
    assert b"Content-Type: message/rfc822\r\n\r\nReturn-Path: <alice@example.test>\r\nFrom: Alice" in notice()
    with_one = b"Return-Path: <other@example.test>\r\n" + ORIGINAL
    assert notice(original=with_one).count(b"Return-Path:") == 1


def test_default_over_the_size_limit_falls_back_to_headers():
    raw = notice(size_limit=len(ORIGINAL) - 1)
    assert original_part(raw).get_content_type() == "text/rfc822-headers"
    assert b"See you at noon" not in raw
    assert original_part(notice(size_limit=len(ORIGINAL))).get_content_type() == "message/rfc822"


def test_eight_bit_original_is_copied_verbatim_and_marks_the_notice_8bit():
    original = "Subject: caf\u00e9\r\n\r\nna\u00efve \u2603\r\n".encode("utf-8") + b"\xff latin junk\r\n"
    raw = notice(original=original)
    assert original in raw
    assert notice_is_8bit(raw)
    assert b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n" in raw
    assert not notice_is_8bit(notice())


def test_boundary_is_deterministic_and_never_in_the_original():
    first = parse(notice()).get_boundary()
    assert first == parse(notice()).get_boundary()
    trap = f"From: x\r\n\r\n--{first}\r\n--{first}--\r\n".encode()
    raw = notice(original=trap)
    boundary = parse(raw).get_boundary()
    assert boundary != first
    assert boundary.encode() not in trap
    assert len(parts(raw)) == 3
    assert trap in raw


# ---------------------------------------------------------------------------------------------- injection


def test_cr_lf_in_a_diagnostic_cannot_add_a_header_or_a_recipient():
    evil = "550 oops\r\nX-Injected: yes\r\n\r\nFinal-Recipient: rfc822; mallory@evil.test\nAction: delivered\r"
    raw = notice([expired(diagnostic=evil)])
    message = parse(raw)
    assert "X-Injected" not in message
    per_message, carol = status_groups(raw)
    assert "X-Injected" not in carol and "X-Injected" not in per_message
    assert carol["Final-Recipient"] == "rfc822; carol@other.test"
    assert carol["Action"] == "failed"
    assert b"\r\nX-Injected" not in raw and b"\r\nFinal-Recipient: rfc822; mallory" not in raw


def test_cr_lf_in_an_address_or_the_sender_cannot_add_a_header():
    evil = Recipient(0, "a@b.test\r\nX-Injected: yes", "a@b.test")
    raw = notice([NoticeRecipient(evil, "failed", "5.1.1", "no")], sender="s@x.test\r\nBcc: victim@x.test")
    assert "Bcc" not in parse(raw)
    assert b"\r\nX-Injected" not in raw and b"\r\nBcc" not in raw
    assert len(status_groups(raw)) == 2



def test_other_control_characters_become_spaces():
    raw = notice([expired(diagnostic="a\x00b\x1bc\x7fd\u2028e\x85f\tg")])
    assert not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\xc2\x85|\xe2\x80\xa8", raw)
    assert status_groups(raw)[1]["Diagnostic-Code"] == "X-Mailflow; a b c d e f g"


def test_a_word_too_long_for_one_line_is_cut():
    raw = notice([expired(diagnostic="x" * 2500)])
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    _, carol = status_groups(raw)
    assert carol["Diagnostic-Code"].replace(" ", "") == "X-Mailflow;" + "x" * 2500


# ---------------------------------------------------------------------------------------------- SMTPUTF8


def test_utf8_address_uses_the_global_types():
    jose = Recipient(0, "jos\u00e9@ejemplo.test", "jos\u00e9@ejemplo.test")
    raw = notice([NoticeRecipient(jose, "failed", "5.1.1", REMOTE_REPLY, remote_mta="mx.remote.test")])
    _, report, original = parts(raw)
    assert report.get_content_type() == "message/global-delivery-status"
    assert original.get_content_type() == "message/global"
    _, group = raw_status_groups(raw)
    assert group["Final-Recipient"] == "utf-8; jos\u00e9@ejemplo.test"
    assert notice_is_8bit(raw)


def test_smtputf8_mail_with_ascii_addresses_uses_the_global_types_too():
    """As Postfix, for mail that asked for SMTPUTF8: its headers may be UTF-8, which message/rfc822 may not hold."""
    original = "Subject: caf\u00e9\r\n\r\nbody\r\n".encode()
    raw = notice([refused()], original=original, smtputf8=True)
    _, report, returned = parts(raw)
    assert (report.get_content_type(), returned.get_content_type()) == (
        "message/global-delivery-status", "message/global")
    assert raw_status_groups(raw)[1]["Final-Recipient"] == "rfc822; bob@remote.test"  # an ASCII address
    assert parts(notice([refused()], original=original))[2].get_content_type() == "message/rfc822"


def test_utf8_address_with_headers_only_uses_message_global_headers():
    jose = Recipient(0, "jos\u00e9@ejemplo.test", "jos\u00e9@ejemplo.test")
    raw = notice([NoticeRecipient(jose, "failed", "5.1.1", "no")], ret="HDRS")
    assert parts(raw)[2].get_content_type() == "message/global-headers"


def test_ascii_notice_with_a_utf8_diagnostic_keeps_the_report_ascii():
    raw = notice([expired(diagnostic="bo\u00eete pleine")])
    report = raw.split(b"Content-Type: message/delivery-status\r\n\r\n")[1].split(b"\r\n--")[0]
    assert report.isascii()
    assert status_groups(raw)[1]["Diagnostic-Code"] == "X-Mailflow; bo?te pleine"
    assert "bo\u00eete pleine" in parts(raw)[0].get_content()


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("overrides", [
    {"kind": "bounce"},
    {"ret": "BODY"},
    {"recipients": []},
])
def test_bad_arguments_are_refused(overrides):
    args = {"recipients": [refused()], **overrides}
    with pytest.raises(ValueError):
        notice(**args)


def test_unknown_action_is_refused():
    with pytest.raises(ValueError):
        notice([NoticeRecipient(BOB, "bounced", "5.0.0", "x")])


# ---------------------------------------------------------------------------------------------- property

any_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)
printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=80)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.tuples(st.one_of(printable, any_text), any_text, st.booleans()), min_size=1, max_size=5),
    sender=printable,
    kind=st.sampled_from(["failure", "delay", "success"]),
)
def test_any_diagnostic_and_address_gives_a_parsable_notice(rows, sender, kind):
    action = {"failure": "failed", "delay": "delayed", "success": "delivered"}[kind]
    recipients = [NoticeRecipient(Recipient(i, address, address), action, "5.1.1", diagnostic,
                                  remote_mta="mx.remote.test" if remote else "", last_attempt=NOW)
                  for i, (address, diagnostic, remote) in enumerate(rows)]
    raw = notice(recipients, kind=kind, sender=sender, will_retry_until=NOW + 3600)
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    message = parse(raw)
    assert set(message.keys()) == {"From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted",
                                   "MIME-Version", "Content-Type", "Content-Transfer-Encoding"}
    text, report, _ = parts(raw)
    groups = raw_status_groups(raw)
    assert len(groups) == len(rows) + 1
    assert [g["Action"] for g in groups[1:]] == [action] * len(rows)
    if report.get_content_type() == "message/delivery-status":
        assert len(report.get_payload()) == len(rows) + 1
    else:
        assert report.get_content_type() == "message/global-delivery-status"
        assert not all(address.isascii() for address, _, _ in rows)


def test_a_success_notice_says_where_each_copy_went_as_postfix_does():
    relayed = NoticeRecipient(BOB, "relayed", "2.0.0", "250 2.0.0 Ok: queued as Q1", remote_mta="mx.remote.test",
                              relay="mx.remote.test[192.0.2.1]:25")
    delivered = NoticeRecipient(CAROL, "delivered", "2.0.0", "delivered to maildir", relay="local")
    text = " ".join(parts(notice([relayed, delivered], kind="success"))[0].get_content().split())  # unwrapped
    assert "<bob@remote.test>: delivery via mx.remote.test[192.0.2.1]:25: 250 2.0.0 Ok: queued as Q1" in text
    assert "<carol@other.test>: delivery via local: delivered to maildir" in text
    failure = parts(notice([refused()]))[0].get_content()
    assert "delivery via" not in failure


def test_a_postmaster_copy_is_laid_out_as_postfixs():
    """A double bounce: Postfix's postmaster copy (its subject, auto-generated, no template text, the whole
    original, which the caller asks for with RET=FULL, the null sender named MAILER-DAEMON@host)."""
    raw = notice([refused()], sender="", to="postmaster@mx.example.test", ret="FULL", postmaster_copy=True)
    message = parse(raw)
    assert (message["Subject"], message["Auto-Submitted"]) == ("Postmaster Copy: Undelivered Mail", "auto-generated")
    text, _, original = parts(raw)
    assert text.get_content().startswith("\r\n<bob@remote.test>: host mx.remote.test")
    assert status_groups(raw)[0]["X-Mailflow-Sender"] == f"rfc822; MAILER-DAEMON@{MTA}"
    assert original.get_content_type() == "message/rfc822"
    assert f"Return-Path: <MAILER-DAEMON@{MTA}>\r\n".encode() + ORIGINAL in raw
    with pytest.raises(ValueError):
        notice([refused()], kind="success", postmaster_copy=True)


def test_a_postmaster_copy_of_a_failure_or_a_delay_notice_returns_the_header_section():
    """notify_classes' bounce and delay copies (Postfix's DSN_RET_HDRS): the original's header section only,
    whatever the sender's RET said; the delay copy with Postfix's subject and no template text."""
    for kind, subject in (("failure", "Postmaster Copy: Undelivered Mail"),
                          ("delay", "Postmaster Warning: Delayed Mail")):
        raw = notice([refused()], kind=kind, ret="HDRS", to="postmaster@mx.example.test", postmaster_copy=True)
        assert parse(raw)["Subject"] == subject
        text, _, original = parts(raw)
        assert original.get_content_type() == "text/rfc822-headers"
        assert text.get_content().startswith("\r\n<bob@remote.test>: ")


def test_a_long_run_of_blanks_in_a_reason_keeps_every_line_under_998_octets():
    """Runs of blanks in a command's output are kept in notices (as Postfix keeps them), but never past a line's
    limit: 1 500 blanks used to make a 1 525-octet line."""
    field = _fold("Diagnostic-Code: x-unix; start" + " " * 1500 + "end of the output")
    assert all(len(line) <= 998 for line in field.split("\r\n")), [len(line) for line in field.split("\r\n")]
    assert field.startswith("Diagnostic-Code: x-unix; start   ") and field.endswith("end of the output")


# ---------------------------------------------------------------------------------------------- cost


def test_a_notice_about_a_thousand_recipients_with_long_replies_costs_a_bounded_number_of_calls_per_recipient():
    """A list message whose recipients a domain all refuses with a long multi-line reply: every reply is made one
    line. A category lookup a character cost ~0.5 ms of CPU per 2 KB reply (10 000 recipients: 9.5 s, the GIL held
    all along); now ~0.1 ms. Counted in calls (a timer would follow the machine's load): ~13 000 a
    recipient before, ~320 now."""
    reply = ("host mx.remote.test[192.0.2.1] said: 550-5.7.1 https://policy.remote.test/" + "why-" * 500
             + " (in reply to RCPT TO command)")
    many = [refused(Recipient(i, f"user{i}@remote.test", f"user{i}@remote.test"), reply) for i in range(1000)]
    calls = 0

    def count(frame, event, arg) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        raw = notice(many)
    finally:
        sys.setprofile(None)
    assert calls < 1000 * len(many), calls
    assert raw.count(b"why-why-why-") > 1000 and b"user999@remote.test" in raw


COMMAND_SAID = 'Command died with status 1: "/usr/local/bin/filter". Command output: ' + "refused by policy " * 40


@pytest.mark.parametrize("reason, diagnostic_code, count", [
    ('unknown user: "u{}"', "", 5_000),  # the status part's fields outweigh the text
    (COMMAND_SAID, "x-unix; refused", 1_000),  # the text part's long paragraphs outweigh the status part
], ids=["status-heavy", "text-heavy"])
def test_a_notice_of_many_recipients_peaks_near_twice_its_size(reason, diagnostic_code, count):
    """The per-recipient parts are made a recipient at a time, as bytes: their fields' strings, then the part's
    text, then its bytes were all held at once, 4.6 times the notice (5 000 recipients, 1.5 MB; 100 000
    recipients' notice is 31 MB), 3.9 times when a command's long output makes the text part the larger. What is
    left is the parts and the notice joined from them (2.0 times; 2.6 while a part's head was added to its joined
    body)."""
    recipients = [NoticeRecipient(Recipient(i, f"u{i}@local.test", "list@local.test", "", "rfc822;list@local.test"),
                                  "failed", "5.1.1", reason.format(i), last_attempt=1e9,
                                  diagnostic_code=diagnostic_code)
                  for i in range(count)]
    tracemalloc.start()
    try:
        notice = build_notice(kind="failure", queue_id="Q", sender="s@example.org", arrival=1e9, envid="", ret="",
                              original=b"Subject: x\r\n\r\nbody\r\n", reporting_mta="mx.test", now=1e9,
                              notice_id="n", recipients=recipients)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert notice.count(b"Final-Recipient: rfc822; u") == count
    assert peak < 2.5 * len(notice), peak / len(notice)

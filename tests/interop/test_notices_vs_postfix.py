"""Differential test of the notices themselves (bounce(8)'s failure, delay and success reports): a private Postfix
and mailflow, configured alike, relay the same messages to the same scripted peer and send their notices to a
capturing peer each; the two notices of each message must agree part by part once each server's own names (host
name, queue id, dates, boundary, X-Postfix-/X-Mailflow- fields) are set aside.

test_smtp_faults_vs_postfix.py compares the per-recipient fields of failure notices over many peer faults; this
file compares the rest of a notice: which part of the original comes back, the human part word for word, the
postmaster copy of a double bounce.
"""
from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import pytest

from tests.interop.test_smtp_faults_vs_postfix import ScriptedPeer
from tests.support import eventually, postfix_instance, script_dir

pytestmark = pytest.mark.interop

SENDER = "alice@sender.test"
PF_HOST, MF_HOST = "pf.test", "mx.mailflow.test"
NOBODY = 65534


DISCARDS = "discard.test=discard:, gone.test=discard:gone-away"  # discard(8), without and with a next hop
QUICK = {"delay_warning_time": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "1s"}  # both alike
LONG_REPLY = b"550 5.7.1 " + b" ".join(b"policy%d" % n for n in range(40)) + b" https://example.test/" + b"x" * 90


def rcpt_reply(address: str) -> bytes:
    """The peer's RCPT replies: b@ refused, bb@ refused at length, d@ deferred, anyone else accepted."""
    replies = {"b": b"550 5.1.1 no such user here", "bb": LONG_REPLY, "d": b"450 4.2.0 mailbox busy, come back later"}
    return replies.get(address.partition("@")[0], b"250 2.1.5 Ok") + b"\r\n"


@dataclass
class Send:
    """One message: its Subject names it (and finds its notices); RCPT options per recipient (a local part at
    peer.test, or a whole address)."""

    subject: str
    rcpts: dict[str, list[str]]
    mail_options: list[str] = field(default_factory=list)
    sender: str = SENDER
    header: str = ""  # one more header line (UTF-8 for SMTPUTF8 mail)


async def send(port: int, message: Send) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10) as client:
        await client.ehlo()
        await client.mail(message.sender, options=message.mail_options)
        for local, options in message.rcpts.items():
            await client.rcpt(local if "@" in local else f"{local}@peer.test", options=options)
        extra = f"{message.header}\r\n" if message.header else ""
        await client.data(f"From: {message.sender or 'x@sender.test'}\r\nTo: a@peer.test\r\n{extra}"
                          f"Subject: {message.subject}\r\n\r\nthe body\r\n".encode())


def by_subject(captured) -> dict[str, list[email.message.EmailMessage]]:
    """The notices received, by the Subject of the message each returns (in its third part)."""
    out: dict[str, list] = {}
    for c in captured:
        subject = re.search(rb"\r\nSubject: (case-[\w-]+)\r\n", c.content)
        notice = email.message_from_bytes(c.content, policy=email.policy.default)
        notice.envelope = (c.mail_from, c.rcpt_tos)
        notice.mail_options, notice.raw = c.mail_options, c.content
        out.setdefault(subject.group(1).decode() if subject else "?", []).append(notice)
    return out


async def settled(pf, mf, settle: float) -> None:
    """Wait until a notice too many would have come: `settle` seconds, or less once both queues are empty. A notice
    still to come is a message in its server's queue, or comes of one there (Postfix's qmgr has the bounce daemon
    queue the notice before it removes the message; mailflow records a notice owed with the message's end), and a
    notice leaves a queue once the capturing peer has taken it. Mail left deferred keeps the whole `settle`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle
    while loop.time() < deadline:
        listing = await asyncio.to_thread(pf.run, "postqueue", "-p")
        if await mf.store.counts() == {} and b"Mail queue is empty" in listing.stdout:
            return
        await asyncio.sleep(0.05)


async def whole_log(pf, files: int) -> str:
    """Postfix's log once it holds the end (`removed`) of each of its queue files, `files` (the messages and their
    notices) at least: postlogd writes the lines in the order they were sent, a moment later, so every line sent
    before the last file's end is in then (for a test whose mail all ends: a deferred message has no end)."""
    def ended() -> str | None:
        log = pf.maillog
        made = len(re.findall(r": message-id=", log))
        return log if made >= files and len(re.findall(r": removed$", log, re.MULTILINE)) >= made else None

    return await eventually(ended, what=f"Postfix logged the end of its {files}+ queue files")


async def notices_of_both(mailflow_server, smtp_peer, script: dict, messages: list[Send], expected: int, *,
                          postfix: dict | None = None, queue: dict | None = None, settle: float = 0.5,
                          postfix_logs: str = "", settings: dict | None = None, routes: str = "",
                          master_cf: str = "", maillog: list[str] | None = None):
    """Both servers relay `messages` to one scripted peer (peer.test) and return their notices to a capturing
    peer each (sender.test): ({subject: [Postfix's notices]}, {subject: [mailflow's]}) once each has `expected`
    (and Postfix's mail log has a line that matches `postfix_logs`). `settings`: more of mailflow's, set as
    `postfix` sets Postfix's; `routes`: more transport_maps entries, to services Postfix's `master_cf` and
    mailflow's `settings` define alike; `maillog` gets Postfix's mail log (`whole_log`: all the mail must end)."""
    peer = await ScriptedPeer(script).start()
    pf_sink, mf_sink = await smtp_peer(enable_SMTPUTF8=True), await smtp_peer(enable_SMTPUTF8=True)
    routes = f"{DISCARDS}, {routes}" if routes else DISCARDS
    try:
        async with postfix_instance({
            "myhostname": PF_HOST, "mydestination": "", "delay_warning_time": "0", **(postfix or {}),
            "transport_maps": (f"inline:{{sender.test=smtp:[127.0.0.1]:{pf_sink.port}, "
                               f"peer.test=smtp:[127.0.0.1]:{peer.port}, {routes}}}"),
        }, master_cf=master_cf) as pf:
            mf = await mailflow_server(
                myhostname=MF_HOST, mynetworks=["127.0.0.0/8"], smtp={"tls_security_level": "none"},
                transport_maps=[(f"inline:{{sender.test=smtp:[127.0.0.1]:{mf_sink.port}, "
                                 f"peer.test=smtp:[127.0.0.1]:{peer.port}, {routes}}}")],
                queue={"queue_run_delay": "300s", "minimal_backoff_time": "300s", "maximal_backoff_time": "300s",
                       **(queue or {})}, **(settings or {}))
            for message in messages:
                await asyncio.gather(send(pf.port, message), send(mf.smtp_addresses[0][1], message))
            await eventually(lambda: len(pf_sink.messages) >= expected, timeout=15,
                             what=f"Postfix sent {expected} notice(s)")
            await eventually(lambda: len(mf_sink.messages) >= expected, timeout=15,
                             what=f"mailflow sent {expected} notice(s)")
            await eventually(lambda: re.search(postfix_logs, pf.maillog, re.MULTILINE), timeout=15,
                             what=f"Postfix logged {postfix_logs!r}")
            await settled(pf, mf, settle)  # (a notice too many would come now)
            if maillog is not None:
                maillog.append(await whole_log(pf, len(messages) + expected))
            return by_subject(pf_sink.messages), by_subject(mf_sink.messages)
    finally:
        await peer.stop()


def returned(notice) -> tuple[str, str, list[str]]:
    """The third part: its description, its type, and the header names it holds (Return-Path first)."""
    part = list(notice.iter_parts())[2]
    if part.get_content_type() in ("message/rfc822", "message/global"):
        inner = part.get_payload()[0]
        names = [name.lower() for name in inner] + (["(body)"] if inner.get_payload() else [])
    else:
        lines = part.get_content().splitlines()
        names = [line.split(":")[0].lower() for line in lines if line and line[0] not in " \t"]
    return part["Content-Description"], part.get_content_type(), names


async def test_success_and_delay_notices_return_the_header_section_even_with_ret_full(mailflow_server, smtp_peer):
    """Postfix's trace (success) and defer (delay) services return the original's headers whatever RET says
    (bounce_trace_service.c, bounce_warn_service.c: DSN_RET_HDRS); only a failure honours RET=FULL."""
    full = ["RET=FULL"]
    messages = [Send("case-success", {"a": ["NOTIFY=SUCCESS"]}, full),
                Send("case-delay", {"d": ["NOTIFY=DELAY"]}, full),
                Send("case-failure", {"b": ["NOTIFY=FAILURE"]}, full)]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {"RCPT": rcpt_reply}, messages, 3,
                                   postfix={**QUICK, "queue_run_delay": "1s"}, queue=QUICK)
    assert {s: [returned(n) for n in ns] for s, ns in mf.items()} == {
        s: [returned(n) for n in ns] for s, ns in pf.items()}
    assert [returned(n)[:2] for n in pf["case-success"]] == [("Message Headers", "text/rfc822-headers")]
    assert [returned(n)[:2] for n in pf["case-delay"]] == [("Undelivered Message Headers", "text/rfc822-headers")]
    assert [returned(n)[:2] for n in pf["case-failure"]] == [("Undelivered Message", "message/rfc822")]


def human_part(notice) -> str:
    """The first part's text, the server's host name set aside."""
    text = next(notice.iter_parts()).get_content().replace("\r\n", "\n")
    return text.replace(PF_HOST, "HOST").replace(MF_HOST, "HOST")


async def test_the_human_part_is_postfixs_word_for_word(mailflow_server, smtp_peer):
    """Postfix's built-in failure, delay and success templates, then `<address>: reason` per recipient wrapped
    at 79 columns with a 4-space indent (line_wrap: a long word is not split), each after a blank line."""
    messages = [Send("case-failure", {"b": [], "bb": [], "a": []}),
                Send("case-delay", {"d": ["NOTIFY=DELAY"]}),
                Send("case-success", {"a": ["NOTIFY=SUCCESS"]})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {"RCPT": rcpt_reply}, messages, 3,
                                   postfix={**QUICK, "queue_run_delay": "1s"}, queue=QUICK)
    assert {s: [human_part(n) for n in ns] for s, ns in mf.items()} == {
        s: [human_part(n) for n in ns] for s, ns in pf.items()}
    [failure], [delay], [success] = pf["case-failure"], pf["case-delay"], pf["case-success"]
    assert "be delivered to one or more recipients. It's attached below." in human_part(failure)
    assert "    https://example.test/" + "x" * 90 + "\n" in human_part(failure)
    assert "for more than 0 hour(s).\nIt will be retried until it is 5 day(s) old." in human_part(delay)
    assert "Your message was successfully delivered to the destination(s)" in human_part(success)


SERVER_OWN = ("Reporting-MTA", "X-Mailflow-Queue-ID", "Arrival-Date", "Will-Retry-Until")  # (dates: each its form)


def report(notice) -> list[list[tuple[str, str]]]:
    """The delivery report's field groups: (name, value as `_compared`) in order; X-Postfix(-) named as
    X-Mailflow(-), the values each server gives itself left out (its host name as HOST), and mailflow's
    Last-Attempt-Date (Postfix has it disabled) dropped."""
    # read from the bytes: the stdlib does not parse message/global-delivery-status
    part = notice.raw.split(b"\r\n--" + notice.get_boundary().encode())[2]
    body = part.split(b"\r\n\r\n", 1)[1].decode("utf-8")
    groups = []
    for block in body.strip("\r\n").split("\r\n\r\n"):
        fields = []
        for line in re.sub(r"\r\n[ \t]+", " ", block).split("\r\n"):
            name, _, value = line.partition(":")
            name = name.replace("X-Postfix-", "X-Mailflow-")
            if name != "Last-Attempt-Date":
                value = "" if name in SERVER_OWN else _compared(name, value).replace("X-Postfix;", "X-Mailflow;")
                fields.append((name, value.replace(PF_HOST, "HOST").replace(MF_HOST, "HOST")))
        groups.append(fields)
    return groups


def _compared(name: str, value: str) -> str:
    """A field's value as the reports compare it: as written, without the blanks at its ends."""
    return value.strip()


async def test_the_delivery_report_has_postfixs_fields_in_postfixs_order(mailflow_server, smtp_peer):
    """bounce_header_dsn: Reporting-MTA, Original-Envelope-Id, X-Postfix-Queue-ID, X-Postfix-Sender, Arrival-Date;
    then per recipient Final-Recipient, Original-Recipient, Action, Status, Remote-MTA, Diagnostic-Code (and
    Will-Retry-Until in a delay notice)."""
    messages = [Send("case-failure", {"b": ["ORCPT=rfc822;B+2Bone@orig.test"], "bb": []}, ["ENVID=env+2B1"]),
                Send("case-delay", {"d": ["NOTIFY=DELAY"]}, ["ENVID=env2"]),
                Send("case-success", {"a": ["NOTIFY=SUCCESS"]})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {"RCPT": rcpt_reply}, messages, 3,
                                   postfix={**QUICK, "queue_run_delay": "1s"}, queue=QUICK)
    assert {s: [report(n) for n in ns] for s, ns in mf.items()} == {s: [report(n) for n in ns] for s, ns in pf.items()}
    [failure] = pf["case-failure"]
    assert [name for name, _ in report(failure)[0]] == [
        "Reporting-MTA", "Original-Envelope-Id", "X-Mailflow-Queue-ID", "X-Mailflow-Sender", "Arrival-Date"]
    assert ("Original-Recipient", "rfc822;B+one@orig.test") in report(failure)[1]


async def test_the_original_recipient_keeps_the_orcpt_type_as_the_client_wrote_it(mailflow_server, smtp_peer):
    """Postfix's smtpd keeps an ORCPT's address type as given, and bounce(8) writes the ORCPT so in
    Original-Recipient (bounce_notify_util.c): `RFC822;B+one@orig.test`; mailflow said `rfc822;...`."""
    messages = [Send("case-failure", {"b": ["ORCPT=RFC822;B+2Bone@orig.test"], "bb": ["ORCPT=Rfc822;bb@orig.test"]})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {"RCPT": rcpt_reply}, messages, 1)
    assert [report(n) for n in mf["case-failure"]] == [report(n) for n in pf["case-failure"]]
    [failure] = pf["case-failure"]
    said = sorted(value for group in report(failure)[1:] for name, value in group if name == "Original-Recipient")
    assert said == ["RFC822;B+one@orig.test", "Rfc822;bb@orig.test"]


async def test_a_double_bounce_is_postfixs_postmaster_copy(mailflow_server, smtp_peer, caplog):
    """A bounce that cannot be returned (its own sender is null) goes to 2bounce_notice_recipient (Postfix: with
    notify_classes = 2bounce) from double-bounce@myhostname: Postfix's postmaster copy, with its own subject,
    Auto-Submitted: auto-generated, no template text, RET=HDRS overridden, the null sender named
    MAILER-DAEMON@myhostname; logged as a "postmaster non-delivery notification"."""
    caplog.set_level("INFO", logger="mailflow")
    messages = [Send("case-double", {"b": []}, ["RET=HDRS"], sender="")]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {"RCPT": rcpt_reply}, messages, 1,
                                   postfix={"notify_classes": "2bounce", "2bounce_notice_recipient": "pm@sender.test"},
                                   queue={"double_bounce_recipient": "pm@sender.test"})

    def shape(notice) -> tuple:
        envelope = (notice.envelope[0].replace(PF_HOST, "HOST").replace(MF_HOST, "HOST"), notice.envelope[1])
        head = {name: notice[name].replace(PF_HOST, "HOST").replace(MF_HOST, "HOST")
                for name in ("From", "Subject", "Auto-Submitted")}
        return_path = re.search(r"^Return-Path: (.*)$", list(notice.iter_parts())[2].as_string(), re.MULTILINE)
        return (envelope, head, human_part(notice), report(notice), returned(notice),
                return_path and return_path.group(1).replace(PF_HOST, "HOST").replace(MF_HOST, "HOST"))

    assert [shape(n) for n in mf["case-double"]] == [shape(n) for n in pf["case-double"]]
    [copy] = pf["case-double"]
    assert copy.envelope == ("double-bounce@pf.test", ["pm@sender.test"])
    assert (copy["Subject"], copy["Auto-Submitted"]) == ("Postmaster Copy: Undelivered Mail", "auto-generated")
    assert ("X-Mailflow-Sender", "rfc822; MAILER-DAEMON@HOST") in report(copy)[0]
    assert re.search(r": postmaster non-delivery notification: \w+$", caplog.text, re.MULTILINE)


async def test_notify_classes_bounce_and_delay_copy_the_notices_to_the_postmaster_as_postfix(mailflow_server,
                                                                                              smtp_peer):
    """notify_classes = bounce, delay: each failure and delay notice to a sender has a postmaster copy, to
    bounce_notice_recipient and delay_notice_recipient, from double-bounce@myhostname, as Postfix's bounce(8)
    (bounce_notify_service.c, bounce_warn_service.c): its subject, no template text, the header section only; a
    failure whose NOTIFY=NEVER gives no notice to the sender and a copy all the same."""
    messages = [Send("case-failure", {"b": []}, ["RET=FULL"]), Send("case-delay", {"d": ["NOTIFY=DELAY"]}),
                Send("case-never", {"b": ["NOTIFY=NEVER"]})]
    to = {"bounce_notice_recipient": "pm@sender.test", "delay_notice_recipient": "pm@sender.test"}
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {"RCPT": rcpt_reply}, messages, 5,
                                   postfix={**QUICK, "queue_run_delay": "1s", "notify_classes": "bounce, delay", **to},
                                   queue={**QUICK, "notify_classes": ["bounce", "delay"], **to})

    def shape(notice) -> tuple:
        named = {name: notice[name].replace(PF_HOST, "HOST").replace(MF_HOST, "HOST")
                 for name in ("From", "To", "Subject", "Auto-Submitted")}
        envelope = (notice.envelope[0].replace(PF_HOST, "HOST").replace(MF_HOST, "HOST"), notice.envelope[1])
        return envelope, named, human_part(notice), report(notice), returned(notice)

    assert {s: sorted(map(shape, ns)) for s, ns in mf.items()} == {s: sorted(map(shape, ns)) for s, ns in pf.items()}
    copies = [n for ns in pf.values() for n in ns if n.envelope[1] == ["pm@sender.test"]]
    assert sorted((n.envelope[0], n["Subject"]) for n in copies) == [
        ("double-bounce@pf.test", "Postmaster Copy: Undelivered Mail"),
        ("double-bounce@pf.test", "Postmaster Copy: Undelivered Mail"),
        ("double-bounce@pf.test", "Postmaster Warning: Delayed Mail")]
    assert [n.envelope[1] for n in pf["case-never"]] == [["pm@sender.test"]]


TEMPLATES = """\
# bounce(5)
failure_template = <<EOF
Charset: us-ascii
From: Bounces <bounces>
Subject: Returned: your mail
Postmaster-Subject: Copy of a returned mail

This is $myhostname of $mydomain, as ${mail_name?told} by bounce(5).
It tried for $maximal_queue_lifetime_days days, and warns after $delay_warning_time_minutes minutes.
EOF
"""


async def test_bounce_template_file_gives_the_notices_texts_as_postfix(mailflow_server, smtp_peer, tmp_path):
    """bounce_template_file's failure_template: its From (the address qualified), Subject, Postmaster-Subject (the
    bounce class's copy) and text with its $names expanded, as Postfix's bounce(8) writes them."""
    path = tmp_path / "bounce.cf"
    path.write_text(TEMPLATES)
    os.chmod(tmp_path, 0o755)
    os.chmod(path, 0o644)
    messages = [Send("case-failure", {"b": []})]
    to = {"bounce_notice_recipient": "pm@sender.test"}
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {"RCPT": rcpt_reply}, messages, 2,
                                   postfix={"bounce_template_file": str(path), "notify_classes": "bounce",
                                            "mydomain": "example.test", "delay_warning_time": "2h", **to},
                                   queue={"bounce_template_file": str(path), "notify_classes": ["bounce"],
                                          "delay_warning_time": "2h", **to},
                                   settings={"mydomain": "example.test"})

    def shape(notice) -> tuple:
        named = {name: notice[name].replace(PF_HOST, "HOST").replace(MF_HOST, "HOST") for name in ("From", "Subject")}
        return notice.envelope[1], named, human_part(notice)

    assert sorted(map(shape, mf["case-failure"])) == sorted(map(shape, pf["case-failure"]))
    [(_, named, text)] = [shape(n) for n in pf["case-failure"] if n.envelope[1] == [SENDER]]
    assert named == {"From": "Bounces <bounces@HOST>", "Subject": "Returned: your mail"}
    assert text.startswith("This is HOST of example.test, as told by bounce(5).\n"
                           "It tried for 5 days, and warns after 120 minutes.\n")


async def test_a_double_bounce_that_bounces_is_discarded_with_postfixs_warning(mailflow_server, smtp_peer, caplog):
    """No triple bounce: bounce(8) logs "warning: ID: undeliverable postmaster notification discarded"."""
    caplog.set_level("INFO", logger="mailflow")
    messages = [Send("case-triple", {"b": []}, sender="")]
    pf, mf = await notices_of_both(
        mailflow_server, smtp_peer, {"RCPT": rcpt_reply}, messages, 0,
        postfix={"notify_classes": "2bounce", "2bounce_notice_recipient": "b@peer.test"},
        queue={"double_bounce_recipient": "b@peer.test"},
        postfix_logs=r"bounce\[\d+\]: warning: \w+: undeliverable postmaster notification discarded$")
    assert pf == mf == {}

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    await eventually(warned)
    assert [w.split(": ", 1)[1] for w in warned()] == ["undeliverable postmaster notification discarded"]
    assert "postmaster non-delivery notification" in caplog.text


async def test_a_message_returned_for_its_age_gives_its_last_reason_as_postfix_does(mailflow_server, smtp_peer):
    """maximal_queue_lifetime = 0: the first deferral returns the message; Postfix's notice gives the recipient's
    last reason as it was, in the human part as in the report."""
    messages = [Send("case-expired", {"d": []})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {"RCPT": rcpt_reply}, messages, 1,
                                   postfix={"maximal_queue_lifetime": "0", "bounce_queue_lifetime": "0"},
                                   queue={"maximal_queue_lifetime": "0s", "bounce_queue_lifetime": "0s"})
    assert [(human_part(n), report(n)) for n in mf["case-expired"]] == [
        (human_part(n), report(n)) for n in pf["case-expired"]]
    assert "\n<d@peer.test>: host 127.0.0.1[127.0.0.1] said: 450 4.2.0 mailbox busy," in human_part(
        pf["case-expired"][0])


async def test_smtputf8_mail_with_ascii_addresses_comes_back_in_the_global_types(mailflow_server, smtp_peer):
    """Postfix reports on mail that asked for SMTPUTF8 with message/global-delivery-status and returns it as
    message/global (RFC 6533: its headers may be UTF-8, which message/rfc822 may not hold), sending the notice
    with SMTPUTF8, even when every address is ASCII."""
    messages = [Send("case-utf8", {"a": []}, ["SMTPUTF8", "BODY=8BITMIME"], header="Comments: caf\u00e9 cr\u00e8me")]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {}, messages, 1, postfix={"smtputf8_enable": "yes"})

    def shape(notice) -> tuple:
        return ("SMTPUTF8" in notice.mail_options, [p.get_content_type() for p in notice.iter_parts()],
                [(name, value) for name, value in report(notice)[1] if name != "Diagnostic-Code"])

    assert [shape(n) for n in mf["case-utf8"]] == [shape(n) for n in pf["case-utf8"]]
    assert shape(pf["case-utf8"][0])[:2] == (True, ["text/plain", "message/global-delivery-status", "message/global"])


async def test_a_discarded_recipients_success_notice_gives_the_next_hop_as_postfixs_discard(mailflow_server, smtp_peer):
    """discard(8) reports each recipient delivered with its next hop as the reason (the domain when the transport
    names none): "<a@discard.test>: discard.test", "Diagnostic-Code: X-Postfix; discard.test"."""
    messages = [Send("case-discard", {"a@discard.test": ["NOTIFY=SUCCESS"], "b@gone.test": ["NOTIFY=SUCCESS"]})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {}, messages, 1)

    def in_recipient_order(notice) -> tuple:
        """Postfix lists the recipients in the order its two discard(8) processes finished (under load, b may come
        first); mailflow in envelope order: the recipients' paragraphs and report groups are compared sorted."""
        head, *paragraphs = human_part(notice).split("\n\n<")
        first, *groups = report(notice)
        return head, sorted(paragraph.strip() for paragraph in paragraphs), first, sorted(groups)

    assert [in_recipient_order(n) for n in mf["case-discard"]] == [in_recipient_order(n) for n in pf["case-discard"]]
    assert "\n<a@discard.test>: discard.test\n\n<b@gone.test>: gone-away\n" in human_part(mf["case-discard"][0])


async def test_a_notice_names_the_recipient_as_the_client_wrote_it_as_postfixs_does(mailflow_server, smtp_peer):
    """The original recipient is the RCPT address as written: Original-Recipient gives it as it is, the human part
    ("expanded from") without the quotes that add nothing, and not at all when that is the address itself."""
    messages = [Send("case-written", {'"b"@Peer.Test.': [], '"bb"@peer.test': []})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {"RCPT": rcpt_reply}, messages, 1)
    assert [(human_part(n), report(n)) for n in mf["case-written"]] == [
        (human_part(n), report(n)) for n in pf["case-written"]]
    text = human_part(pf["case-written"][0])
    assert "\n<b@Peer.Test> (expanded from <b@Peer.Test.>): " in text and "\n<bb@peer.test>: " in text
    assert [g[1] for g in report(pf["case-written"][0])[1:]] == [("Original-Recipient", 'rfc822;"b"@Peer.Test.'),
                                                                 ("Original-Recipient", 'rfc822;"bb"@peer.test')]


async def test_a_notices_received_header_names_no_recipient_as_postfixs_does(mailflow_server, smtp_peer):
    """bounce(8)'s Received: `by HOST (Postfix)`, the queue id and the date, no `for <sender>`."""
    messages = [Send("case-received", {"b": []})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {"RCPT": rcpt_reply}, messages, 1)

    def received(notice) -> list[str]:
        head = notice.raw.split(b"\r\n\r\n", 1)[0].decode()
        return [re.sub(r"\S+; .*", "ID; DATE", v.replace(PF_HOST, "HOST").replace(MF_HOST, "HOST")
                       .replace("Postfix", "MTA").replace("mailflow", "MTA"))
                for v in re.findall(r"^Received: ([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.MULTILINE)]

    assert received(mf["case-received"][0]) == received(pf["case-received"][0]) == ["by HOST (MTA)\r\n\tid ID; DATE"]


async def test_a_success_notice_names_the_agent_in_its_diagnostic_code_as_postfixs(mailflow_server, smtp_peer):
    """A success reported by a delivery agent (not a remote SMTP reply) reads "delivery via AGENT: text" in
    Diagnostic-Code as in the human part: Postfix's trace_append() prefixes the reason it hands bounce(8)'s trace
    service with the relay ("none": no prefix, as for discard(8))."""
    vmail = Path(tempfile.mkdtemp(prefix="mailflow-vmail-"))  # (pytest's tmp_path: not for the postfix user)
    try:
        vmail.chmod(0o755)
        for side in ("pf", "mf"):
            (vmail / side).mkdir()
            shutil.chown(vmail / side, NOBODY, NOBODY)
        virtual = {"virtual_mailbox_domains": "virt.test", "virtual_mailbox_maps": "inline:{a@virt.test=a/}",
                   "virtual_uid_maps": f"static:{NOBODY}", "virtual_gid_maps": f"static:{NOBODY}"}
        messages = [Send("case-virtual", {"a@virt.test": ["NOTIFY=SUCCESS"]})]
        pf, mf = await notices_of_both(
            mailflow_server, smtp_peer, {}, messages, 1,
            postfix={**virtual, "virtual_mailbox_base": str(vmail / "pf")},
            settings={**{k: [v] for k, v in virtual.items()}, "virtual_mailbox_base": str(vmail / "mf")})
    finally:
        shutil.rmtree(vmail, ignore_errors=True)
    assert [(human_part(n), report(n)) for n in mf["case-virtual"]] == [
        (human_part(n), report(n)) for n in pf["case-virtual"]]
    assert ("Diagnostic-Code", "X-Mailflow; delivery via virtual: delivered to maildir") in report(
        pf["case-virtual"][0])[1]


async def test_a_pipe_services_success_is_relayed_unless_flag_x_says_final_delivery(mailflow_server, smtp_peer):
    """pipe(8) treats its command as a gateway: a success notice says `Action: relayed` unless the service has
    flags=X (final delivery), then `delivered`; the text is "delivery via NAME: delivered via NAME service" with
    the command's output (pipe.c, deliver_message: PIPE_OPT_FINAL_DELIVERY)."""
    echo = ["/bin/echo", "all", "fine"]
    master_cf = "".join(f"{name} unix - n n - - pipe {flags}user=nobody argv={' '.join(echo)}\n"
                        for name, flags in (("pgate", ""), ("pfinal", "flags=X ")))
    pipe = {"pgate": {"argv": echo, "user": "nobody"}, "pfinal": {"argv": echo, "user": "nobody", "flags": "X"}}
    messages = [Send("case-gate", {"a@gate.test": ["NOTIFY=SUCCESS"]}),
                Send("case-final", {"b@final.test": ["NOTIFY=SUCCESS"]})]  # (one notice would list them as they end)
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {}, messages, 2, master_cf=master_cf,
                                   settings={"pipe": pipe}, routes="gate.test=pgate:, final.test=pfinal:")
    assert {s: [(human_part(n), report(n)) for n in ns] for s, ns in mf.items()} == {
        s: [(human_part(n), report(n)) for n in ns] for s, ns in pf.items()}
    [gate], [final] = pf["case-gate"], pf["case-final"]
    assert "\n<a@gate.test>: delivery via pgate: delivered via pgate service (all fine)\n" in human_part(gate)
    assert [dict(group)["Action"] for group in (report(gate)[1], report(final)[1])] == ["relayed", "delivered"]


async def test_an_aliass_forwarded_copy_keeps_the_recipients_dsn_parameters_as_postfixs_local(mailflow_server,
                                                                                             smtp_peer):
    """local(8) passes a recipient's NOTIFY (without SUCCESS), ORCPT and the message's ENVID and RET on to the
    addresses an alias forwards it to (forward.c): NOTIFY=NEVER still means no notice when the copy bounces, and
    a failure notice carries the client's ORCPT and ENVID. A list with an owner- alias passes NOTIFY only: its
    owner (here at sender.test) gets the notices NOTIFY allows."""
    aliases = ("inline:{ {fwdnever=b@peer.test}, {fwdfail=b@peer.test}, {list=b@peer.test}, "
               "{owner-list=owner@sender.test} }")
    messages = [Send("case-never", {"fwdnever@local.test": ["NOTIFY=NEVER"]}, ["ENVID=env-never"]),
                Send("case-failure", {"fwdfail@local.test": ["NOTIFY=FAILURE", "ORCPT=rfc822;orig@client.test"]},
                     ["ENVID=env-failure"]),
                Send("case-list-never", {"list@local.test": ["NOTIFY=NEVER"]}),
                Send("case-list", {"list@local.test": ["NOTIFY=FAILURE", "ORCPT=rfc822;orig@client.test"]})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {"RCPT": rcpt_reply}, messages, 2, settle=1.5,
                                   postfix={"mydestination": "local.test", "myorigin": "local.test",
                                            "alias_maps": aliases},
                                   settings={"mydestination": ["local.test"], "myorigin": "local.test",
                                             "alias_maps": [aliases]})
    assert {s: [report(n) for n in ns] for s, ns in mf.items()} == {s: [report(n) for n in ns] for s, ns in pf.items()}
    [failure] = pf["case-failure"]
    assert ("Original-Envelope-Id", "env-failure") in report(failure)[0]
    assert ("Original-Recipient", "rfc822;orig@client.test") in report(failure)[1]
    [listed] = pf["case-list"]
    assert listed.envelope[1] == ["owner@sender.test"]
    assert ("Original-Recipient", "rfc822;b@peer.test") in report(listed)[1]  # the list's ORCPT did not follow
    assert "case-never" not in pf and "case-list-never" not in pf


async def test_an_aliass_success_notice_says_expanded_as_postfixs_local(mailflow_server, smtp_peer):
    """NOTIFY=SUCCESS to an alias: local(8) reports the expansion itself, `Action: expanded` with "alias
    expanded" (`delivered` for a list with an owner- alias, whose sender it replaces), and passes NOTIFY on
    without SUCCESS, so the forwarded copy reports nothing more (alias.c)."""
    aliases = ("inline:{ {fwd=a@peer.test}, {sink=/dev/null}, {list=a@peer.test}, {owner-list=b@peer.test} }")
    messages = [Send("case-alias", {"fwd@local.test": ["NOTIFY=SUCCESS"]}),
                Send("case-file", {"sink@local.test": ["NOTIFY=SUCCESS,FAILURE"]}),
                Send("case-list", {"list@local.test": ["NOTIFY=SUCCESS"]})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {"RCPT": rcpt_reply}, messages, 3, settle=1.5,
                                   postfix={"mydestination": "local.test", "alias_maps": aliases},
                                   settings={"mydestination": ["local.test"], "alias_maps": [aliases]})
    assert {s: [(human_part(n), report(n)) for n in ns] for s, ns in mf.items()} == {
        s: [(human_part(n), report(n)) for n in ns] for s, ns in pf.items()}
    assert [dict(report(pf[case][0])[1])["Action"] for case in ("case-alias", "case-file", "case-list")] == [
        "expanded", "expanded", "delivered"]
    assert "\n<fwd@local.test>: delivery via local: alias expanded\n" in human_part(pf["case-alias"][0])


async def test_a_lists_failing_command_is_reported_to_its_owner_as_postfixs_local(mailflow_server, smtp_peer):
    """local(8)'s bounce_workaround: when a command (or file) of a list with an owner- alias fails, the failure
    notice goes to the owner (owner-list@myorigin, here aliased to sender.test) and the sender hears nothing; an
    alias without an owner tells the sender."""
    aliases = "inline:{ {list=|/bin/false}, {owner-list=owner@sender.test}, {plain=|/bin/false} }"
    messages = [Send("case-list", {"list@local.test": []}), Send("case-plain", {"plain@local.test": []})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {}, messages, 2, settle=1.5,
                                   postfix={"mydestination": "local.test", "myorigin": "local.test",
                                            "alias_maps": aliases},
                                   settings={"mydestination": ["local.test"], "myorigin": "local.test",
                                             "alias_maps": [aliases]})
    assert {s: [n.envelope[1] for n in ns] for s, ns in mf.items()} == {
        s: [n.envelope[1] for n in ns] for s, ns in pf.items()} == {
        "case-list": [["owner@sender.test"]], "case-plain": [["alice@sender.test"]]}
    assert [dict(report(n)[1])["Status"] for n in (*mf["case-list"], *pf["case-list"])] == ["5.3.0", "5.3.0"]


async def test_a_lists_restricted_file_is_reported_to_its_owner_and_a_restricted_command_to_the_sender(
        mailflow_server, smtp_peer):
    """With aliases allowed neither commands nor files, local(8) refuses both 5.7.1: a list's file through
    bounce_workaround (file.c: the owner's notice), its command with bounce_append (token.c: the sender's)."""
    aliases = ("inline:{ {flist=/tmp/mailflow-never-written}, {owner-flist=owner@sender.test},"
               " {clist=|/bin/true}, {owner-clist=owner@sender.test} }")
    restricted = {"allow_mail_to_files": "forward", "allow_mail_to_commands": "forward"}
    messages = [Send("case-file", {"flist@local.test": []}), Send("case-command", {"clist@local.test": []})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {}, messages, 2, settle=1.5,
                                   postfix={"mydestination": "local.test", "myorigin": "local.test",
                                            "alias_maps": aliases, **restricted},
                                   settings={"mydestination": ["local.test"], "myorigin": "local.test",
                                             "alias_maps": [aliases],
                                             "local": {k: [v] for k, v in restricted.items()}})
    assert {s: [n.envelope[1] for n in ns] for s, ns in mf.items()} == {
        s: [n.envelope[1] for n in ns] for s, ns in pf.items()} == {
        "case-file": [["owner@sender.test"]], "case-command": [["alice@sender.test"]]}
    assert [dict(report(n)[1])["Status"] for n in (*mf["case-file"], *pf["case-file"])] == ["5.7.1", "5.7.1"]


async def test_a_lists_owner_is_told_without_the_senders_dsn_parameters_as_postfixs_local(mailflow_server, smtp_peer):
    """local(8)'s alias.c gives what a list with an owner- alias delivers no ENVID, RET, ORCPT nor original
    address (they are the sender's, not the owner's): the owner's failure notice has no Original-Envelope-Id, no
    Original-Recipient, no "(expanded from …)", and returns the whole message as if RET were not given; its
    Diagnostic-Code is the command's, "x-unix; unknown mail system error 1" for this one."""
    aliases = "inline:{ {list=|/bin/false}, {owner-list=owner@sender.test} }"
    messages = [Send("case-list", {"list@local.test": ["ORCPT=rfc822;given@local.test", "NOTIFY=FAILURE"]},
                     mail_options=["ENVID=env-1", "RET=HDRS"])]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {}, messages, 1, settle=1.5,
                                   postfix={"mydestination": "local.test", "myorigin": "local.test",
                                            "alias_maps": aliases},
                                   settings={"mydestination": ["local.test"], "myorigin": "local.test",
                                             "alias_maps": [aliases]})
    [pf_notice], [mf_notice] = pf["case-list"], mf["case-list"]
    assert pf_notice.envelope[1] == ["owner@sender.test"]
    assert human_part(mf_notice) == human_part(pf_notice)
    assert report(mf_notice) == report(pf_notice)
    assert ("Diagnostic-Code", "x-unix; unknown mail system error 1") in report(pf_notice)[1]
    assert "Original-Envelope-Id" not in dict(report(pf_notice)[0])
    assert "Original-Recipient" not in dict(report(pf_notice)[1])
    assert [p.get_content_type() for p in mf_notice.iter_parts()] == [
        p.get_content_type() for p in pf_notice.iter_parts()]


FAILING = ('#!/bin/sh\n'
           'case "$1" in\n'
           ' out1) printf "line one\\nline two\\n"; exit 1;;\n'
           ' silent1) exit 1;;\n'
           ' out67) echo "no such mailbox"; exit 67;;\n'
           ' silent67) exit 67;;\n'
           ' dsn) echo "5.7.1 go away now"; exit 1;;\n'
           ' slow) exec sleep 30;;\n'
           'esac\n')
FAILING_CASES = ("out1", "silent1", "out67", "silent67", "dsn", "slow")


async def test_a_failed_commands_notice_gives_its_output_as_x_unix_as_postfixs_pipe_command(mailflow_server,
                                                                                            smtp_peer):
    """pipe_command() (local(8)'s |command, pipe(8)) reports a failed command with dsb_unix: `Diagnostic-Code:
    x-unix; <the command's output>`, or without output the sys_exits text (a <sysexits.h> code's, "unknown mail
    system error N" for another status, "internal software error" for the time limit); for "D.S.N text" output
    the text. The human part keeps `Command died with status N: "cmd". Command output: …`."""
    with script_dir() as d:
        script = d.script("fail.sh", FAILING)
        aliases = "inline:{ " + ", ".join(f'{{{case}="|{script} {case}"}}' for case in FAILING_CASES) + " }"
        master_cf = f"pfail unix - n n - - pipe user=nobody argv={script} out67\n"
        messages = [*(Send(f"case-{case}", {f"{case}@local.test": []}) for case in FAILING_CASES),
                    Send("case-pipe", {"a@fail.test": []})]
        pf, mf = await notices_of_both(
            mailflow_server, smtp_peer, {}, messages, len(messages), settle=1.5, master_cf=master_cf,
            routes="fail.test=pfail:",
            postfix={"mydestination": "local.test", "alias_maps": aliases, "command_time_limit": "2s"},
            settings={"mydestination": ["local.test"], "alias_maps": [aliases], "local": {"command_time_limit": "2s"},
                      "pipe": {"pfail": {"argv": [str(script), "out67"], "user": "nobody"}}})
    assert {s: [(human_part(n), report(n)) for n in ns] for s, ns in mf.items()} == {
        s: [(human_part(n), report(n)) for n in ns] for s, ns in pf.items()}
    codes = {s: dict(report(ns[0])[1])["Diagnostic-Code"] for s, ns in pf.items()}
    assert codes == {"case-out1": "x-unix; line one line two", "case-silent1": "x-unix; unknown mail system error 1",
                     "case-out67": "x-unix; no such mailbox", "case-silent67": "x-unix; user unknown",
                     "case-dsn": "x-unix; go away now", "case-slow": "x-unix; internal software error",
                     "case-pipe": "x-unix; no such mailbox"}


async def test_failures_of_two_lists_go_each_to_its_own_owner_and_a_lists_deferral_to_the_sender(mailflow_server,
                                                                                                 smtp_peer):
    """An alias of two lists with owner- aliases whose commands fail: local(8)'s bounce_workaround tells each
    owner about its own list (bounce_one: one notice each, naming the list, with its command's status and
    Diagnostic-Code), and the sender hears nothing; an alias of one such list names that list too. A list's
    command that defers goes to the message's defer log (defer_one): the delay notice goes to the sender."""
    aliases = ("inline:{ {all=l1, l2}, {one=l1}, {l1=|/bin/false}, {owner-l1=o1@sender.test}, "
               '{l2="|exit 67"}, {owner-l2=o2@sender.test}, {l3="|exit 75"}, {owner-l3=o3@sender.test} }')
    messages = [Send("case-all", {"all@local.test": []}), Send("case-one", {"one@local.test": []}),
                Send("case-defer", {"l3@local.test": []})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {}, messages, 4, settle=1.5,
                                   postfix={"mydestination": "local.test", "myorigin": "local.test",
                                            "alias_maps": aliases, **QUICK, "queue_run_delay": "1s"},
                                   settings={"mydestination": ["local.test"], "myorigin": "local.test",
                                             "alias_maps": [aliases]}, queue=QUICK)

    def told(notices) -> list[tuple]:
        return sorted((n.envelope[1], n["Subject"], human_part(n), report(n)[1:]) for n in notices)

    assert told(mf["case-all"]) == told(pf["case-all"])
    assert told(mf["case-one"]) == told(pf["case-one"])
    assert [to for to, *_ in told(pf["case-all"])] == [["o1@sender.test"], ["o2@sender.test"]]
    assert [dict(report(n)[1])["Final-Recipient"] for n in pf["case-one"]] == ["rfc822; l1@local.test"]
    assert [(n.envelope[1], n["Subject"]) for n in mf["case-defer"]] == [
        (n.envelope[1], n["Subject"]) for n in pf["case-defer"]] == [
        (["alice@sender.test"], "Delayed Mail (still being retried)")]
    assert [dict(report(n)[1])["Diagnostic-Code"] for n in (*mf["case-defer"], *pf["case-defer"])] == [
        "x-unix; temporary failure"] * 2


def local_host_with(aliases: str) -> dict[str, dict]:
    """notices_of_both's `postfix` and `settings` for both servers as local.test, `aliases` their alias_maps."""
    return {"postfix": {"mydestination": "local.test", "myorigin": "local.test", "alias_maps": aliases},
            "settings": {"mydestination": ["local.test"], "myorigin": "local.test", "alias_maps": [aliases]}}


async def test_each_failure_under_lists_is_its_own_notice_to_the_owner_as_postfixs_bounce_one(mailflow_server,
                                                                                            smtp_peer, caplog):
    """local(8)'s bounce_workaround calls bounce_one once per failed delivery: an alias of two lists with one
    owner whose commands fail, and a list whose two commands fail, give the owner a notice per failure, each
    naming its list with its command's text and x-unix Diagnostic-Code (not one notice about the alias with the
    texts joined), and the log a `status=bounced` line per failure about its list, without orig_to."""
    caplog.set_level(logging.INFO, logger="mailflow")
    maillog: list[str] = []
    aliases = ("inline:{ {both=m1, m2}, {m1=|/bin/false}, {owner-m1=o@sender.test}, "
               '{m2="|exit 67"}, {owner-m2=o@sender.test}, '
               '{pair="|/bin/false", "|exit 67"}, {owner-pair=o@sender.test} }')
    messages = [Send("case-both", {"both@local.test": []}), Send("case-pair", {"pair@local.test": []})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {}, messages, 4, settle=1.5,
                                   **local_host_with(aliases), maillog=maillog)

    def told(notices) -> list[tuple]:
        return sorted((n.envelope[1], n["Subject"], human_part(n), report(n)[1:]) for n in notices)

    def bounced(lines) -> list[str]:
        said = (re.search(r"\w+: (to=<(both|m\d|pair)@.*)", line) for line in lines)
        return sorted(re.sub(r"delay=\S+, delays=\S+, ", "", m.group(1)) for m in said
                      if m and "status=bounced" in m.group(1))

    assert bounced(r.getMessage() for r in caplog.records) == bounced(maillog[0].splitlines())
    assert len(bounced(maillog[0].splitlines())) == 4
    assert told(mf["case-both"]) == told(pf["case-both"])
    assert told(mf["case-pair"]) == told(pf["case-pair"])
    assert sorted(dict(report(n)[1])["Final-Recipient"] for n in pf["case-both"]) == [
        "rfc822; m1@local.test", "rfc822; m2@local.test"]
    assert sorted(dict(report(n)[1])["Diagnostic-Code"] for n in pf["case-pair"]) == [
        "x-unix; unknown mail system error 1", "x-unix; user unknown"]


async def test_every_failure_told_to_the_sender_is_in_its_notice_up_to_the_limit(mailflow_server, smtp_peer):
    """bounce(8) lists every failure of its log in the sender's one notice: an alias of a list with an owner and
    OWNED_NOTICE_LIMIT (100) commands of its own that fail gives the owner a notice and the sender one with 100
    failures; an alias of 5 failing commands and no owner gives the sender 5 (mailflow folded those into one
    "(5 times)" line). Past the limit mailflow counts the rest in the last one listed (docs/transports.md)."""
    commands = ", ".join(f'"|exit 67 # {n}"' for n in range(100))
    few = ", ".join(f'"|exit 67 # {n}"' for n in range(5))
    aliases = (f"inline:{{ {{mix=l1, {commands}}}, {{l1=|/bin/false}}, {{owner-l1=o@sender.test}}, "
               f"{{none={few}}} }}")
    messages = [Send("case-many", {"mix@local.test": []}), Send("case-none", {"none@local.test": []})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {}, messages, 3, settle=1.5, **local_host_with(aliases))

    def told(notices) -> list[tuple]:
        return sorted((n.envelope[1], sorted(human_part(n).split("\n\n<")[1:]), sorted(map(str, report(n)[1:])))
                      for n in notices)

    assert told(mf["case-many"]) == told(pf["case-many"])
    [(_, senders, fields), (owner, _, _)] = told(pf["case-many"])
    assert owner == ["o@sender.test"] and len(senders) == len(fields) == 100
    assert told(mf["case-none"]) == told(pf["case-none"])
    [(_, senders, fields)] = told(pf["case-none"])
    assert len(senders) == len(fields) == 5


async def test_a_command_that_cannot_be_run_is_delayed_in_postfixs_words(mailflow_server, smtp_peer):
    """A command whose program cannot be executed (local's |command, a pipe service) is deferred 4.3.0; Postfix's
    pipe_command() gives the child's fatal message as the output of a command that exited EX_TEMPFAIL, so the
    delay notice says `temporary failure. Command output: local: fatal: execvp PROG: why` (a pipe service's
    child: `pipe: fatal: pipe_command: execvp ...`), and its Diagnostic-Code `x-unix;` that output."""
    aliases = "inline:{ {gone=|/nonexistent/prog}, {denied=|/etc} }"
    master_cf = "pgone unix - n n - - pipe user=nobody argv=/nonexistent/prog\n"
    messages = [Send("case-local", {"gone@local.test": []}), Send("case-pipe", {"a@gone.test": []}),
                Send("case-denied", {"denied@local.test": []})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {}, messages, 3, settle=1.5, master_cf=master_cf,
                                   routes="gone.test=pgone:",
                                   postfix={"mydestination": "local.test", "alias_maps": aliases, **QUICK,
                                            "queue_run_delay": "1s"},
                                   settings={"mydestination": ["local.test"], "alias_maps": [aliases],
                                             "pipe": {"pgone": {"argv": ["/nonexistent/prog"], "user": "nobody"}}},
                                   queue=QUICK)

    def told(notices) -> list[tuple]:
        return [(n["Subject"], human_part(n).split("\n\n<", 1)[1], report(n)[1]) for n in notices]

    for case in ("case-local", "case-pipe", "case-denied"):
        assert told(mf[case]) == told(pf[case])
    [(subject, text, fields)] = told(pf["case-local"])
    assert subject == "Delayed Mail (still being retried)" and ("Status", "4.3.0") in fields
    assert text == ("gone@local.test>: temporary failure. Command output: local: fatal: execvp\n"
                    "    /nonexistent/prog: No such file or directory\n")
    assert ("Diagnostic-Code", "x-unix; local: fatal: execvp /nonexistent/prog: No such file or directory") in fields
    assert ("Diagnostic-Code", "x-unix; pipe: fatal: pipe_command: execvp /nonexistent/prog: No such file or "
            "directory") in told(pf["case-pipe"])[0][2]
    assert ("Diagnostic-Code", "x-unix; local: fatal: execvp /etc: Permission denied") in told(pf["case-denied"])[0][2]


async def test_a_command_whose_shell_cannot_be_run_is_delayed_in_postfixs_words(mailflow_server, smtp_peer):
    """A local `|command` with shell metacharacters goes to /bin/sh; when that exec fails (here E2BIG: one argument
    longer than the kernel takes, 128 KiB), Postfix's exec_command() says `execl /bin/sh: why` (util/exec_command.c),
    not execvp as for a program run directly: the delay notice gives `local: fatal: execl /bin/sh: Argument list too
    long` as the command's output."""
    command = "exit 0 # " + "x" * 140_000
    aliases = f'inline:{{ {{long="|{command}"}} }}'
    messages = [Send("case-shell", {"long@local.test": []})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {}, messages, 1, settle=1.5,
                                   postfix={"mydestination": "local.test", "alias_maps": aliases, **QUICK,
                                            "queue_run_delay": "1s"},
                                   settings={"mydestination": ["local.test"], "alias_maps": [aliases]}, queue=QUICK)

    def told(notices) -> list[tuple]:
        return [(n["Subject"], human_part(n).split("\n\n<", 1)[1], report(n)[1]) for n in notices]

    assert told(mf["case-shell"]) == told(pf["case-shell"])
    [(_, _, fields)] = told(pf["case-shell"])
    assert ("Diagnostic-Code", "x-unix; local: fatal: execl /bin/sh: Argument list too long") in fields


def original_recipients(notice) -> list[str]:
    """Each recipient's Original-Recipient value exactly as written (white space kept)."""
    part = notice.raw.split(b"\r\n--" + notice.get_boundary().encode())[2].decode("utf-8")
    return re.findall(r"^Original-Recipient:[ \t]?(.*?)\r$", part, re.MULTILINE)


async def test_the_original_recipient_postfix_makes_up_is_the_rcpt_address_as_written(mailflow_server, smtp_peer):
    """Without ORCPT, Postfix's smtpd makes one up from the RCPT address as written (smtpd.c: `rfc822;ADDR`, no
    blank), before canonical rewriting; a client's ORCPT is given as it came."""
    canonical = "inline:{rewritten@peer.test=b@peer.test}"
    messages = [Send("case-canonical", {"rewritten": [], "bb": ["ORCPT=rfc822;given@orig.test"]})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {"RCPT": rcpt_reply}, messages, 1,
                                   postfix={"canonical_maps": canonical}, settings={"canonical_maps": [canonical]})
    assert [original_recipients(n) for n in mf["case-canonical"]] == [
        original_recipients(n) for n in pf["case-canonical"]]
    assert original_recipients(pf["case-canonical"][0]) == ["rfc822;rewritten@peer.test", "rfc822;given@orig.test"]


async def test_a_commands_output_keeps_its_runs_of_blanks_in_the_notice_as_postfixs(mailflow_server, smtp_peer):
    """Postfix's pipe_command() keeps the runs of blanks in a command's output; bounce(8) gives that text as it
    is, in the human part and the Diagnostic-Code."""
    aliases = "inline:{ {spaces=\"|echo 'a   b     c'; exit 75\"} }"
    messages = [Send("case-spaces", {"spaces@local.test": []})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {}, messages, 1, settle=1.5,
                                   postfix={"mydestination": "local.test", "alias_maps": aliases, **QUICK,
                                            "queue_run_delay": "1s"},
                                   settings={"mydestination": ["local.test"], "alias_maps": [aliases]}, queue=QUICK)
    assert [(human_part(n), report(n)) for n in mf["case-spaces"]] == [
        (human_part(n), report(n)) for n in pf["case-spaces"]]
    assert "\n<spaces@local.test>: temporary failure. Command output: a   b     c\n" in human_part(pf["case-spaces"][0])
    assert ("Diagnostic-Code", "x-unix; a   b     c") in report(pf["case-spaces"][0])[1]


async def test_a_list_failure_beside_another_goes_to_the_owner_and_the_other_to_the_sender(mailflow_server, smtp_peer,
                                                                                          caplog):
    """local(8)'s bounce_workaround tells each failure on its own: one of a list with an owner- alias to that
    owner, about its list; one of no list (the alias's own command, an unknown member) to the sender, about the
    recipient or "<member> (expanded from <recipient>)"; a log line each."""
    caplog.set_level(logging.INFO, logger="mailflow")
    maillog: list[str] = []
    aliases = ('inline:{ {mix=l1, "|exit 67"}, {l1=|/bin/false}, {owner-l1=o@sender.test}, '
               '{mix2=l2, nosuchuser}, {l2="|exit 67"}, {owner-l2=o2@sender.test} }')
    messages = [Send("case-mix", {"mix@local.test": []}), Send("case-mix2", {"mix2@local.test": []})]
    pf, mf = await notices_of_both(mailflow_server, smtp_peer, {}, messages, 4, settle=1.5,
                                   **local_host_with(aliases), maillog=maillog)

    def told(notices) -> list[tuple]:
        return sorted((n.envelope[1], human_part(n), report(n)[1:]) for n in notices)

    def bounced(lines) -> list[str]:
        said = (re.search(r"\w+: (to=<.*status=bounced.*)", line) for line in lines)
        return sorted(re.sub(r"delay=\S+, delays=\S+, ", "", m.group(1)) for m in said if m)

    assert told(mf["case-mix"]) == told(pf["case-mix"])
    assert told(mf["case-mix2"]) == told(pf["case-mix2"])
    assert [to for to, *_ in told(pf["case-mix"])] == [["alice@sender.test"], ["o@sender.test"]]
    assert "\n<nosuchuser@local.test> (expanded from <mix2@local.test>): unknown user:" in told(pf["case-mix2"])[0][1]
    assert bounced(r.getMessage() for r in caplog.records) == bounced(maillog[0].splitlines())
    assert len(bounced(maillog[0].splitlines())) == 4



LOOP = b"Received: a\nReceived: b\nReceived: c\nSubject: case-loop\n\nthe loop's body\n"


async def loops_returned_by_both(mailflow_server, smtp_peer, write_config, tmp_path, *, sender: str, expected: int,
                                 postfix: dict, queue: dict) -> tuple[list[tuple], list[tuple]]:
    """Each server's sendmail submits LOOP (too many hops for hopcount_limit 2) from `sender`; pickup's cleanup
    refuses it and bounces it through bounce(8): the shapes of the `expected` notices each sends to sender.test,
    (Postfix's, mailflow's), sorted: envelope recipients, From and Subject, human part, whether the body came."""
    pf_sink, mf_sink = await smtp_peer(), await smtp_peer()
    settings = {"myhostname": MF_HOST, "mydomain": "example.test", "hopcount_limit": 2,
                "smtp": {"tls_security_level": "none"}, "queue": queue,
                "transport_maps": [f"inline:{{sender.test=smtp:[127.0.0.1]:{mf_sink.port}}}"]}
    mf = await mailflow_server(**settings)
    config = write_config(tmp_path / "mailflow.toml", **settings)
    async with postfix_instance({"myhostname": PF_HOST, "mydomain": "example.test", "mydestination": "",
                                 "hopcount_limit": "2", **postfix,
                                 "transport_maps": f"inline:{{sender.test=smtp:[127.0.0.1]:{pf_sink.port}}}"}) as pf:
        for command in (["sendmail", "-C", str(pf.etc)], [sys.executable, "-m", "mailflow", "sendmail", "-C",
                                                          str(config)]):
            await asyncio.to_thread(subprocess.run, [*command, "-f", sender, "a@peer.test"], input=LOOP,
                                    check=True, timeout=20)
        await eventually(lambda: len(pf_sink.messages) >= expected, timeout=20, what="Postfix's notices")
        await eventually(lambda: len(mf_sink.messages) >= expected, timeout=20, what="mailflow's notices")
        await settled(pf, mf, 0.5)  # (a notice too many would come now)

    def shape(notice) -> tuple:
        named = {name: notice[name].replace(PF_HOST, "HOST").replace(MF_HOST, "HOST") for name in ("From", "Subject")}
        # (mailflow's cleanup words the reason as smtpd replies it, "Error: too many hops"; Postfix's cleanup_strerror
        # says "too many hops", its smtpd adding "Error: ": a known difference, set aside here)
        text = human_part(notice).replace(": Error: too many hops", ": too many hops")
        return notice.envelope[1], named, text, b"the loop's body" in notice.raw

    return (sorted(map(shape, by_subject(pf_sink.messages)["case-loop"])),
            sorted(map(shape, by_subject(mf_sink.messages)["case-loop"])))


async def test_a_maildrop_file_refused_for_a_loop_is_returned_as_postfixs_cleanup_returns_it(
        mailflow_server, smtp_peer, write_config, tmp_path):
    """The failure template's From, Subject and text in the sender's notice, notify_classes bounce's headers-only
    copy to bounce_notice_recipient (mailflow's pickup plans them as qmgr does)."""
    path = tmp_path / "bounce.cf"
    path.write_text(TEMPLATES)
    os.chmod(tmp_path, 0o755)
    os.chmod(path, 0o644)
    to = "pm@sender.test"
    pf, mf = await loops_returned_by_both(
        mailflow_server, smtp_peer, write_config, tmp_path, sender=SENDER, expected=2,
        postfix={"notify_classes": "bounce", "bounce_notice_recipient": to, "bounce_template_file": str(path)},
        queue={"notify_classes": ["bounce"], "bounce_notice_recipient": to, "bounce_template_file": str(path)})
    assert mf == pf
    assert [(rcpt, named["Subject"], body) for rcpt, named, _, body in pf] == [
        (["alice@sender.test"], "Returned: your mail", True), (["pm@sender.test"], "Copy of a returned mail", False)]


async def test_a_maildrop_file_of_the_null_sender_refused_for_a_loop_goes_whole_to_2bounce_notice_recipient(
        mailflow_server, smtp_peer, write_config, tmp_path):
    to = "pm@sender.test"
    pf, mf = await loops_returned_by_both(
        mailflow_server, smtp_peer, write_config, tmp_path, sender="", expected=1,
        postfix={"notify_classes": "2bounce", "2bounce_notice_recipient": to},
        queue={"notify_classes": ["2bounce"], "double_bounce_recipient": to})
    assert mf == pf
    assert [(rcpt, named["Subject"], body) for rcpt, named, _, body in pf] == [
        (["pm@sender.test"], "Postmaster Copy: Undelivered Mail", True)]

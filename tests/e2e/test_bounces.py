"""Deferral, retry and bounce through real sockets: a scripted SMTP peer answers 4xx, then 5xx."""
from __future__ import annotations

import email
import email.policy

import pytest

from tests.support import eventually, queue_becomes, send

MESSAGE = b"Subject: will bounce\r\nMessage-ID: <orig-1@remote.test>\r\n\r\nthe original body\r\n"


def delivery_status(notice) -> list:
    part = next(p for p in notice.walk() if p.get_content_type() == "message/delivery-status")
    return part.get_payload()


async def test_4xx_defers_and_retries_then_5xx_bounces_to_the_sender(mailflow_server, smtp_peer):
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    peer.handler.rcpt_replies["gone@relay.test"] = "451 4.2.0 mailbox busy, try later"
    await send(mf.smtp_addresses[0][1], "alice@relay.test", ["gone@relay.test", "ok@relay.test"], MESSAGE)

    await queue_becomes(mf.store, {"deferred": 1})
    assert [m.rcpt_tos for m in peer.messages] == [["ok@relay.test"]]
    [(_, status, dsn, reason)] = [r for r in await mf.store.recipients(
        (await mf.store.due(2e9, 10))[0].queue_id) if r[0] == "gone@relay.test"]
    assert (status, dsn) == ("pending", "4.2.0") and "mailbox busy" in reason

    peer.handler.rcpt_replies["gone@relay.test"] = "550 5.1.1 no such user here"
    bounces = await eventually(lambda: [m for m in peer.messages if m.mail_from == "<>"], timeout=10)
    assert len(bounces) == 1 and bounces[0].rcpt_tos == ["alice@relay.test"]
    await queue_becomes(mf.store, {})

    notice = email.message_from_bytes(bounces[0].content, policy=email.policy.default)
    assert notice.get_content_type() == "multipart/report"
    per_message, per_recipient = delivery_status(notice)[0], delivery_status(notice)[1:]
    assert per_message["Reporting-MTA"] == "dns; mx.mailflow.test"
    [fields] = per_recipient
    assert fields["Final-Recipient"] == "rfc822; gone@relay.test"
    assert (fields["Action"], fields["Status"]) == ("failed", "5.1.1")
    assert "550 5.1.1 no such user here" in fields["Diagnostic-Code"]
    returned = next(p for p in notice.walk() if p.get_content_type() == "message/rfc822")
    assert b"the original body" in returned.as_bytes()


async def test_a_missing_alias_member_is_named_in_the_bounce_and_the_log(mailflow_server, smtp_peer, tmp_path, caplog):
    """Postfix's local(8): "<ghost@local.test> (expanded from <info@local.test>)", Final-Recipient the member,
    Original-Recipient the address the sender used; the log line to=<member>, orig_to=<recipient>."""
    peer = await smtp_peer()
    aliases = tmp_path / "aliases"
    aliases.write_text("info: alice, ghost\n")
    mf = await mailflow_server(alias_maps=[f"texthash:{aliases}"], relayhost=f"[127.0.0.1]:{peer.port}",
                               myorigin="local.test")
    caplog.set_level("INFO", logger="mailflow")
    await send(mf.smtp_addresses[0][1], "sender@relay.test", ["info@local.test"], MESSAGE)

    [bounce] = await eventually(lambda: [m for m in peer.messages if m.mail_from == "<>"], timeout=10)
    notice = email.message_from_bytes(bounce.content, policy=email.policy.default)
    text = next(p for p in notice.walk() if p.get_content_type() == "text/plain").get_content()
    assert '<ghost@local.test> (expanded from <info@local.test>): unknown user: "ghost"' in " ".join(text.split())
    [fields] = delivery_status(notice)[1:]
    assert fields["Final-Recipient"] == "rfc822; ghost@local.test"
    assert fields["Original-Recipient"] == "rfc822;info@local.test"  # (smtpd made it up, as Postfix's)
    assert (fields["Action"], fields["Status"]) == ("failed", "5.1.1")
    assert "to=<ghost@local.test>, orig_to=<info@local.test>, relay=local" in caplog.text
    assert await eventually(lambda: list((tmp_path / "mail" / "alice" / "Maildir" / "new").glob("*")))


async def test_bounce_template_file_words_the_notice_and_a_bad_one_refuses_the_reload(mailflow_server, smtp_peer,
                                                                                       tmp_path):
    """The failure notice takes bounce_template_file's Subject and text; a reload to a template that cannot be
    used is refused, naming the setting, and the one in force stays."""
    from mailflow.config import config_from_dict
    from mailflow.errors import ConfigError

    good, bad = tmp_path / "bounce.cf", tmp_path / "bad.cf"
    good.write_text("failure_template = <<EOF\nSubject: Sorry\n\nNo luck at $myhostname.\nEOF\n")
    bad.write_text("failure_template = <<EOF\nSubject: Sorry\n\nNo luck at $nowhere.\nEOF\n")
    peer = await smtp_peer()
    peer.handler.rcpt_replies["gone@relay.test"] = "550 5.1.1 no such user here"
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}", queue={"bounce_template_file": str(good)})
    broken = config_from_dict({**mf.config.model_dump(), "queue": {**mf.config.queue.model_dump(),
                                                                   "bounce_template_file": str(bad)}})
    with pytest.raises(ConfigError, match=r"queue.bounce_template_file: .*bad.cf: line 1: failure_template: "
                                          r"unknown macro \$nowhere"):
        await mf.reload(broken)
    await send(mf.smtp_addresses[0][1], "alice@relay.test", ["gone@relay.test"], MESSAGE)

    [bounce] = await eventually(lambda: [m for m in peer.messages if m.mail_from == "<>"], timeout=10)
    notice = email.message_from_bytes(bounce.content, policy=email.policy.default)
    assert notice["Subject"] == "Sorry"
    text = next(p for p in notice.walk() if p.get_content_type() == "text/plain").get_content()
    assert text.startswith("No luck at mx.mailflow.test.\r\n\r\n<gone@relay.test>: host ")

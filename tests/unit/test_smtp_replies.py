"""ReplyReader: the SMTP client's reply parser once a session is set up (replies queued in order, never dropped)."""
from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

from mailflow.transports.smtp_session import ReplyReader


class Previous(asyncio.Protocol):
    def __init__(self):
        self.lost = []

    def connection_lost(self, exc):
        self.lost.append(exc)


async def test_pipelined_replies_in_odd_chunks_come_out_in_order():
    reader = ReplyReader(Previous())
    for chunk in (b"250 2.1.0 Ok\r\n250-first\r", b"\n250-second\r\n250 2.1.5 last\r\n55", b"0 5.1.1 no\r\n"):
        reader.data_received(chunk)
    replies = [await reader.reply(1) for _ in range(3)]
    assert [(r.code, r.message) for r in replies] == [
        (250, "2.1.0 Ok"), (250, "first\nsecond\n2.1.5 last"), (550, "5.1.1 no")]
    assert not reader.buffered


async def test_a_reply_that_arrives_later_wakes_the_reader():
    reader = ReplyReader(Previous())
    waiting = asyncio.create_task(reader.reply(1))
    await asyncio.sleep(0)
    reader.data_received(b"354 go ahead\r\n")
    assert (await waiting).code == 354


async def test_timeout_and_connection_loss():
    previous = Previous()
    reader = ReplyReader(previous)
    with pytest.raises(TimeoutError):
        await reader.reply(0.01)
    reader.data_received(b"250 queued before the end\r\n")
    reader.connection_lost(None)
    assert (await reader.reply(1)).code == 250  # what arrived before the loss is still read
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await reader.reply(1)
    assert previous.lost == [None]  # aiosmtplib's protocol hears of it too


async def test_garbage_is_a_protocol_error():
    reader = ReplyReader(Previous())
    reader.data_received(b"hello there\r\n")
    with pytest.raises(aiosmtplib.SMTPResponseException, match="Malformed"):
        await reader.reply(1)
    endless = ReplyReader(Previous())
    endless.data_received(b"250-" + b"x" * 70_000)
    with pytest.raises(aiosmtplib.SMTPResponseException, match="too long"):
        await endless.reply(1)


# ---------------------------------------------------------------------------------------------- DSN pass-on

def test_dsn_parameters_are_xtext_and_orcpt_is_synthesised_from_the_original():
    from mailflow.model import DeliveryRequest, Recipient
    from mailflow.transports.smtp import dsn_mail_params, dsn_rcpt_params, xtext

    assert xtext("a+b=c d\x01é") == "a+2Bb+3Dc+20d+01+C3+A9"
    request = DeliveryRequest("Q", "s@x.test", (), "x.test", b"", envid="id=1 +", ret="hdrs")
    assert dsn_mail_params(request) == [b"RET=HDRS", b"ENVID=id+3D1+20+2B"]
    assert dsn_mail_params(DeliveryRequest("Q", "s@x.test", (), "x.test", b"")) == []
    given = Recipient(0, "a@x.test", "first@x.test", notify="SUCCESS,FAILURE", orcpt="rfc822;o+x@x.test")
    assert dsn_rcpt_params(given) == [b"ORCPT=rfc822;o+2Bx@x.test", b"NOTIFY=SUCCESS,FAILURE"]
    assert dsn_rcpt_params(Recipient(0, "a@x.test", "First@x.test")) == [b"ORCPT=rfc822;First@x.test"]
    assert dsn_rcpt_params(Recipient(0, "a@x.test", "")) == []
    utf8 = Recipient(0, "a@x.test", "jöe@bücher.test", notify="NEVER")
    assert dsn_rcpt_params(utf8) == [b"ORCPT=utf-8;j\\x{F6}e@b\\x{FC}cher.test", b"NOTIFY=NEVER"]

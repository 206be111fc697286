"""DSN parameters passed on to a next hop that offers DSN (RFC 3461 4), as real Postfix programs see them:
smtp-sink's dump (`X-Mail-Args`, `X-Rcpt-Args`) for SMTP and LMTP, and a private Postfix instance as the next
hop, which then honours NOTIFY=NEVER (no bounce) where it bounces a recipient."""
from __future__ import annotations

import re
from pathlib import Path

import aiosmtplib
import pytest

from tests.support import eventually, postfix_instance, queue_becomes
from tests.support.postfix import smtp_sink

pytestmark = pytest.mark.interop
MESSAGE = b"From: s@remote.test\r\nSubject: %s\r\n\r\nhello\r\n"


async def send_with_dsn(port: int, sender: str, rcpts: list[tuple[str, list[str]]], content: bytes,
                        mail_options: list[str]) -> None:
    """One message whose MAIL and each RCPT carry the given DSN parameters."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10) as client:
        await client.ehlo()
        await client.mail(sender, options=mail_options)
        for rcpt, options in rcpts:
            await client.rcpt(rcpt, options=options)
        await client.data(content)


def dumped_args(dump: Path) -> list[str]:
    text = dump.read_text(errors="replace") if dump.exists() else ""
    return re.findall(r"^X-(?:Mail|Rcpt)-Args: .*$", text, re.MULTILINE)


async def test_smtp_passes_ret_envid_notify_orcpt_to_smtp_sink(mailflow_server):
    async with smtp_sink() as (sink_port, dump):
        mf = await mailflow_server(relayhost=f"[127.0.0.1]:{sink_port}", mynetworks=["127.0.0.0/8"])
        port = mf.smtp_addresses[0][1]
        await send_with_dsn(port, "s@remote.test", [
            ("given@dest.test", ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;first+2Bx@dest.test"]),
            ("never@dest.test", ["NOTIFY=NEVER"]),
            ("plain@dest.test", []),
        ], MESSAGE % b"dsn", ["RET=HDRS", "ENVID=id+3Dwith+2Bxtext"])
        await queue_becomes(mf.store, {})
        args = await eventually(lambda: len(dumped_args(dump)) == 4 and dumped_args(dump))
    assert args == [
        "X-Mail-Args: <s@remote.test> RET=HDRS ENVID=id+3Dwith+2Bxtext",
        "X-Rcpt-Args: <given@dest.test> ORCPT=rfc822;first+2Bx@dest.test NOTIFY=SUCCESS,DELAY",
        "X-Rcpt-Args: <never@dest.test> ORCPT=rfc822;never@dest.test NOTIFY=NEVER",
        "X-Rcpt-Args: <plain@dest.test> ORCPT=rfc822;plain@dest.test",
    ]


async def test_lmtp_passes_the_dsn_parameters_too(mailflow_server):
    async with smtp_sink("-L") as (sink_port, dump):
        mf = await mailflow_server(mynetworks=["127.0.0.0/8"],
                                   transport_maps=[f"inline:{{dest.test=lmtp:[127.0.0.1]:{sink_port}}}"])
        port = mf.smtp_addresses[0][1]
        await send_with_dsn(port, "s@remote.test", [("u@dest.test", ["NOTIFY=FAILURE"])], MESSAGE % b"lmtp",
                            ["RET=FULL", "ENVID=lmtp-1"])
        await queue_becomes(mf.store, {})
        args = await eventually(lambda: len(dumped_args(dump)) == 2 and dumped_args(dump))
    assert args[0].endswith(" RET=FULL ENVID=lmtp-1")
    assert args[1] == "X-Rcpt-Args: <u@dest.test> ORCPT=rfc822;u@dest.test NOTIFY=FAILURE"


async def test_a_real_postfix_next_hop_gets_the_parameters_and_honours_notify_never(mailflow_server):
    """mailflow -> Postfix -> smtp-sink. Postfix bounces `gone@dest.test` (error transport) and relays the rest
    to the sink, passing on the DSN parameters it received from mailflow. Its bounces go to the sink too: one
    for the recipient that left NOTIFY at its default, none for the NOTIFY=NEVER one."""
    async with smtp_sink() as (sink_port, dump), postfix_instance({
        "myhostname": "pf.test", "mydestination": "", "relayhost": f"[127.0.0.1]:{sink_port}",
        "transport_maps": "inline:{ { gone@dest.test = error:5.1.1 gone away } }",
        "smtpd_reject_unlisted_recipient": "no",  # accept gone@ at RCPT, so that the bounce decision is tested
    }) as pf:
        mf = await mailflow_server(relayhost=f"[127.0.0.1]:{pf.port}", mynetworks=["127.0.0.0/8"])
        port = mf.smtp_addresses[0][1]
        await send_with_dsn(port, "s@remote.test", [
            ("gone@dest.test", ["NOTIFY=NEVER"]),
            ("ok@dest.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;alias@dest.test"]),
        ], MESSAGE % b"never", ["RET=HDRS", "ENVID=never-1"])
        await send_with_dsn(port, "s@remote.test", [("gone@dest.test", [])], MESSAGE % b"default", [])
        await queue_becomes(mf.store, {})
        await pf.queue_empty()
        text = await eventually(lambda: dump.exists() and dump.read_text(errors="replace").count("X-Mail-Args") == 2
                                and dump.read_text(errors="replace"), timeout=10)
        await pf.logged("status=bounced")  # (postlogd writes it a moment after the queue file went)
    # what Postfix received from mailflow, as it passed it on to the sink
    assert "X-Mail-Args: <s@remote.test> ENVID=never-1 RET=HDRS" in text
    assert "X-Rcpt-Args: <ok@dest.test> ORCPT=rfc822;alias@dest.test NOTIFY=SUCCESS,FAILURE" in text
    # one bounce (from <>), for the message whose recipient kept the default NOTIFY
    bounces = [m for m in text.split("X-Client-Addr")[1:] if "X-Mail-Args: <>" in m]
    assert len(bounces) == 1 and "Subject: default" in bounces[0] and "Subject: never" not in bounces[0]


async def rcpt_args_at_the_next_hop(mailflow_server, rcpts) -> list[list[str]]:
    """The same RCPTs (with their DSN parameters) to a private Postfix and to mailflow, each relaying to an
    smtp-sink (DSN, no SMTPUTF8): the X-Rcpt-Args lines each sink dumped, Postfix's first."""
    seen = []
    for server in ("postfix", "mailflow"):
        async with smtp_sink() as (sink_port, dump):
            if server == "postfix":
                async with postfix_instance({"myhostname": "pf.test", "mydestination": "",
                                             "relayhost": f"[127.0.0.1]:{sink_port}"}) as pf:
                    await send_with_dsn(pf.port, "s@remote.test", rcpts, MESSAGE % b"orcpt", [])
                    await pf.queue_empty()
            else:
                mf = await mailflow_server(relayhost=f"[127.0.0.1]:{sink_port}", mynetworks=["127.0.0.0/8"])
                await send_with_dsn(mf.smtp_addresses[0][1], "s@remote.test", rcpts, MESSAGE % b"orcpt", [])
                await queue_becomes(mf.store, {})
            args = await eventually(lambda: len(dumped_args(dump)) == len(rcpts) + 1 and dumped_args(dump),
                                    timeout=10)
        seen.append(sorted(args[1:]))  # (Postfix's qmgr sorts a request's recipients)
    return seen


async def test_a_non_ascii_orcpt_goes_to_a_next_hop_without_smtputf8_as_postfixs_smtp_client_sends_it(
        mailflow_server):
    """Differential: the same RCPTs to a private Postfix and to mailflow, each relaying to an smtp-sink (DSN, no
    SMTPUTF8). Postfix's smtp client quotes the queued ORCPT by its type: `rfc822;` as xtext (+HH of the UTF-8
    bytes), `utf-8;` with \\x{HEX}; mailflow must send the same bytes."""
    rcpts = [("one@dest.test", ["ORCPT=rfc822;j+C3+B6e@b+C3+BCcher.test"]),
             ("two@dest.test", ["ORCPT=utf-8;j\\x{F6}e@b\\x{FC}cher.test"])]
    seen = await rcpt_args_at_the_next_hop(mailflow_server, rcpts)
    assert seen[0] == [
        "X-Rcpt-Args: <one@dest.test> ORCPT=rfc822;j+C3+B6e@b+C3+BCcher.test",
        "X-Rcpt-Args: <two@dest.test> ORCPT=utf-8;j\\x{F6}e@b\\x{FC}cher.test",
    ]
    assert seen[1] == seen[0]


async def test_an_orcpt_type_goes_to_the_next_hop_as_the_client_wrote_it(mailflow_server):
    """Differential: Postfix's smtpd keeps an ORCPT's address type as the client wrote it (`RFC822;`, `UTF-8;`) and
    its smtp client passes it on so, the address quoted by the type's rule in any case (smtpd.c, smtp_proto.c);
    mailflow's smtpd lower-cased it (`rfc822;`, `utf-8;`)."""
    rcpts = [("one@dest.test", ["ORCPT=RFC822;One+2Bx@dest.test"]),
             ("two@dest.test", ["ORCPT=UTF-8;j\\x{F6}e@dest.test"]),
             ("three@dest.test", ["ORCPT=Rfc822;three@dest.test"])]
    seen = await rcpt_args_at_the_next_hop(mailflow_server, rcpts)
    assert seen[0] == [
        "X-Rcpt-Args: <one@dest.test> ORCPT=RFC822;One+2Bx@dest.test",
        "X-Rcpt-Args: <three@dest.test> ORCPT=Rfc822;three@dest.test",
        "X-Rcpt-Args: <two@dest.test> ORCPT=UTF-8;j\\x{F6}e@dest.test",
    ]
    assert seen[1] == seen[0]

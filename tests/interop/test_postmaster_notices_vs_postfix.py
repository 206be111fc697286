"""Differential test of smtpd's postmaster notices (notify_classes' session transcripts, Postfix's
smtpd_chat_notify): a private Postfix and mailflow hear the same dialogue and send their notices to a capturing
peer each; each notice must be its server's dialogue, written as Postfix writes it, and both must go to the same
recipient with the same header fields once each server's names (host, mail_name) are set aside."""
from __future__ import annotations

import base64
import email
import email.policy

import pytest

from mailflow.stages.bounce import line_wrap
from mailflow.stages.smtpd.postmaster import INDENT, WIDTH
from tests.support import SmtpClient, dovecot_instance, eventually, postfix_instance, queue_becomes

pytestmark = pytest.mark.interop

PF_HOST, MF_HOST = "pf.test", "mx.mailflow.test"
COMMANDS = ["HELO refused.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<x@elsewhere.test>", "BOGUS",
            "RCPT TO:<nobody@local.test>", "MAIL FROM:<bad", "RCPT TO:<" + "y" * 70 + " zz@elsewhere.test>"]
CLASSES = {"notify_classes": "policy, protocol", "error_notice_recipient": "pm@relay.test",
           "bounce_notice_recipient": "bpm@relay.test"}


async def dialogue(port: int) -> list[tuple[str, str]]:
    """COMMANDS said to the server on `port`, the connection then dropped: the dialogue as (who, line)."""
    client = await SmtpClient.connect(port)
    said = [("S", line) for line in client.greeting.text.split("\n")]
    for command in COMMANDS:
        reply = await client.cmd(command)
        said += [("C", command)] + [("S", line) for line in reply.text.split("\n")]
    await client.close()
    return said


def written(said: list[tuple[str, str]]) -> str:
    """The body Postfix's smtpd_chat_notify writes for this dialogue of a session that lost its connection."""
    lines = [" " + piece for who, line in said for piece in line_wrap(("In:  " if who == "C" else "Out: ") + line,
                                                                       WIDTH, INDENT)]
    return "\n".join(["Transcript of session follows.", "", *lines, "",
                      "Session aborted, reason: lost connection", "",
                      "For other details, see the local mail logfile", ""])


def header(notice, host: str, mail_name: str) -> dict[str, str]:
    return {name: notice[name].replace(host, "HOST").replace(mail_name, "NAME") for name in ("From", "To", "Subject")}


async def test_a_session_transcript_is_postfixs_word_for_word(mailflow_server, smtp_peer):
    """policy and protocol named, a relay refusal, an unknown command, an unknown user (class bounce, not named:
    its notice goes to bounce_notice_recipient all the same, its To: field naming error_notice_recipient), a
    nested MAIL, a long command wrapped at 78 columns with a 4-space indent; the session dropped without QUIT."""
    pf_sink, mf_sink = await smtp_peer(), await smtp_peer()
    async with postfix_instance({
        "myhostname": PF_HOST, "mydestination": f"{PF_HOST}, local.test", "mynetworks": "192.0.2.0/24",
        "relay_domains": "relay.test", "relayhost": f"[127.0.0.1]:{pf_sink.port}",
        "local_recipient_maps": "inline:{alice=ok}", "smtpd_relay_restrictions": "reject_unauth_destination",
        **CLASSES,
    }) as pf:
        mf = await mailflow_server(myhostname=MF_HOST, relayhost=f"[127.0.0.1]:{mf_sink.port}",
                                   queue={**CLASSES, "notify_classes": ["policy", "protocol"]})
        pf_said, mf_said = await dialogue(pf.port), await dialogue(mf.smtp_addresses[0][1])
        [pf_notice] = await eventually(lambda: pf_sink.messages, timeout=15, what="Postfix's notice")
        [mf_notice] = await eventually(lambda: mf_sink.messages, timeout=15, what="mailflow's notice")

    assert [w for w, _ in mf_said] == [w for w, _ in pf_said]
    for said, captured, host, name in ((pf_said, pf_notice, PF_HOST, "Postfix"),
                                       (mf_said, mf_notice, MF_HOST, "mailflow")):
        notice = email.message_from_bytes(captured.content, policy=email.policy.default)
        assert notice.get_content().replace("\r\n", "\n") == written(said), name
        assert captured.rcpt_tos == ["bpm@relay.test"], name
        assert captured.mail_from == f"double-bounce@{host}", name
        assert header(notice, host, name) == {"From": "Mail Delivery System <MAILER-DAEMON@HOST>",
                                              "To": "Postmaster <pm@relay.test>",
                                              "Subject": "NAME SMTP server: errors from localhost[127.0.0.1]"}, name
    assert " In:  RCPT\n     TO:<" in written(pf_said)  # (the long command, wrapped)


CASES = {  # each session said to both servers, then QUIT; notify_classes = policy
    "an address with another refusal's words": [
        "EHLO client.test", "MAIL FROM:<s@remote.test>", 'RCPT TO:<"due to local problem"@elsewhere.test>',
        'RCPT TO:<"User unknown"@elsewhere.test>', 'RCPT TO:<"Temporary lookup failure"@elsewhere.test>'],
    "a non-FQDN HELO": ["EHLO client", "MAIL FROM:<s@remote.test>", "RCPT TO:<x@relay.test>"],
    "a failed AUTH": ["EHLO client.test", "AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0wrong").decode()],
    "the recipient limit": ["EHLO client.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<a@relay.test>",
                            "RCPT TO:<b@relay.test>"],
    "past the overshoot limit": ["EHLO client.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<a@relay.test>",
                                 "RCPT TO:<b@relay.test>", "RCPT TO:<c@relay.test>"],
    "past smtpd_history_flush_threshold": ["EHLO client.test", "MAIL FROM:<s@remote.test>",
                                           "RCPT TO:<x@elsewhere.test>", *["NOOP"] * 70, "RSET"],
}
MARKER = ["EHLO marker.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<x@elsewhere.test>"]  # a notice each time


async def said_and_quit(port: int, commands: list[str]) -> None:
    """`commands`, then QUIT, and the server's close awaited (Postfix's smtpd posts its notice before it closes)."""
    client = await SmtpClient.connect(port)
    for command in commands:
        await client.cmd(command)
    await client.cmd("QUIT")
    assert await client.closed()
    await client.close()


async def notices_of(port: int, sink, settled, commands: list[str]) -> list[tuple[list[str], int, bool]]:
    """Each notice the session `commands` begets: its recipients, how many commands its transcript shows, whether
    it gives a reason; the session, then MARKER (whose notice arrives after the session's was posted), the queue
    emptied."""
    sink.messages.clear()
    await said_and_quit(port, commands)
    await said_and_quit(port, MARKER)
    await eventually(lambda: [m for m in sink.messages if b"marker.test" in m.content], timeout=15, what="marker")
    await settled()
    return [(m.rcpt_tos, m.content.count(b"\n In:  "), b"Session aborted" in m.content)
            for m in sink.messages if b"marker.test" not in m.content]


async def test_which_sessions_beget_a_notice_is_postfixs(mailflow_server, smtp_peer):
    """notify_classes = policy: client-chosen words in an address do not change a relay refusal's class (policy);
    a non-FQDN HELO is policy; a failed AUTH and the recipient limit are filed under no class, the recipient
    limit past smtpd_recipient_overshoot_limit under policy; a session past smtpd_history_flush_threshold (100
    lines) at RSET sends its refusal's notice there (RSET its last command), without a reason, and nothing at its
    end: the same notices (how many,
    to whom, how long, with a reason or not) from both."""
    pf_sink, mf_sink = await smtp_peer(), await smtp_peer()
    with dovecot_instance() as dovecot:
        async with postfix_instance({
            "myhostname": PF_HOST, "mydestination": f"{PF_HOST}, local.test", "mynetworks": "192.0.2.0/24",
            "relay_domains": "relay.test", "relayhost": f"[127.0.0.1]:{pf_sink.port}",
            "smtpd_helo_restrictions": "reject_non_fqdn_helo_hostname", "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot", "smtpd_sasl_path": str(dovecot.auth_socket),
            "smtpd_recipient_limit": "1", "smtpd_recipient_overshoot_limit": "1",
            "smtpd_relay_restrictions": "reject_unauth_destination", **CLASSES, "notify_classes": "policy",
        }) as pf:
            mf = await mailflow_server(myhostname=MF_HOST, relayhost=f"[127.0.0.1]:{mf_sink.port}",
                                       queue={**CLASSES, "notify_classes": ["policy"]},
                                       smtpd={"helo_restrictions": ["reject_non_fqdn_helo_hostname"],
                                              "sasl_auth_enable": True, "sasl_type": "dovecot",
                                              "sasl_path": str(dovecot.auth_socket), "auth_failure_delay": 0,
                                              "allow_plaintext_auth_on_loopback": True, "recipient_limit": 1,
                                              "recipient_overshoot_limit": 1})
            mf_port = mf.smtp_addresses[0][1]
            pf_got = {case: await notices_of(pf.port, pf_sink, pf.queue_empty, commands)
                      for case, commands in CASES.items()}
            mf_got = {case: await notices_of(mf_port, mf_sink, lambda: queue_becomes(mf.store, {}), commands)
                      for case, commands in CASES.items()}
    assert mf_got == pf_got
    pm = ["pm@relay.test"]
    assert pf_got == {"an address with another refusal's words": [(pm, 6, False)], "a non-FQDN HELO": [(pm, 4, False)],
                      "a failed AUTH": [], "the recipient limit": [], "past the overshoot limit": [(pm, 6, False)],
                      "past smtpd_history_flush_threshold": [(pm, 74, False)]}

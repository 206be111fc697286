"""notify_classes' session transcripts (Postfix's smtpd_chat_notify) through a running server: which sessions
beget a notice, where it goes, what it says."""
from __future__ import annotations

import base64
import email
import email.policy

from mailflow.stages.smtpd.auth import hash_password
from mailflow.stages.smtpd.postmaster import SMTPD_CLASSES
from mailflow.stages.smtpd.transcript import SessionObserver, Transcript
from tests.support import SmtpClient, eventually, queue_becomes

POSTMASTER = "pm@relay.test"  # a relay domain: the notice leaves for the capturing peer


async def test_a_refused_session_sends_its_transcript_to_the_postmaster(mailflow_server, smtp_peer):
    """policy and protocol on: a session with a relay refusal and an unknown command ends with one notice from the
    double-bounce sender to error_notice_recipient, its transcript line by line as Postfix writes it; a session
    whose refusal was followed by an accepted message (forgiven, as Postfix's smtpd) and one whose only error is of
    a class not named (an unknown user: bounce) send none."""
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}",
                               queue={"notify_classes": ["policy", "protocol"], "error_notice_recipient": POSTMASTER})
    port = mf.smtp_addresses[0][1]

    forgiven = await SmtpClient.connect(port)
    assert (await forgiven.cmd("EHLO forgiven.test")).code == 250
    assert (await forgiven.cmd("MAIL FROM:<s@remote.test>")).code == 250
    assert (await forgiven.cmd("RCPT TO:<x@elsewhere.test>")).code == 554
    assert (await forgiven.cmd("RSET")).code == 250
    assert (await forgiven.send_message(ehlo=False)).code == 250
    assert (await forgiven.cmd("QUIT")).code == 221
    unknown = await SmtpClient.connect(port)
    assert (await unknown.cmd("HELO unknown.test")).code == 250
    assert (await unknown.cmd("MAIL FROM:<s@remote.test>")).code == 250
    assert (await unknown.cmd("RCPT TO:<nobody@local.test>")).code == 550
    await unknown.close()

    refused = await SmtpClient.connect(port)
    assert (await refused.cmd("HELO refused.test")).code == 250
    assert (await refused.cmd("MAIL FROM:<s@remote.test>")).code == 250
    assert (await refused.cmd("RCPT TO:<x@elsewhere.test>")).code == 554
    assert (await refused.cmd("BOGUS")).code == 500
    await refused.close()  # without QUIT: "lost connection"

    [notice] = await eventually(lambda: [m for m in peer.messages if m.rcpt_tos == [POSTMASTER]], timeout=10)
    assert notice.mail_from == "double-bounce@mx.mailflow.test"
    message = email.message_from_bytes(notice.content, policy=email.policy.default)
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mx.mailflow.test>"
    assert message["To"] == f"Postmaster <{POSTMASTER}>"
    assert message["Subject"] == "mailflow SMTP server: errors from localhost[127.0.0.1]"
    body = message.get_content().replace("\r\n", "\n")
    assert body == (
        "Transcript of session follows.\n\n"
        f" Out: {refused.greeting.text}\n"
        " In:  HELO refused.test\n"
        " Out: 250 mx.mailflow.test\n"
        " In:  MAIL FROM:<s@remote.test>\n"
        " Out: 250 2.1.0 Ok\n"
        " In:  RCPT TO:<x@elsewhere.test>\n"
        " Out: 554 5.7.1 <x@elsewhere.test>: Relay access denied\n"
        " In:  BOGUS\n"
        " Out: 500 5.5.2 Error: command not recognized\n"
        "\nSession aborted, reason: lost connection\n"
        "\nFor other details, see the local mail logfile\n")
    await queue_becomes(mf.store, {})
    assert [m.rcpt_tos for m in peer.messages if m.mail_from != "s@remote.test"] == [[POSTMASTER]]


class _Classes(SessionObserver):
    """Each ended session's refusals, as the classes smtpd filed them under."""

    line_limit = byte_limit = 0

    def __init__(self) -> None:
        self.ended_sessions: list[list[str]] = []
        self._open: dict[Transcript, list[str]] = {}

    def started(self, transcript: Transcript) -> None:
        self._open[transcript] = []

    def refused(self, transcript: Transcript, error_class: str) -> None:
        self._open[transcript].append(error_class)

    def ended(self, transcript: Transcript) -> None:
        self.ended_sessions.append(self._open.pop(transcript))


async def test_each_refusal_is_filed_under_the_class_it_was_made_with(mailflow_server, tmp_path):
    """The class comes from where the refusal is made, as Postfix's smtpd_check_reject(state, MAIL_ERROR_x):
    an address whose words are another refusal's ("due to local problem", "User unknown", "Temporary lookup
    failure") is a relay refusal (policy) all the same; a non-FQDN HELO and sender: policy; a failed AUTH: none;
    the recipient limit: none, policy past the overshoot limit; a relocated user: bounce;
    the error limit's 421: protocol."""
    (tmp_path / "users").write_text(f"bob {hash_password('hunter2', n=1024)}\n")
    observer = _Classes()
    mf = await mailflow_server(session_observer=observer,
                               relocated_maps=["inline:{gone@local.test=new@elsewhere.test}"],
                               smtpd={"helo_restrictions": ["reject_non_fqdn_helo_hostname"],
                                      "sender_restrictions": ["reject_non_fqdn_sender"],
                                      "sasl_auth_enable": True, "sasl_user_maps": [f"texthash:{tmp_path / 'users'}"],
                                      "auth_failure_delay": 0, "allow_plaintext_auth_on_loopback": True,
                                      "recipient_limit": 1, "recipient_overshoot_limit": 1,
                                      "hard_error_limit": 4, "soft_error_limit": 4})
    port = mf.smtp_addresses[0][1]

    async def session(*commands: str) -> list[str]:
        client = await SmtpClient.connect(port)
        for command in commands:
            await client.cmd(command)
        await client.close()
        [classes] = await eventually(lambda: observer.ended_sessions, timeout=10)
        observer.ended_sessions.clear()
        return classes

    words = ["write error due to local problem", "User unknown", "Temporary lookup failure"]
    assert await session("EHLO client.test", "MAIL FROM:<s@remote.test>",
                         *(f'RCPT TO:<"{w}"@elsewhere.test>' for w in words)) == ["policy"] * 3
    for helo, sender in (("client", "s@remote.test"), ("client.test", "s@remote")):  # (refused at RCPT)
        assert await session(f"EHLO {helo}", f"MAIL FROM:<{sender}>", "RCPT TO:<postmaster@local.test>") == ["policy"]
    assert await session("EHLO client.test", "AUTH PLAIN " + base64.b64encode(b"\0bob\0wrong").decode()) == []
    assert await session("EHLO client.test", "MAIL FROM:<s@remote.test>", *["RCPT TO:<postmaster>"] * 3) == ["policy"]
    assert await session("EHLO client.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<gone@local.test>") == ["bounce"]
    assert await session("EHLO client.test", *["BOGUS"] * 5) == ["protocol"] * 5


async def test_a_session_the_server_ends_gives_no_reason(mailflow_server, smtp_peer):
    """The reason is the one the session set where it ended, as Postfix's (timeout, lost connection, too many
    errors): a session the server closes after its 521 for a bare <LF> has none, where its last lines alone would
    look like a lost connection."""
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}",
                               queue={"notify_classes": ["protocol"], "error_notice_recipient": POSTMASTER})
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await client.cmd("HELO bare.test")).code == 250
    assert (await client.cmd(b"NOOP\n")).code == 521
    assert await client.closed()
    await client.close()
    [notice] = await eventually(lambda: [m for m in peer.messages if m.rcpt_tos == [POSTMASTER]], timeout=10)
    body = email.message_from_bytes(notice.content, policy=email.policy.default).get_content().replace("\r\n", "\n")
    assert body.endswith(" Out: 521 5.5.2 mx.mailflow.test Error: bare <LF> received\n\n\n"
                         "For other details, see the local mail logfile\n")


async def test_a_bad_proxy_header_begets_no_notice(mailflow_server, smtp_peer):
    """A bad PROXY header's 421 has no class, as Postfix's smtpd.c sends it: with every class smtpd files named,
    a client that sends garbage to an upstream_proxy_protocol listener makes no notice, where a proxied session
    with an unknown command (protocol), made after it, does."""
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}",
                               queue={"notify_classes": list(SMTPD_CLASSES), "error_notice_recipient": POSTMASTER},
                               smtpd={"listen": ["127.0.0.1:0"],
                                      "listeners": [{"address": "127.0.0.1:0", "role": "mta",
                                                     "overrides": {"upstream_proxy_protocol": "haproxy"}}]})
    port = mf.smtpd.listeners[1].server.sockets[0].getsockname()[1]
    garbage = await SmtpClient.connect(port, first=b"GARBAGE\r\n", greet=False)
    assert (await garbage.reply()).code == 421
    assert await garbage.rest() == b""
    await garbage.close()
    proxied = await SmtpClient.connect(port, first=b"PROXY TCP4 192.0.2.7 203.0.113.1 40000 25\r\n")
    assert (await proxied.cmd("BOGUS")).code == 500
    await proxied.close()
    [notice] = await eventually(lambda: [m for m in peer.messages if m.rcpt_tos == [POSTMASTER]], timeout=10)
    await queue_becomes(mf.store, {})
    assert [m.rcpt_tos for m in peer.messages] == [[POSTMASTER]]
    subject = email.message_from_bytes(notice.content, policy=email.policy.default)["Subject"]
    assert subject == "mailflow SMTP server: errors from unknown[192.0.2.7]"


async def test_a_catalogue_reply_keeps_its_class_through_a_session(mailflow_server, monkeypatch):
    """The handler's replies go out as the catalogue's Reply objects, so each keeps its class: a UTF-8 sender
    without SMTPUTF8 (Postfix's 553) has none; a handler's bug (451, internal error) is software, which the
    default notify_classes name."""
    observer = _Classes()
    mf = await mailflow_server(session_observer=observer)
    port = mf.smtp_addresses[0][1]

    async def failing_rcpt(*args):
        raise RuntimeError("a bug")

    async def session(*commands: str) -> tuple[list[int], list[str]]:
        client = await SmtpClient.connect(port)
        codes = [(await client.cmd(command)).code for command in commands]
        await client.close()
        [classes] = await eventually(lambda: observer.ended_sessions, timeout=10)
        observer.ended_sessions.clear()
        return codes, classes

    assert await session("EHLO client.test", "MAIL FROM:<ü@remote.test>") == ([250, 553], [])
    monkeypatch.setattr(mf.smtpd.listeners[0].handler, "handle_RCPT", failing_rcpt)
    assert await session("EHLO client.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<postmaster@local.test>") == (
        [250, 250, 451], ["software"])


async def test_a_notice_flushed_mid_session_names_the_proxied_client(mailflow_server, smtp_peer):
    """A long session's notice goes at RSET (Postfix's chat_reset past 100 lines) and names the client the PROXY
    header gave, as Postfix's state->namaddr, not the balancer the transcript began with."""
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}",
                               queue={"notify_classes": ["protocol"], "error_notice_recipient": POSTMASTER},
                               smtpd={"listen": ["127.0.0.1:0"], "junk_command_limit": 1000,
                                      "listeners": [{"address": "127.0.0.1:0", "role": "mta",
                                                     "overrides": {"upstream_proxy_protocol": "haproxy"}}]})
    port = mf.smtpd.listeners[1].server.sockets[0].getsockname()[1]
    client = await SmtpClient.connect(port, first=b"PROXY TCP4 192.0.2.7 203.0.113.1 40000 25\r\n")
    assert (await client.cmd("EHLO client.test")).code == 250
    assert (await client.cmd("BOGUS")).code == 500
    for _ in range(50):
        assert (await client.cmd("NOOP")).code == 250
    assert (await client.cmd("RSET")).code == 250
    [notice] = await eventually(lambda: [m for m in peer.messages if m.rcpt_tos == [POSTMASTER]], timeout=10)
    subject = email.message_from_bytes(notice.content, policy=email.policy.default)["Subject"]
    assert subject == "mailflow SMTP server: errors from unknown[192.0.2.7]"
    await client.close()

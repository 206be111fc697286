"""What a receiver scores besides authentication: the HELO name (smtp.helo_name, default myhostname), a Message-ID
and a Date on every message that leaves (bounces and forwarded copies too), and the header bytes as they came (8-bit
ones too, to a peer without SMTPUTF8, as Postfix's smtp(8): a signature made upstream over them stays whole)."""
from __future__ import annotations

from tests.support import eventually, maildir_messages, send


def head_of(content: bytes) -> bytes:
    return content.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]


async def test_helo_is_myhostname_unless_smtp_helo_name_says_otherwise(mailflow_server, smtp_peer):
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["x@relay.test"], b"Subject: a\r\n\r\nx\r\n")
    await eventually(lambda: peer.messages)
    assert peer.messages[0].helo == "mx.mailflow.test"

    other = await smtp_peer()
    mf2 = await mailflow_server(relayhost=f"[127.0.0.1]:{other.port}", smtp={"helo_name": "out.mailflow.test"},
                                queue_directory=str(mf.config.queue_path) + "2")
    await send(mf2.smtp_addresses[0][1], "s@remote.test", ["x@relay.test"], b"Subject: a\r\n\r\nx\r\n")
    await eventually(lambda: other.messages)
    assert other.messages[0].helo == "out.mailflow.test"


async def test_a_bounce_carries_message_id_and_date(mailflow_server, smtp_peer, tmp_path):
    peer = await smtp_peer()
    peer.handler.rcpt_replies["gone@relay.test"] = "550 5.1.1 no such user"
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    await send(mf.smtp_addresses[0][1], "alice@local.test", ["gone@relay.test"], b"Subject: a\r\n\r\nx\r\n")
    [bounce] = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    head = head_of(bounce)
    assert head.count(b"\nMessage-ID: <") == 1 and head.count(b"\nDate: ") == 1, head


async def test_a_forwarded_copy_carries_message_id_and_date(mailflow_server, smtp_peer, tmp_path):
    peer = await smtp_peer()
    aliases = tmp_path / "aliases"
    aliases.write_text("team: carol@remote.test\n")
    mf = await mailflow_server(alias_maps=[f"texthash:{aliases}"], relayhost=f"[127.0.0.1]:{peer.port}")
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["team@local.test"], b"Subject: bare\r\n\r\nno ids\r\n")
    [forwarded] = await eventually(lambda: peer.messages)
    head = b"\n" + head_of(forwarded.content)
    assert head.count(b"\nMessage-ID: <") == 1 and head.count(b"\nDate: ") == 1, head


async def test_8bit_header_fields_without_smtputf8_leave_as_they_came(mailflow_server, smtp_peer):
    peer = await smtp_peer()  # (aiosmtpd: 8BITMIME, no SMTPUTF8)
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    message = "From: José <jose@remote.test>\r\nSubject: Grüße aus Köln\r\n\r\nbody stays as it is: é\r\n".encode()
    latin1 = b"From: Jos\xe9 <jose@remote.test>\r\nSubject: caf\xe9\r\n\r\nbody\r\n"
    for content in (message, latin1):
        await send(mf.smtp_addresses[0][1], "jose@remote.test", ["x@relay.test"], content)
    relayed = await eventually(lambda: len(peer.messages) == 2 and peer.messages)
    heads = [m.content.split(b"\r\n\r\n", 1)[0].split(b"\r\n") for m in relayed]
    for sent in (message, latin1):
        from_line, subject_line = sent.split(b"\r\n")[:2]
        assert any(from_line in head and subject_line in head for head in heads), (sent, heads)
    # nothing converted, so SIZE is announced (Postfix leaves it out only when it converts the body to 7 bit)
    assert all(any(o.startswith("SIZE=") for o in m.mail_options) for m in relayed), [m.mail_options for m in relayed]

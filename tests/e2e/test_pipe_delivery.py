"""Command delivery through a real mailflow: a [pipe.NAME] service chosen by transport_maps, and a `|command`
alias in alias_maps. A script exiting 75 leaves the message deferred; 67 bounces it to the sender (captured
by the SMTP peer behind relayhost). The client and SASL macros, and a .forward command's CLIENT_* and SASL_*
variables, name the client that submitted the message (values as a private Postfix 3.7's pipe(8) and local(8)
gave for the same dialogues)."""
from __future__ import annotations

import base64
import email
import email.policy

import pytest

from mailflow.stages.smtpd.auth import hash_password
from tests.support import SmtpClient, eventually, queue_becomes, script_dir, send

MESSAGE = b"Subject: to a command\r\nMessage-ID: <pipe-1@remote.test>\r\n\r\nbody line\r\n.leading dot\r\n"
RECORD = 'printf "%s\\n" "$@" > {out}/argv\ncat > {out}/stdin\nenv > {out}/env\n'


@pytest.fixture
def scripts():
    with script_dir() as d:
        yield d


async def test_transport_maps_send_a_domain_to_a_pipe_service(mailflow_server, scripts):
    s = scripts.script("filter.sh", RECORD.format(out=scripts.out))
    mf = await mailflow_server(relay_domains=["relay.test", "pipe.test"],
                               transport_maps=["inline:{pipe.test=filt:}"],
                               pipe={"filt": {"argv": [str(s), "-f", "${sender}", "--", "${recipient}"],
                                              "flags": "R"}})
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["one@pipe.test", "two@pipe.test"], MESSAGE)

    await queue_becomes(mf.store, {})
    assert scripts.read("argv").splitlines() == ["-f", "s@remote.test", "--", "one@pipe.test", "two@pipe.test"]
    stdin = scripts.read("stdin")
    assert stdin.startswith("Return-Path: <s@remote.test>\nReceived: ") and "\r" not in stdin
    assert stdin.endswith("\n\nbody line\n.leading dot\n")


async def test_an_alias_command_runs_with_the_documented_environment(mailflow_server, scripts, tmp_path):
    s = scripts.script("alias.sh", RECORD.format(out=scripts.out))
    aliases = tmp_path / "aliases"
    aliases.write_text(f'filter: "|{s} from-alias"\n')
    mf = await mailflow_server(alias_maps=[f"texthash:{aliases}"])
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["filter+news@local.test"], MESSAGE)

    await queue_becomes(mf.store, {})
    env = dict(line.split("=", 1) for line in scripts.read("env").splitlines())
    assert {k: env.get(k) for k in ("HOME", "USER", "LOGNAME", "SHELL", "SENDER", "RECIPIENT", "ORIGINAL_RECIPIENT",
                                    "LOCAL", "DOMAIN", "EXTENSION", "PATH")} == {
        "HOME": None, "USER": "filter", "LOGNAME": "filter", "SHELL": None,  # an alias has no home, as in local(8)
        "SENDER": "s@remote.test", "RECIPIENT": "filter+news@local.test",
        "ORIGINAL_RECIPIENT": "filter+news@local.test", "LOCAL": "filter+news", "DOMAIN": "local.test",
        "EXTENSION": "news", "PATH": "/usr/bin:/bin"}
    assert scripts.read("argv") == "from-alias\n"
    assert scripts.read("stdin").split("\n", 1)[1].startswith(  # after local(8)'s From_ line
        "Return-Path: <s@remote.test>\nX-Original-To: filter+news@local.test\nDelivered-To: filter+news@local.test\n")
    assert scripts.read("stdin").startswith("From s@remote.test  ")


async def test_exit_75_leaves_the_message_deferred(mailflow_server, scripts):
    s = scripts.script("later.sh", f"echo try later\necho x >> {scripts.out}/runs\nexit 75\n")
    mf = await mailflow_server(relay_domains=["relay.test", "pipe.test"], transport_maps=["inline:{pipe.test=filt:}"],
                               pipe={"filt": {"argv": [str(s)]}})
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["one@pipe.test"], MESSAGE)

    await queue_becomes(mf.store, {"deferred": 1})
    [message] = await mf.store.due(2e9, 10)
    [(rcpt, status, dsn, reason)] = await mf.store.recipients(message.queue_id)
    assert (rcpt, status, dsn) == ("one@pipe.test", "pending", "4.3.0")
    assert reason == "temporary failure. Command output: try later "


async def test_exit_67_from_an_alias_command_bounces_to_the_sender(mailflow_server, smtp_peer, scripts, tmp_path):
    peer = await smtp_peer()
    s = scripts.script("nouser.sh", "echo no such list member\nexit 67\n")
    aliases = tmp_path / "aliases"
    aliases.write_text(f"members: |{s}\n")
    mf = await mailflow_server(alias_maps=[f"texthash:{aliases}"], relayhost=f"[127.0.0.1]:{peer.port}")
    await send(mf.smtp_addresses[0][1], "s@relay.test", ["members@local.test"], MESSAGE)

    [bounce] = await eventually(lambda: peer.messages)
    assert bounce.mail_from in ("", "<>") and bounce.rcpt_tos == ["s@relay.test"]
    notice = email.message_from_bytes(bounce.content, policy=email.policy.default)
    part = next(p for p in notice.walk() if p.get_content_type() == "message/delivery-status")
    [fields] = part.get_payload()[1:]
    assert (fields["Final-Recipient"], fields["Action"], fields["Status"]) == (
        "rfc822; members@local.test", "failed", "5.1.1")
    assert " ".join(fields["Diagnostic-Code"].split()) == "x-unix; no such list member"  # (Postfix's dsb_unix)
    human = next(notice.iter_parts()).get_content()
    assert "user unknown. Command output: no such list member" in " ".join(human.split())
    await queue_becomes(mf.store, {})


CLIENT_MACROS = ["${client_address}", "${client_helo}", "${client_hostname}", "${client_port}", "${client_protocol}",
                 "${sasl_method}", "${sasl_sender}", "${sasl_username}"]


async def test_the_pipe_macros_name_the_client_that_submitted_the_message(mailflow_server, scripts, pki, tmp_path):
    """Postfix pipe(8)'s client and SASL macros, from the attributes smtpd kept with each message: an authenticated
    ESMTP submission over STARTTLS (protocol ESMTP: RFC 3848's SA is the Received header's), its AUTH= sender as
    given; a HELO client without a login (protocol SMTP, no SASL values)."""
    _, cert, client_tls = pki
    (tmp_path / "users").write_text(f"alice {hash_password('s3cret', n=1024)}\n")
    s = scripts.script("client.sh", f'printf "%s|" "$@" >> {scripts.out}/argv\necho >> {scripts.out}/argv\n')
    mf = await mailflow_server(relay_domains=["relay.test", "pipe.test"], transport_maps=["inline:{pipe.test=filt:}"],
                               pipe={"filt": {"argv": [str(s), *CLIENT_MACROS]}},
                               smtpd={"tls_cert_file": cert, "sasl_user_maps": [f"texthash:{tmp_path / 'users'}"],
                                      "auth_failure_delay": 0,
                                      "listeners": [{"address": "127.0.0.1:0", "role": "submission"}]})
    client = await SmtpClient.connect(mf.smtpd.address_of("submission")[1])
    try:
        assert (await client.cmd("EHLO first.client.test")).code == 250
        await client.starttls(client_tls)
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret").decode())).code == 235
        await client.envelope("one@pipe.test", mail_params=" AUTH=list+2Bowner@local.test", sender="alice@local.test",
                              ehlo=False)
        assert (await client.cmd("DATA")).code == 354
        assert (await client.cmd(b"Subject: who\r\n\r\nbody\r\n.")).code == 250
        submission_port = client.writer.get_extra_info("sockname")[1]
    finally:
        await client.close()
    await queue_becomes(mf.store, {})
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    try:
        assert (await client.cmd("HELO old(client)")).code == 250
        await client.envelope("two@pipe.test", ehlo=False)
        assert (await client.cmd("DATA")).code == 354
        assert (await client.cmd(b"Subject: who\r\n\r\nbody\r\n.")).code == 250
        smtp_port = client.writer.get_extra_info("sockname")[1]
    finally:
        await client.close()

    await queue_becomes(mf.store, {})
    assert scripts.read("argv").splitlines() == [
        f"127.0.0.1|client.test|localhost|{submission_port}|ESMTP|PLAIN|list+2Bowner@local.test|alice|",
        f"127.0.0.1|old?client?|localhost|{smtp_port}|SMTP||||"]  # the HELO name as smtpd keeps it (neutered)

async def test_a_forward_command_gets_the_client_environment_of_local(mailflow_server, scripts, tmp_path):
    """local(8)'s CLIENT_* and SASL_* variables: those the message's client attributes know (no login here, so no
    SASL_METHOD or SASL_USERNAME; AUTH= is kept from anyone, as Postfix keeps it), with local(8)'s character
    filter (the HELO name's '?' become '_')."""
    s = scripts.script("env.sh", f"env > {scripts.out}/env\n")
    (tmp_path / "mail" / "bob").mkdir(parents=True)
    (tmp_path / "mail" / "bob" / ".forward").write_text(f"|{s}\n")
    mf = await mailflow_server()
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    try:
        await client.cmd("EHLO odd(name)")
        await client.envelope("bob@local.test", mail_params=" AUTH=list+2Bowner@local.test", ehlo=False)
        assert (await client.cmd("DATA")).code == 354
        assert (await client.cmd(b"Subject: who\r\n\r\nbody\r\n.")).code == 250
    finally:
        await client.close()

    await queue_becomes(mf.store, {})
    env = dict(line.split("=", 1) for line in scripts.read("env").splitlines() if "=" in line)
    assert {k: v for k, v in env.items() if k.startswith(("CLIENT_", "SASL_"))} == {
        "CLIENT_ADDRESS": "127.0.0.1", "CLIENT_HELO": "odd_name_", "CLIENT_HOSTNAME": "localhost",
        "CLIENT_PROTOCOL": "ESMTP", "SASL_SENDER": "list+2Bowner@local.test"}

async def test_a_forwarded_copy_keeps_the_client_attributes_but_the_port(mailflow_server, scripts, tmp_path):
    """An alias forwarding to a pipe service: the new message carries the original's client attributes, all
    but its port, as Postfix's local(8) passes them to cleanup (forward.c)."""
    s = scripts.script("client.sh", f'printf "%s|" "$@" >> {scripts.out}/argv\necho >> {scripts.out}/argv\n')
    (tmp_path / "aliases").write_text("fwd: one@pipe.test\n")
    mf = await mailflow_server(relay_domains=["relay.test", "pipe.test"], transport_maps=["inline:{pipe.test=filt:}"],
                               alias_maps=[f"texthash:{tmp_path / 'aliases'}"],
                               pipe={"filt": {"argv": [str(s), *CLIENT_MACROS]}})
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    try:
        await client.envelope("fwd@local.test", mail_params=" AUTH=<>")
        assert (await client.cmd("DATA")).code == 354
        assert (await client.cmd(b"Subject: who\r\n\r\nbody\r\n.")).code == 250
    finally:
        await client.close()

    await queue_becomes(mf.store, {})
    assert scripts.read("argv").splitlines() == ["127.0.0.1|client.test|localhost||ESMTP||||"]


async def test_an_xclient_client_is_the_one_the_pipe_macros_name(mailflow_server, scripts):
    """XCLIENT names the client (Postfix's smtpd replaces its client attributes with XCLIENT's): an IPv6 address
    is given in its RFC 5321 form, "IPv6:..." (Postfix's rfc_addr), and an XCLIENT LOGIN's method is XCLIENT."""
    s = scripts.script("client.sh", f'printf "%s|" "$@" >> {scripts.out}/argv\necho >> {scripts.out}/argv\n')
    mf = await mailflow_server(relay_domains=["relay.test", "pipe.test"], transport_maps=["inline:{pipe.test=filt:}"],
                               pipe={"filt": {"argv": [str(s), *CLIENT_MACROS]}},
                               smtpd={"authorized_xclient_hosts": ["127.0.0.0/8"]})
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    try:
        assert (await client.cmd("EHLO front.test")).code == 250
        assert (await client.cmd("XCLIENT NAME=mail.example.test ADDR=IPV6:2001:db8::7 PORT=4242 "
                                 "HELO=relay.example.test PROTO=ESMTP LOGIN=carol")).code == 220
        await client.envelope("one@pipe.test", ehlo=False)
        assert (await client.cmd("DATA")).code == 354
        assert (await client.cmd(b"Subject: who\r\n\r\nbody\r\n.")).code == 250
    finally:
        await client.close()

    await queue_becomes(mf.store, {})
    assert scripts.read("argv").splitlines() == [
        "IPv6:2001:db8::7|relay.example.test|mail.example.test|4242|ESMTP|XCLIENT||carol|"]

"""Differential tests of the smtpd settings Postfix admins set to change what a client is offered or told: the same
sessions to a private Postfix 3.7 and to mailflow configured alike must get the same replies, word for word (the
host name and queue ids aside; EHLO's keywords compared as a set: their order differs on purpose), and the same
log lines where the setting logs one.

    discard_ehlo_keywords     smtpd_discard_ehlo_keywords: a keyword neither announced nor accepted
    discard_ehlo_keyword_address_maps   smtpd_discard_ehlo_keyword_address_maps: the list by client address
    sasl_exceptions_networks  smtpd_sasl_exceptions_networks: AUTH not announced to these clients
    sasl_authenticated_header smtpd_sasl_authenticated_header: the login in the Received header
    strict_rfc821_envelopes   strict_rfc821_envelopes: MAIL and RCPT paths in angle brackets only
    unknown_*_reject_code     the unknown-user refusal's code, per address class
    access_map_*_code, reject_code, defer_code, relay_domains_reject_code, invalid_hostname_reject_code,
    non_fqdn_reject_code      the restrictions' codes
    reject_footer             smtpd_reject_footer: a text under every 4xx and 5xx reply
    forbid_bare_newline_exclusions  smtpd_forbid_bare_newline_exclusions: the clients a bare LF is taken from
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import re

import pytest

from mailflow.config import DEFAULTS, load_config
from mailflow.errors import ConfigError
from mailflow.message import comment_sanitized
from mailflow.stages.smtpd.protocol import ProtocolCore, ProtocolLimits
from mailflow.status import with_footer
from tests.support import SmtpClient, dovecot_instance, eventually, postfix_instance

pytestmark = pytest.mark.interop

M, R = "MAIL FROM:<s@remote.test>", "RCPT TO:<alice@local.test>"
ALICE = "alice@example.test"  # tests/support/dovecot.py's users
ALICE_PLAIN = "AUTH PLAIN " + base64.b64encode(f"\0{ALICE}\0alicepw".encode()).decode()

POSTFIX_BASE = {"myhostname": "pf.test", "mydestination": "local.test", "local_recipient_maps": "inline:{alice=ok}",
                "relayhost": "[127.0.0.1]:9", "relay_domains": "relay.test", "smtputf8_enable": "yes",
                "disable_vrfy_command": "no", "smtpd_forbid_unauth_pipelining": "yes"}


async def start_mailflow(mailflow_server, **smtpd) -> int:
    """mailflow configured as POSTFIX_BASE, with these [smtpd] settings: its port."""
    mf = await mailflow_server(mydestination=["local.test"], local_recipient_maps=["inline:{alice=ok}"],
                               relayhost="[127.0.0.1]:9", relay_domains=["relay.test"], mynetworks=["127.0.0.0/8"],
                               smtpd={"disable_vrfy_command": False, **smtpd})
    return mf.smtp_addresses[0][1]


def compared(text: str) -> str:
    """A reply as compared: the host name and queue id out, EHLO's keywords sorted."""
    lines = text.split("\n")
    if lines[0].startswith("250-"):
        return "250 EHLO " + " | ".join(sorted(line[4:] for line in lines[1:]))
    text = text.replace("pf.test", "HOST").replace("mx.mailflow.test", "HOST")
    return re.sub(r"queued as \w+", "queued as QID", text)


async def dialogue(port: int, commands: list[str | bytes]) -> list[str]:
    """Each command's reply as compared; "closed" once the server hung up. A 421 or 521 ends the dialogue: the
    server must hang up after it (Postfix's smtpd_chat_reply does, whatever follows the code), else "still open"."""
    client = await SmtpClient.connect(port)
    got = []
    try:
        for command in commands:
            try:
                reply = await client.cmd(command)
            except (ConnectionResetError, BrokenPipeError):
                got.append("closed")
                break
            got.append("closed" if reply.code is None else compared(reply.text))
            if reply.code in (421, 521) and not await client.closed(timeout=3):
                got.append("still open")
            if reply.code is None or reply.code in (221, 421, 521):
                break
    finally:
        await client.close()
    return got


def differences(sessions: dict[str, list[str | bytes]], postfix: dict[str, list[str]], mailflow: dict[str, list[str]],
                as_compared=lambda text: text) -> dict[str, list[tuple]]:
    """Per session, (command, Postfix's reply, mailflow's) where they differ."""
    found = {}
    for name, commands in sessions.items():
        pairs = zip(commands, postfix[name] + ["-"] * len(commands), mailflow[name] + ["-"] * len(commands))
        odd = [(c, theirs, ours) for c, theirs, ours in pairs if as_compared(theirs) != as_compared(ours)]
        if odd:
            found[name] = odd
    return found


async def replay(port: int, sessions: dict[str, list[str | bytes]]) -> dict[str, list[str]]:
    return {name: await dialogue(port, commands) for name, commands in sessions.items()}


async def settled_log(pf) -> list[str]:
    """A private Postfix's log lines once every smtpd session so far (the readiness probe's and the test's) has
    logged its disconnect (`sessions_ended`: postlogd writes a moment after the replies)."""
    ended = await pf.sessions_ended()
    return pf.maillog[:ended].splitlines()


def discard_lines(lines) -> list[str]:
    return [line[line.index("discarding EHLO"):] for line in lines if "discarding EHLO keywords" in line]


# --------------------------------------------------------------------------------- discard_ehlo_keywords

DISCARDED = "pipelining, DSN, chunking, 8bitmime, size, etrn, vrfy, smtputf8, xclient"
DISCARD_SESSIONS: dict[str, list[str | bytes]] = {
    "DSN and SMTPUTF8 parameters, BODY and SIZE still taken": [
        "EHLO c.test", M + " RET=FULL", M + " ENVID=x", M + " SMTPUTF8", M + " RET", M + " BODY=8BITMIME SIZE=100",
        R + " NOTIFY=NEVER", R + " ORCPT=rfc822;alice@local.test", R + " NOTIFY", R, "DATA",
        "Subject: x\r\n\r\nbody\r\n."],
    "BDAT refused and the session closed": ["EHLO c.test", M, R, b"BDAT 4 LAST\r\nab", "NOOP"],
    "VRFY still answered; its SMTPUTF8 word part of its address": [
        "EHLO c.test", "VRFY alice@local.test", "VRFY alice@local.test SMTPUTF8"],
    "PIPELINING unannounced: pipelining where RFC 2920 allows it still taken": [
        "EHLO c.test", (M + "\r\n" + R).encode(), "RSET"],
}


async def test_discarded_ehlo_keywords_are_neither_announced_nor_accepted_as_in_postfix(mailflow_server, caplog):
    caplog.set_level(logging.INFO, logger="mailflow")
    async with postfix_instance({**POSTFIX_BASE, "smtpd_discard_ehlo_keywords": DISCARDED}) as pf:
        postfix = await replay(pf.port, DISCARD_SESSIONS)
        postfix_logged = discard_lines(await settled_log(pf))
    mailflow = await replay(await start_mailflow(mailflow_server, discard_ehlo_keywords=[DISCARDED]), DISCARD_SESSIONS)
    assert mailflow == postfix
    assert discard_lines(r.getMessage() for r in caplog.records) == postfix_logged
    # the edges themselves, so that a change on both sides cannot pass unnoticed
    first = postfix["DSN and SMTPUTF8 parameters, BODY and SIZE still taken"]
    assert first[:4] == ["250 EHLO ENHANCEDSTATUSCODES", "501 5.7.1 DSN support is disabled",
                         "501 5.7.1 DSN support is disabled", "555 5.5.4 Unsupported option: SMTPUTF8"]
    assert first[6:8] == ["501 5.7.1 DSN support is disabled"] * 2
    assert postfix["BDAT refused and the session closed"][-1] == "521 5.5.1 Error: command not implemented"
    assert postfix["VRFY still answered; its SMTPUTF8 word part of its address"][1:] == [
        "252 2.0.0 alice@local.test", "501 5.1.3 Bad recipient address syntax"]
    assert postfix_logged[0] == ("discarding EHLO keywords: 8BITMIME ETRN PIPELINING SIZE VRFY XCLIENT DSN "
                                 "EHLO_MASK_SMTPUTF8 CHUNKING")


@pytest.mark.parametrize("words", ["silent-discard, dsn", "enhancedstatuscodes, dsn"])
async def test_silent_discard_and_a_discarded_enhancedstatuscodes_log_nothing_as_in_postfix(mailflow_server, caplog,
                                                                                            words):
    """`silent-discard` keeps the line out of the log; so does discarding ENHANCEDSTATUSCODES (Postfix 3.7's
    ehlo_cmd logs only while that one is announced)."""
    caplog.set_level(logging.INFO, logger="mailflow")
    sessions = {"EHLO, then a DSN parameter": ["EHLO c.test", M + " RET=HDRS", "NOOP"]}
    async with postfix_instance({**POSTFIX_BASE, "smtpd_discard_ehlo_keywords": words}) as pf:
        postfix = await replay(pf.port, sessions)
        postfix_logged = discard_lines(await settled_log(pf))
    assert await replay(await start_mailflow(mailflow_server, discard_ehlo_keywords=[words]), sessions) == postfix
    assert discard_lines(r.getMessage() for r in caplog.records) == postfix_logged == []
    assert postfix["EHLO, then a DSN parameter"][1] == "501 5.7.1 DSN support is disabled"


async def test_smtputf8_is_discarded_by_the_name_postfix_logs_it_under_too(mailflow_server):
    """Postfix 3.7 logs a discarded SMTPUTF8 as EHLO_MASK_SMTPUTF8 (its table's first name for it): a list copied
    from that log line discards it there, and here."""
    sessions = {"EHLO, then SMTPUTF8": ["EHLO c.test", M + " SMTPUTF8"]}
    async with postfix_instance({**POSTFIX_BASE, "smtpd_discard_ehlo_keywords": "EHLO_MASK_SMTPUTF8"}) as pf:
        postfix = await replay(pf.port, sessions)
    port = await start_mailflow(mailflow_server, discard_ehlo_keywords=["EHLO_MASK_SMTPUTF8"])
    assert await replay(port, sessions) == postfix
    ehlo, mail = postfix["EHLO, then SMTPUTF8"]
    assert "SMTPUTF8" not in ehlo and mail == "555 5.5.4 Unsupported option: SMTPUTF8"


ADDRESS_MAPS = {"found, its unknown word skipped": "inline:{ {127.0.0.1 = pipelining, DSN, bogus} }",
                "not found: the default list": "inline:{192.0.2.1=dsn}",
                "a table that cannot answer: 421 at EHLO": "fail:x"}


@pytest.mark.parametrize("maps", ADDRESS_MAPS.values(), ids=ADDRESS_MAPS.keys())
async def test_discard_ehlo_keyword_address_maps_choose_by_the_client_address_as_in_postfix(mailflow_server, caplog,
                                                                                            maps):
    caplog.set_level(logging.INFO, logger="mailflow")
    sessions = {"EHLO, a DSN parameter": ["EHLO c.test", M + " RET=FULL", "NOOP"]}
    async with postfix_instance({**POSTFIX_BASE, "smtpd_discard_ehlo_keyword_address_maps": maps,
                                 "smtpd_discard_ehlo_keywords": "chunking"}) as pf:
        postfix = await replay(pf.port, sessions)
        postfix_log = [line.split("]: ", 1)[1] for line in await settled_log(pf)
                       if "/smtpd[" in line]
    port = await start_mailflow(mailflow_server, discard_ehlo_keyword_address_maps=[maps],
                                discard_ehlo_keywords=["chunking"])
    assert await replay(port, sessions) == postfix
    wanted = ("discarding EHLO", "don't know", "reject:")
    ours = [("warning: " if r.levelname == "WARNING" else "") + r.getMessage() for r in caplog.records]
    assert [compared(line) for line in ours if any(w in line for w in wanted)] == [
        compared(line) for line in postfix_log if any(w in line for w in wanted)]
    replies = postfix["EHLO, a DSN parameter"]
    if maps == "fail:x":
        assert replies == ["421 4.3.0 HOST Server local data error"]
    else:
        assert ("DSN" in replies[0]) == (maps != ADDRESS_MAPS["found, its unknown word skipped"])


# ----------------------------------------------------------------- AUTH: discarded, or hidden from some clients

AUTH_SESSIONS: dict[str, list[str | bytes]] = {"EHLO, then AUTH": ["EHLO c.test", ALICE_PLAIN, "NOOP"]}


@pytest.fixture(scope="module")
def sasl_dovecot():
    with dovecot_instance() as dovecot:
        yield dovecot


async def auth_replies(mailflow_server, sasl_dovecot, postfix_settings: dict, smtpd: dict) -> tuple[dict, dict]:
    """The AUTH sessions' replies from a Postfix with Dovecot SASL (no TLS required: the test is on loopback) and
    from mailflow asking the same Dovecot, each with its settings added."""
    async with postfix_instance({**POSTFIX_BASE, "smtpd_sasl_auth_enable": "yes", "smtpd_sasl_type": "dovecot",
                                 "smtpd_sasl_path": str(sasl_dovecot.auth_socket), **postfix_settings}) as pf:
        postfix = await replay(pf.port, AUTH_SESSIONS)
    port = await start_mailflow(mailflow_server, sasl_auth_enable=True, sasl_type="dovecot",
                                sasl_path=str(sasl_dovecot.auth_socket), allow_plaintext_auth_on_loopback=True,
                                auth_failure_delay=0, **smtpd)
    return postfix, await replay(port, AUTH_SESSIONS)


async def test_auth_discarded_is_neither_offered_nor_accepted_as_in_postfix(mailflow_server, sasl_dovecot):
    postfix, mailflow = await auth_replies(mailflow_server, sasl_dovecot, {"smtpd_discard_ehlo_keywords": "auth"},
                                           {"discard_ehlo_keywords": ["auth"]})
    assert mailflow == postfix
    ehlo, auth, _ = postfix["EHLO, then AUTH"]
    assert "AUTH" not in ehlo and auth == "503 5.5.1 Error: authentication not enabled"


async def test_auth_is_not_offered_to_sasl_exceptions_networks_but_still_taken_as_in_postfix(mailflow_server,
                                                                                             sasl_dovecot):
    postfix, mailflow = await auth_replies(mailflow_server, sasl_dovecot,
                                           {"smtpd_sasl_exceptions_networks": "127.0.0.0/8"},
                                           {"sasl_exceptions_networks": ["127.0.0.0/8"]})
    assert mailflow == postfix
    ehlo, auth, _ = postfix["EHLO, then AUTH"]
    assert "AUTH" not in ehlo and auth == "235 2.7.0 Authentication successful"


async def test_sasl_exceptions_networks_that_cannot_answer_end_the_session_at_ehlo_as_in_postfix(
        mailflow_server, sasl_dovecot, caplog):
    """Postfix cannot tell whether to announce AUTH (a file that is not there): 421 4.3.0 and the end of the session
    (cant_announce_feature), never AUTH offered to a client the list would have hidden it from."""
    caplog.set_level(logging.INFO, logger="mailflow")
    missing = "texthash:/nonexistent/sasl_exceptions"
    postfix, mailflow = await auth_replies(mailflow_server, sasl_dovecot, {"smtpd_sasl_exceptions_networks": missing},
                                           {"sasl_exceptions_networks": [missing]})
    assert mailflow == postfix == {"EHLO, then AUTH": ["421 4.3.0 HOST Server local data error"]}
    logged = [r.getMessage() for r in caplog.records]
    assert "don't know if EHLO feature AUTH should be announced to localhost[127.0.0.1]" in logged
    assert "NOQUEUE: reject: EHLO from localhost[127.0.0.1]: 421 4.3.0 mx.mailflow.test Server local data error" in (
        logged)


async def test_auth_is_offered_to_a_client_outside_sasl_exceptions_networks(mailflow_server, sasl_dovecot):
    port = await start_mailflow(mailflow_server, sasl_auth_enable=True, sasl_type="dovecot",
                                sasl_path=str(sasl_dovecot.auth_socket), allow_plaintext_auth_on_loopback=True,
                                sasl_exceptions_networks=["192.0.2.0/24", "!127.0.0.1"])
    assert "AUTH PLAIN LOGIN" in (await dialogue(port, ["EHLO c.test"]))[0]


async def test_starttls_discarded_is_neither_offered_nor_accepted_as_in_postfix(mailflow_server, pki):
    """Postfix 3.7's starttls_cmd answers a discarded STARTTLS as one without TLS: `502 5.5.1 Error: command not
    implemented` (the private Postfix's words, which has no certificate); here on a listener with a certificate,
    beside one that offers it."""
    _, cert, _ = pki
    mf = await mailflow_server(smtpd={"tls_cert_file": cert, "listeners": [
        {"address": "127.0.0.1:0", "role": "mta", "overrides": {"discard_ehlo_keywords": ["starttls"]}}]})
    offered, discarded = [await dialogue(port, ["EHLO c.test", "STARTTLS"]) for _, port in mf.smtp_addresses]
    assert "STARTTLS" in offered[0] and offered[1] == "220 2.0.0 Ready to start TLS"
    assert "STARTTLS" not in discarded[0] and discarded[1] == "502 5.5.1 Error: command not implemented"


async def test_a_listener_may_discard_keywords_of_its_own(mailflow_server):
    """Per listener, as master.cf's `-o smtpd_discard_ehlo_keywords=...`."""
    mf = await mailflow_server(smtpd={"listeners": [
        {"address": "127.0.0.1:0", "role": "mta", "overrides": {"discard_ehlo_keywords": ["chunking"]}}]})
    ports = [port for _, port in mf.smtp_addresses]
    replies = [await dialogue(port, ["EHLO c.test"]) for port in ports]
    assert ["CHUNKING" in reply[0] for reply in replies] == [True, False]


# ------------------------------------------------------------------------------- sasl_authenticated_header

SUBMITTED = ["EHLO c.test", ALICE_PLAIN, "MAIL FROM:<alice@example.test>", "RCPT TO:<x@elsewhere.test>", "DATA",
             "Subject: submitted\r\n\r\nhi\r\n.", "QUIT"]


def received(header_section: str) -> str:
    """The first Received header field, its lines as written, the server's name, queue id and date out (where the
    date goes, on the `for` line or the next, differs: not compared)."""
    found = re.search(r"^Received: .*?\n(?=\S)", header_section.replace("\r\n", "\n"), re.S | re.M)
    assert found, header_section
    field = re.sub(r"\tby \S+ \(\w+\) with (\w+) id \w+", r"\tby HOST with \1 id QID", found.group(0))
    return re.sub(r";\s.*", ";", field, flags=re.S)


async def test_the_received_header_names_the_login_as_in_postfix(mailflow_server, sasl_dovecot, smtp_peer):
    async with postfix_instance({**POSTFIX_BASE, "smtpd_sasl_auth_enable": "yes", "smtpd_sasl_type": "dovecot",
                                 "smtpd_sasl_path": str(sasl_dovecot.auth_socket),
                                 "smtpd_sasl_authenticated_header": "yes"}) as pf:
        assert (await dialogue(pf.port, SUBMITTED))[-2] == "250 2.0.0 Ok: queued as QID"
        [queue_id] = await eventually(lambda: re.findall(r"([0-9A-F]+): client=", pf.maillog), timeout=10)
        theirs = received(pf.run("postcat", "-hq", queue_id).stdout.decode())
    peer = await smtp_peer()
    mf = await mailflow_server(mydestination=["local.test"], relayhost=f"[127.0.0.1]:{peer.port}", smtpd={
        "sasl_auth_enable": True, "sasl_type": "dovecot", "sasl_path": str(sasl_dovecot.auth_socket),
        "allow_plaintext_auth_on_loopback": True, "sasl_authenticated_header": True})
    assert (await dialogue(mf.smtp_addresses[0][1], SUBMITTED))[-2] == "250 2.0.0 Ok: queued as QID"
    [message] = await eventually(lambda: peer.messages)
    assert received(message.content.decode()) == theirs == (
        f"Received: from c.test (localhost [127.0.0.1])\n\t(Authenticated sender: {ALICE})\n"
        "\tby HOST with ESMTPA id QID\n\tfor <x@elsewhere.test>;")


def test_a_login_is_made_safe_for_the_comment_as_postfix_makes_it():
    assert comment_sanitized("a(b") == "a(b)"
    assert comment_sanitized("a)b\\c") == "a?b?c"
    assert comment_sanitized("(x)\u00e9") == "(x)??"  # byte by byte


# --------------------------------------------------------------------------------- strict_rfc821_envelopes

STRICT_SESSIONS: dict[str, list[str | bytes]] = {
    "paths with and without angle brackets": [
        "EHLO c.test", "MAIL FROM:s@remote.test", "MAIL FROM: <s@remote.test>", "RSET", "MAIL FROM:<>", "RSET",
        "MAIL FROM:<s@remote.test> SIZE=10", "RCPT TO:alice@local.test", "RCPT TO: alice@local.test NOTIFY=NEVER",
        "RCPT TO:postmaster", "RCPT TO:<postmaster>", "RCPT TO:<@hop.test:alice@local.test>",
        "RCPT TO:<<alice@local.test>>", 'RCPT TO:<"alice"@local.test>', "RCPT TO:<alice@local.test> NOTIFY=NEVER",
        "RCPT TO:<alice@local.test>x"],
    "a source route after a blank inside the brackets": [  # (strict Postfix cuts a route only where `@` is first)
        "EHLO c.test", "MAIL FROM:< @r.test:s@remote.test>", "RSET", "MAIL FROM:<@r.test:s@remote.test >",
        "RCPT TO:< @local.test:x@evil.test>", "RCPT TO:<\t@evil.test:alice@local.test>",
        "RCPT TO:< @evil.test:alice@local.test>"],
    "a source route inside a nested pair": [  # (strict Postfix: not right after the first `<`, refused)
        "EHLO c.test", "MAIL FROM:< <@r.test:s@remote.test>>", "RSET", "MAIL FROM:<\t<@r.test:s@remote.test> >",
        "RSET", "MAIL FROM:<<@r.test:s@remote.test>>", "RSET", "MAIL FROM:<s@remote.test>",
        "RCPT TO:< <@evil.test:alice@local.test>>",
        "RCPT TO:< <@local.test:x@evil.test>>", "RCPT TO:<<@local.test:x@evil.test>>"],
    "two pairs at most, the outer one only where the word ends in it": [  # (501 from Postfix, strict or not)
        "EHLO c.test", "MAIL FROM:<<<s@remote.test> > >", "MAIL FROM:<< <s@remote.test>> >",
        "MAIL FROM:<<<s@remote.test>>>", "MAIL FROM:<<s@remote.test>>(c)", "MAIL FROM:< <s@remote.test> >(c)",
        "MAIL FROM:<s@remote.test>", "RCPT TO:<<<x@evil.test> > >", "RCPT TO:<<<alice@local.test>> >",
        "RCPT TO:<<alice@local.test> >(c)", "VRFY <<alice@local.test>>(c)", "VRFY <<<alice@local.test> > >"],
    "blanks at the ends around a nested path": [
        "EHLO c.test", "MAIL FROM:<Joe <s@remote.test> >", "RSET", 'MAIL FROM:<"Joe" <s@remote.test> >', "RSET",
        "MAIL FROM:< <s@remote.test> >", "RCPT TO:<< alice@local.test> >", "RCPT TO:<<alice@local.test>(c)>",
        "RCPT TO:< <alice@local.test>>", "RCPT TO:<\t<alice@local.test>\t>", "VRFY <Joe <alice@local.test> >",
        "VRFY < <alice@local.test> >"],
    "blanks, comments and phrases inside the brackets": [  # (strict: blanks at the ends taken, the others refused)
        "EHLO c.test", "MAIL FROM:< >", "RSET", "MAIL FROM:<s@remote.test >", "RCPT TO:<alice@local.test\t>",
        "RCPT TO:< alice@local.test>", "RCPT TO:<alice@local.test (c)>", "RCPT TO:<alice@local.test>(c)",
        'RCPT TO:"Joe"<alice@local.test>', "RCPT TO:<Joe <alice@local.test>>", 'RCPT TO:<"ali(c)ce"@local.test>',
        'RCPT TO:<"a(b)"@local.test>'],
    "VRFY, never strict": [  # (Postfix's vrfy_cmd reads its argument as MAIL's and RCPT's, always SLOPPY)
        "EHLO c.test", "VRFY <alice@local.test>(c)", "VRFY <Joe <alice@local.test>>", "VRFY <alice@local.test >",
        "VRFY Joe <alice@local.test>", "VRFY alice@local.test (c)", "VRFY <ali(c)ce@local.test>",
        "VRFY <alice@local.test> <alice@local.test>", "VRFY Jo(c)e <alice@local.test>",
        "VRFY <alice@local.test> (c)", "VRFY <alice@local.test>\t(c)", "VRFY (c) <alice@local.test>"],
}


def illegal(lines) -> list[str]:
    return [line[line.index("Illegal"):] for line in lines if "Illegal address syntax" in line]


@pytest.mark.parametrize("strict", [True, False])
async def test_strict_rfc821_envelopes_refuses_paths_without_brackets_as_postfix(mailflow_server, caplog, strict):
    caplog.set_level(logging.INFO, logger="mailflow")
    async with postfix_instance({**POSTFIX_BASE, "strict_rfc821_envelopes": "yes" if strict else "no"}) as pf:
        postfix = await replay(pf.port, STRICT_SESSIONS)
        postfix_warned = illegal(await settled_log(pf))
    mailflow = await replay(await start_mailflow(mailflow_server, strict_rfc821_envelopes=strict), STRICT_SESSIONS)
    assert mailflow == postfix
    assert illegal(r.getMessage() for r in caplog.records) == postfix_warned
    deep = postfix["two pairs at most, the outer one only where the word ends in it"]
    assert [reply[:3] for reply in deep[1:]] == ["501"] * 5 + ["250"] + ["501"] * 5
    taken = ["<alice@local.test>(c)", "<Joe <alice@local.test>>", "<alice@local.test >", "Joe <alice@local.test>",
             "alice@local.test (c)"]
    assert postfix["VRFY, never strict"][1:] == [f"252 2.0.0 {form}" for form in taken] + [
        "501 5.1.3 Bad recipient address syntax"] * 2 + ["252 2.0.0 Jo(c)e <alice@local.test>"] + [
        f"252 2.0.0 {form}" for form in ("<alice@local.test> (c)", "<alice@local.test> (c)", "(c) <alice@local.test>")]
    replies = postfix["paths with and without angle brackets"]
    if strict:
        assert replies[1:3] == ["501 5.1.7 Bad sender address syntax", "250 2.1.0 Ok"]
        assert replies[7:11] == ["501 5.1.3 Bad recipient address syntax"] * 3 + ["250 2.1.5 Ok"]
        dressed = postfix["blanks, comments and phrases inside the brackets"]
        assert dressed[1:-2] == ["250 2.1.0 Ok", "250 2.0.0 Ok", "250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok"] + [
            "501 5.1.3 Bad recipient address syntax"] * 4
        assert [reply[:10] for reply in dressed[-2:]] == ["550 5.1.1 "] * 2  # (a quoted `(`: no comment, judged)
        nested = postfix["blanks at the ends around a nested path"]  # (taken, but not with a phrase or comment)
        assert [reply[:3] for reply in nested[1:]] == ["501", "250", "501", "250", "250", "250", "501", "250", "250",
                                                        "252", "252"]
        routed = postfix["a source route after a blank inside the brackets"]
        assert [reply[:3] for reply in routed[1:]] == ["501", "250", "250", "501", "501", "501"]
        nested_routes = postfix["a source route inside a nested pair"]
        assert [reply[:3] for reply in nested_routes[1:]] == ["501", "250"] * 3 + ["250"] + ["501"] * 3
        assert [line.split(" in ")[1] for line in postfix_warned[:2]] == ["MAIL command: s@remote.test",
                                                                          "RCPT command: alice@local.test"]
    else:  # Postfix's default: taken without them
        assert (replies[1], replies[7]) == ("250 2.1.0 Ok", "250 2.1.5 Ok")


# ---------------------------------------------------------------------------------- unknown_*_reject_code

CODES = {"unknown_local_recipient_reject_code": 450, "unknown_virtual_alias_reject_code": 551,
         "unknown_virtual_mailbox_reject_code": 452, "unknown_relay_recipient_reject_code": 553}
UNKNOWN_SESSIONS: dict[str, list[str | bytes]] = {
    "an unknown user of each class, a known one, VRFY": [
        "EHLO c.test", M, "RCPT TO:<nobody@local.test>", "RCPT TO:<nobody@valias.test>", "RCPT TO:<nobody@vmbox.test>",
        "RCPT TO:<nobody@relay.test>", R, "RCPT TO:<a@valias.test>", "RCPT TO:<m@vmbox.test>", "RCPT TO:<r@relay.test>",
        "VRFY nobody@local.test"],
    "an error: transport, 5.X.X or 4.X.X: 550 (the status's class follows the code)": [
        "EHLO c.test", M, "RCPT TO:<x@err.test>", "RCPT TO:<y@err4.test>", "RCPT TO:<gone@local.test>"],
    "reject_unlisted_sender: an unknown sender of each class, an error: transport's": [
        "EHLO c.test", *(command for sender in ("nobody@local.test", "nobody@valias.test", "nobody@vmbox.test",
                                                "nobody@relay.test", "x@err.test", "y@err4.test", "")
                         for command in (f"MAIL FROM:<{sender}>", "RCPT TO:<alice@local.test>", "RSET"))],
}
ERRORS = ("inline:{ {err.test = error:5.1.2 no such host} {err4.test = error:4.7.0 later} "
          "{gone@local.test = error:gone} }")


@pytest.mark.parametrize("codes", [CODES, {}], ids=["set", "defaults"])
async def test_the_unknown_user_refusal_has_each_class_code_as_in_postfix(mailflow_server, codes):
    async with postfix_instance({**POSTFIX_BASE, "virtual_alias_domains": "valias.test",
                                 "virtual_alias_maps": "inline:{a@valias.test=alice@local.test}",
                                 "virtual_mailbox_domains": "vmbox.test",
                                 "virtual_mailbox_maps": "inline:{m@vmbox.test=m/}",
                                 "relay_recipient_maps": "inline:{r@relay.test=ok}", "transport_maps": ERRORS,
                                 "smtpd_sender_restrictions": "reject_unlisted_sender",
                                 **{name: str(code) for name, code in codes.items()}}) as pf:
        postfix = await replay(pf.port, UNKNOWN_SESSIONS)
    mf = await mailflow_server(mydestination=["local.test"], local_recipient_maps=["inline:{alice=ok}"],
                               relayhost="[127.0.0.1]:9", relay_domains=["relay.test"],
                               virtual_alias_domains=["valias.test"],
                               virtual_alias_maps=["inline:{a@valias.test=alice@local.test}"],
                               virtual_mailbox_domains=["vmbox.test"],
                               virtual_mailbox_maps=["inline:{m@vmbox.test=m/}"],
                               relay_recipient_maps=["inline:{r@relay.test=ok}"], transport_maps=[ERRORS],
                               mynetworks=["127.0.0.0/8"],
                               smtpd={"disable_vrfy_command": False, "relay_restrictions": [
                                   "permit_mynetworks", "reject_unauth_destination"],
                                   "sender_restrictions": ["reject_unlisted_sender"], **codes})
    assert await replay(mf.smtp_addresses[0][1], UNKNOWN_SESSIONS) == postfix
    replies = postfix["an unknown user of each class, a known one, VRFY"]
    if codes:
        assert replies[2:6] == [
            "450 4.1.1 <nobody@local.test>: Recipient address rejected: User unknown in local recipient table",
            "551 5.1.1 <nobody@valias.test>: Recipient address rejected: User unknown in virtual alias table",
            "452 4.1.1 <nobody@vmbox.test>: Recipient address rejected: User unknown in virtual mailbox table",
            "553 5.1.1 <nobody@relay.test>: Recipient address rejected: User unknown in relay recipient table"]
        assert replies[-1].startswith("450 4.1.1 <nobody@local.test>")
    assert replies[6:10] == ["250 2.1.5 Ok"] * 4
    errors = postfix["an error: transport, 5.X.X or 4.X.X: 550 (the status's class follows the code)"]
    assert errors[3] == "550 5.7.0 <y@err4.test>: Recipient address rejected: later"
    senders = postfix["reject_unlisted_sender: an unknown sender of each class, an error: transport's"]
    assert senders[2::3] == [  # (the RCPT after each MAIL)
        f"{code} {dsn} <{sender}>: Sender address rejected: {why}" for code, dsn, sender, why in [
            (450 if codes else 550, "4.1.0" if codes else "5.1.0", "nobody@local.test",
             "User unknown in local recipient table"),
            (551 if codes else 550, "5.1.7", "nobody@valias.test", "User unknown in virtual alias table"),
            (452 if codes else 550, "4.1.0" if codes else "5.1.0", "nobody@vmbox.test",
             "User unknown in virtual mailbox table"),
            (553 if codes else 550, "5.1.0", "nobody@relay.test", "User unknown in relay recipient table"),
            (550, "5.1.8", "x@err.test", "no such host"), (550, "5.7.0", "y@err4.test", "later")]] + [
        "250 2.1.5 Ok"]


# ------------------------------------------------- the restriction codes: access_map_*, reject, defer, relay, names

RESTRICTION_CODES = {"access_map_reject_code": 553, "access_map_defer_code": 451, "reject_code": 550,
                     "defer_code": 452, "relay_domains_reject_code": 551, "invalid_hostname_reject_code": 555,
                     "non_fqdn_reject_code": 450}
# 4xx refusals: the enhanced codes follow; a relay code of 4xx leaves defer_unauth_destination a 3xx, which
# Postfix's smtpd_check_reject answers with its generic 450 4.7.1 Service unavailable
RESTRICTION_CODES_4XX = {"access_map_reject_code": 450, "access_map_defer_code": 550, "reject_code": 451,
                         "defer_code": 554, "relay_domains_reject_code": 450, "invalid_hostname_reject_code": 453,
                         "non_fqdn_reject_code": 554}
CODE_CLASSES = {  # one restriction class per recipient (check_recipient_access chooses it)
    "c_reject": ["reject"], "c_defer": ["defer"],
    "c_tabrej": ["check_sender_access inline:{ {s@remote.test=REJECT 5.1.2 gone} }"],
    "c_tabrej2": ["check_client_access inline:{ {127.0.0.1=REJECT} }"],
    "c_tabdef": ["check_sender_access inline:{ {s@remote.test=DEFER} }"],
    "c_dip": ["check_sender_access inline:{ {s@remote.test=DEFER_IF_PERMIT later} }", "permit"],
    "c_dir": ["check_sender_access inline:{ {s@remote.test=DEFER_IF_REJECT} }", "reject"],
    "c_relay": ["reject_unauth_destination"], "c_drelay": ["defer_unauth_destination"],
    "c_nfhelo": ["reject_non_fqdn_helo_hostname"], "c_nfsender": ["reject_non_fqdn_sender"],
    "c_nfrcpt": ["reject_non_fqdn_recipient"], "c_invhelo": ["reject_invalid_helo_hostname"],
}
CODE_RECIPIENTS = "inline:{" + ", ".join(f"{name[2:]}@local.test={name}" for name in CODE_CLASSES) + \
    ", far.test=c_relay, far2.test=c_drelay, nfrcpt=c_nfrcpt}"
CODE_SESSIONS: dict[str, list[str | bytes]] = {
    "reject, defer, the access actions, relaying": [
        "EHLO c.test", M, *(f"RCPT TO:<{name[2:]}@local.test>" for name in (
            "c_reject", "c_defer", "c_tabrej", "c_tabrej2", "c_tabdef", "c_dip", "c_dir")),
        "RCPT TO:<x@far.test>", "RCPT TO:<x@far2.test>", "RCPT TO:<alice@local.test>"],
    "names not fully qualified": ["EHLO c", "MAIL FROM:<s>", "RCPT TO:<nfhelo@local.test>",
                                  "RCPT TO:<nfsender@local.test>", "RCPT TO:<x@nfrcpt>"],
    "an invalid HELO name": ["HELO bad..name", M, "RCPT TO:<invhelo@local.test>"],
}


@pytest.mark.parametrize("codes", [RESTRICTION_CODES, RESTRICTION_CODES_4XX, {}], ids=["set", "4xx", "defaults"])
async def test_the_restriction_codes_are_postfix_s_settings(mailflow_server, codes, caplog):
    """access_map_reject_code and access_map_defer_code (an access table's REJECT, DEFER, DEFER_IF_PERMIT and
    DEFER_IF_REJECT), reject_code and defer_code (the reject and defer items), relay_domains_reject_code
    (reject_unauth_destination; less 100: defer_unauth_destination), invalid_hostname_reject_code and
    non_fqdn_reject_code: mailflow had none of them (its replies were always Postfix's defaults)."""
    classes = {name: ", ".join(items) for name, items in CODE_CLASSES.items()}
    async with postfix_instance({**POSTFIX_BASE, "smtpd_restriction_classes": ", ".join(CODE_CLASSES),
                                 **classes, "smtpd_recipient_restrictions": f"check_recipient_access {CODE_RECIPIENTS}",
                                 **{name: str(code) for name, code in codes.items()}}) as pf:
        postfix = await replay(pf.port, CODE_SESSIONS)
        postfix_warnings = [line.partition(": warning: ")[2] for line in await settled_log(pf)
                            if ": warning: " in line and "configuration error" in line]
    port = await start_mailflow(mailflow_server, restriction_classes=CODE_CLASSES,
                                recipient_restrictions=[f"check_recipient_access {CODE_RECIPIENTS}"], **codes)
    caplog.set_level(logging.WARNING, "mailflow.smtpd")
    assert differences(CODE_SESSIONS, postfix, await replay(port, CODE_SESSIONS)) == {}
    assert [r.getMessage() for r in caplog.records if "configuration error" in r.getMessage()] == postfix_warnings
    replies = postfix["reject, defer, the access actions, relaying"]
    if codes == RESTRICTION_CODES:
        assert replies[2:11] == [
            "550 5.7.1 <reject@local.test>: Recipient address rejected: Access denied",
            "452 4.3.2 <defer@local.test>: Recipient address rejected: Try again later",
            "553 5.1.8 <s@remote.test>: Sender address rejected: gone",
            "553 5.7.1 <localhost[127.0.0.1]>: Client host rejected: Access denied",
            "451 4.7.1 <s@remote.test>: Sender address rejected: Access denied",
            "451 4.7.1 <s@remote.test>: Sender address rejected: later",
            "451 4.7.1 <s@remote.test>: Sender address rejected: Service unavailable",
            "551 5.7.1 <x@far.test>: Relay access denied", "451 4.7.1 <x@far2.test>: Relay access denied"]
        assert postfix["names not fully qualified"][2:] == [
            "450 4.5.2 <c>: Helo command rejected: need fully-qualified hostname",
            "450 4.5.2 <s>: Sender address rejected: need fully-qualified address",
            "450 4.5.2 <x@nfrcpt>: Recipient address rejected: need fully-qualified address"]
        assert postfix["an invalid HELO name"][-1] == "555 5.5.2 <bad..name>: Helo command rejected: Invalid name"
    if codes == RESTRICTION_CODES_4XX:
        assert replies[10] == "450 4.7.1 Service unavailable"
        assert postfix_warnings == ["SMTP reply code configuration error: 350 4.7.1 <x@far2.test>: Relay access denied"]


HELO_LITERAL_CLASSES = {"c_nfhelo": ["reject_non_fqdn_helo_hostname"], "c_invhelo": ["reject_invalid_helo_hostname"],
                        "c_onfhelo": ["reject_non_fqdn_hostname"], "c_oinvhelo": ["reject_invalid_hostname"],
                        "c_unkhelo": ["reject_unknown_helo_hostname"]}  # (the old names Postfix 3.7 takes too)
HELO_LITERAL_RECIPIENTS = "inline:{" + ", ".join(f"{name[2:]}@local.test={name}" for name in HELO_LITERAL_CLASSES) + "}"
HELO_LITERALS = ["[999.1.1.1]", "[bogus]", "[192.0.2.010]", "[192.0.2.1]", "[IPv6:2001:db8::1]", "[2001:db8::1]",
                 "[ipv6:1.2.3.4]", "[]", "[192.0.2.1", "[0.1.2.3]"]
HELO_LITERAL_SESSIONS: dict[str, list[str | bytes]] = {
    helo: [f"HELO {helo}", M, *(f"RCPT TO:<{name[2:]}@local.test>" for name in HELO_LITERAL_CLASSES)]
    for helo in HELO_LITERALS} | {  # names, for the checks that ask no DNS
    helo: [f"HELO {helo}", M,
           *(f"RCPT TO:<{name[2:]}@local.test>" for name in HELO_LITERAL_CLASSES if "unk" not in name)]
    for helo in ("bad..name", "c", "c.test.", "1.2.3.4")}


async def test_a_helo_address_literal_is_checked_as_an_address_by_each_helo_name_check_as_in_postfix(
        mailflow_server):
    """reject_non_fqdn_helo_hostname, reject_invalid_helo_hostname and reject_unknown_helo_hostname send a HELO that
    starts with `[` to Postfix's reject_invalid_hostaddr: invalid_hostname_reject_code 5.5.2 invalid ip address,
    from all three, leading zeros allowed (mailflow let any literal through the first, called a bad one an
    `Invalid name` in the second and refused `[192.0.2.010]` in the third). The old names reject_non_fqdn_hostname
    and reject_invalid_hostname are the first two (mailflow refused them as unknown)."""
    codes = {"invalid_hostname_reject_code": 555, "non_fqdn_reject_code": 450}
    classes = {name: ", ".join(items) for name, items in HELO_LITERAL_CLASSES.items()}
    async with postfix_instance({**POSTFIX_BASE, "smtpd_restriction_classes": ", ".join(HELO_LITERAL_CLASSES),
                                 **classes, **{name: str(code) for name, code in codes.items()},
                                 "smtpd_recipient_restrictions": f"check_recipient_access {HELO_LITERAL_RECIPIENTS}",
                                 }) as pf:
        postfix = await replay(pf.port, HELO_LITERAL_SESSIONS)
    port = await start_mailflow(mailflow_server, restriction_classes=HELO_LITERAL_CLASSES,
                                recipient_restrictions=[f"check_recipient_access {HELO_LITERAL_RECIPIENTS}"], **codes)
    assert differences(HELO_LITERAL_SESSIONS, postfix, await replay(port, HELO_LITERAL_SESSIONS)) == {}
    invalid = "555 5.5.2 <[999.1.1.1]>: Helo command rejected: invalid ip address"
    assert postfix["[999.1.1.1]"][2:] == [invalid] * 5
    assert [reply[:9] for reply in postfix["[192.0.2.010]"][2:]] == ["550 5.1.1"] * 5  # (past the checks)
    assert [reply[:9] for reply in postfix["c"][2:]] == ["450 4.5.2", "550 5.1.1", "450 4.5.2", "550 5.1.1"]


# ------------------------------------------------------------------------------------------ reject_footer

FOOTERS = [
    r"\nFor help: $server_name $client_address [$client] ${helo_name?helo=$helo_name} s=$sender sd=$sender_domain"
    r" sn=$sender_name r=$recipient rn=$recipient_name rd=$recipient_domain p=$client_port n=$client_name"
    r" rv=$reverse_client_name",
    r"\c (see https://help.test/$client_address)",
    r"one\ntwo\n\cthree ${helo_name:no helo}",
    # Postfix 3's mac_expand forms: {text} operands (whitespace around them ignored), ?: both, relational ones
    r"\n${helo_name?{h=$helo_name}:{no helo}} ${sender_domain? {sd} } ${{$sender_domain}=={remote.test}?{ours}:"
    r"{theirs}} [${{$client_port}<{1}}] ${{$recipient_name} != {} ? {to $recipient_name}} ${recipient?{r}:rr}",
]
FOOTER_SESSIONS: dict[str, list[str | bytes]] = {
    "replies with and without an enhanced code, refusals of each stage, 2xx untouched": [
        "EHLO", "RCPT TO:<a@local.test>", "EHLO c.test", "FOO", "MAIL FROM:<s@remote.test>",
        "RCPT TO:<nobody@local.test>", "RCPT TO:<x@elsewhere.test>", "RCPT TO:<alice@local.test>",
        "RCPT TO:<bob@local.test>", "MAIL FROM:<x@y.test>", "RSET", "MAIL FROM:<>",
        "RCPT TO:<nobody@local.test>", "NOOP", "QUIT"],
    "a refused BDAT hangs up, its 521 with the footer": ["EHLO c.test", "BDAT x"],
    "a 421 from an access table hangs up, footer or not": ["EHLO c.test", M, "RCPT TO:<bye@local.test>", "NOOP"],
    "so does a 521": ["EHLO c.test", M, "RCPT TO:<gone@local.test>", "NOOP"],
}
FOOTER_ACCESS = "check_recipient_access inline:{ {bye@local.test = 421 go away} {gone@local.test = 521 gone} }"


def without_port(text: str) -> str:
    return re.sub(r" p=\d+ ", " p=PORT ", text)


@pytest.mark.parametrize("footer", FOOTERS)
async def test_the_reject_footer_is_under_every_refusal_as_in_postfix(mailflow_server, footer):
    async with postfix_instance({**POSTFIX_BASE, "smtpd_reject_footer": footer,
                                 "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
                                 "smtpd_recipient_restrictions": FOOTER_ACCESS}) as pf:
        postfix = await replay(pf.port, FOOTER_SESSIONS)
    mailflow = await replay(await start_mailflow(mailflow_server, reject_footer=footer,
                                                 recipient_restrictions=[FOOTER_ACCESS]), FOOTER_SESSIONS)
    assert differences(FOOTER_SESSIONS, postfix, mailflow, without_port) == {}
    replies = postfix["replies with and without an enhanced code, refusals of each stage, 2xx untouched"]
    prefixes = ["501-", "503-", "250 ", "500-", "250 ", "550-", "250 ", "250 ", "550-", "503-", "250 ", "250 ", "550-",
                "250 ", "221 "]
    if footer == FOOTERS[1]:  # `\c` and one line: the footer ends the reply's one line, which stays one
        prefixes = [prefix[:3] + " " for prefix in prefixes]
        assert replies[0].endswith(" (see https://help.test/127.0.0.1)") and "\n" not in replies[0]
    assert [r[:4] for r in replies] == prefixes
    for name in ("a 421 from an access table hangs up, footer or not", "so does a 521"):
        assert len(postfix[name]) == 3 and postfix[name][2][:3] in ("421", "521")  # then no "still open"
    if footer == FOOTERS[0]:  # the macros: $recipient is the transaction's first accepted recipient
        assert without_port(replies[8].split("\n")[-1]) == (
            "550 5.1.1 For help: HOST 127.0.0.1 [localhost[127.0.0.1]] helo=c.test s=s@remote.test sd=remote.test"
            " sn=s r=x@elsewhere.test rn=x rd=elsewhere.test p=PORT n=localhost rv=localhost")
    if footer == FOOTERS[3]:
        assert replies[0].split("\n")[-1] == "501 no helo  theirs []  rr"
        assert replies[8].split("\n")[-1] == "550 5.1.1 h=c.test sd ours [] to x r"


def test_the_footer_is_checked_at_load(tmp_path):
    path = tmp_path / "mailflow.toml"
    path.write_text("[smtpd]\nreject_footer = '\\nask $client_adress'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.key) == (str(path), "smtpd.reject_footer")
    assert "unknown macro $client_adress" in info.value.reason


def test_a_footer_that_is_not_ascii_is_refused_at_load(tmp_path):
    """A reply is ASCII (RFC 5321 4.2); without SMTPUTF8 such a footer could not even be sent."""
    path = tmp_path / "mailflow.toml"
    path.write_text("[smtpd]\nreject_footer = '\\nAide : voir https://aide.test/caf\u00e9'\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "smtpd.reject_footer" and "not ASCII" in info.value.reason


def test_a_footer_under_a_multi_line_reply_and_one_without_an_enhanced_code():
    """Postfix's smtp_reply_footer: the reply's lines all become continuation lines; the codes come from its last."""
    assert with_footer("550-5.7.1 first\r\n550 5.7.1 last", False, ["a", "b"]) == (
        "550-5.7.1 first\r\n550-5.7.1 last\r\n550-5.7.1 a\r\n550 5.7.1 b")
    assert with_footer("501 Syntax: EHLO hostname", True, [" (x)", "y"]) == (
        "501-Syntax: EHLO hostname (x)\r\n501 y")


async def test_a_reply_sent_line_by_line_gets_the_footer_once_and_an_empty_line_none():
    """push_lines sends a reply's lines one by one: the footer goes under its last line only (as under one multi-line
    reply); a line that is no reply (empty) is left alone."""
    limits = dataclasses.replace(ProtocolLimits.from_config(DEFAULTS.smtpd), reject_footer=r"\chelp")
    session = ProtocolCore(object(), sessions=set(), protocol=limits, hostname="h.test")
    sent = b"".join(session._reply_bytes(line, True) for line in ["450-4.7.1 a", "450 4.7.1 b"])
    assert sent.decode() == with_footer("450-4.7.1 a\r\n450 4.7.1 b", True, ["help"]) + "\r\n"
    assert sent.decode() == "450-4.7.1 a\r\n450 4.7.1 bhelp\r\n"
    assert session._reply_bytes("", False) == b"\r\n"


async def test_the_footers_reverse_client_name_is_the_name_smtpd_knows(mailflow_server):
    """Documented difference (docs/config.md, reject_footer): $reverse_client_name is the client's name as smtpd
    knows it, here the one XCLIENT NAME gave, not a PTR name looked up apart from the verified one."""
    port = await start_mailflow(mailflow_server, reject_footer=r"\nn=$client_name rv=$reverse_client_name",
                                authorized_xclient_hosts=["127.0.0.1/32"])
    client = await SmtpClient.connect(port)
    await client.cmd("EHLO c.test")
    assert (await client.cmd("XCLIENT NAME=other.test ADDR=192.0.2.9")).code == 220
    await client.cmd("EHLO c.test")
    await client.cmd("MAIL FROM:<s@remote.test>")
    refused = await client.cmd("RCPT TO:<x@elsewhere.test>")
    await client.close()
    assert refused.text.split("\n")[-1] == "554 5.7.1 n=other.test rv=other.test"


async def xclient_name_codes(port: int) -> dict[str, int]:
    codes = {}
    for name in ("1.2.3.4", "a_b.test", "9.example.test", "bad-.test"):
        client = await SmtpClient.connect(port)
        try:
            await client.cmd("EHLO c.test")
            codes[name] = (await client.cmd(f"XCLIENT NAME={name}")).code
        finally:
            await client.close()
    return codes


async def test_xclient_name_is_checked_as_postfix_s_valid_hostname_checks_it(mailflow_server):
    """smtpd.c xclient_cmd: valid_hostname(DONT_GRIPE) or "501 5.5.4 Bad NAME syntax": a numeric name is refused
    (it would pass reject_unknown_client_hostname as a verified name), an underscore taken. mailflow checked
    another syntax and said the other."""
    async with postfix_instance({**POSTFIX_BASE, "smtpd_authorized_xclient_hosts": "127.0.0.0/8"}) as pf:
        postfix = await xclient_name_codes(pf.port)
    port = await start_mailflow(mailflow_server, authorized_xclient_hosts=["127.0.0.0/8"])
    assert await xclient_name_codes(port) == postfix
    assert postfix == {"1.2.3.4": 501, "a_b.test": 220, "9.example.test": 220, "bad-.test": 501}


XCLIENT_ATTRIBUTE_LINES = [
    "XCLIENT NAME=bad-.test", "XCLIENT NAME=a+01b.test", "XCLIENT ADDR=192.0.2.999", "XCLIENT ADDR=IPV6:zz",
    "XCLIENT PORT=x1", "XCLIENT PROTO=LMTP", "XCLIENT FOO=bar", "XCLIENT foo=bar", "XCLIENT ADDR", "XCLIENT ADDR=",
    "XCLIENT FOO=", "XCLIENT HELO=" + "h" * 256, "XCLIENT NAME=ok.test FOO=bar", "XCLIENT HELO=a+2",
    "XCLIENT HELO=a+01b", "XCLIENT NAME=[unavailable] ADDR=[Unavailable]", "XCLIENT proto=esmtp",
    "XCLIENT NAME=a+2db.test", "XCLIENT NAME=a=b.test",
    # REVERSE_NAME, DESTADDR and DESTPORT (mailflow refused them as unknown attributes); a port of five digits is
    # taken whatever its value, an address neutered before it is quoted
    "XCLIENT REVERSE_NAME=1.2.3.4", "XCLIENT REVERSE_NAME=[tempunavail]", "XCLIENT DESTADDR=IPV6:192.0.2.1",
    "XCLIENT DESTADDR=192.0.2.1;", "XCLIENT DESTADDR=[UNAVAILABLE] DESTPORT=[UNAVAILABLE]", "XCLIENT DESTPORT=1x",
    "XCLIENT DESTPORT=65536", "XCLIENT PORT=99999", "XCLIENT PORT=00025", "XCLIENT PORT=123456",
    "XCLIENT ADDR=1.2.3.4<", "XCLIENT NAME=a.test REVERSE_NAME=b.test ADDR=192.0.2.1 DESTADDR=192.0.2.2",
    # an IPv6 address only after "IPv6:", any case (valid_mailhost_addr; an IPv4-mapped one: this Postfix has
    # inet_protocols = ipv4); PROTO has no [UNAVAILABLE] (mailflow took them)
    "XCLIENT ADDR=2001:db8::1", "XCLIENT DESTADDR=2001:db8::1", "XCLIENT ADDR=ipv6:::ffff:192.0.2.12",
    "XCLIENT PROTO=[UNAVAILABLE]", "XCLIENT ADDR=IPv6:::ffff:192.0.2.11",
    # a quoted span is one word, echoed whole (smtpd_token); valid UTF-8 is echoed as it is, sent or xtext-encoded
    # (smtputf8_enable: printable() takes it), an octet outside it is one "?"
    'XCLIENT NAME="a b.test"', "XCLIENT NAME=a.test\u00a0HELO=x", "XCLIENT HELO=\u20ac\u00e9",
    "XCLIENT NAME=a+C3+A9.test", "XCLIENT NAME=a+FF+C3.test", "XCLIENT NAME=a+0A+C3+A9.test"]


async def test_xclient_attribute_errors_are_worded_as_postfix_s(mailflow_server):
    """smtpd.c xclient_cmd, word by word: `Error: attribute=value expected` (no value), `Error: attribute value too
    long` (over 255 octets), the value xtext-decoded (taken as sent when it is not xtext) and masked, then `Bad
    XCLIENT attribute name: FOO` (the name only), then `Bad NAME syntax: value` per attribute. mailflow said
    `Bad XCLIENT attribute value: NAME=...` for all of them, and refused a value that was not xtext."""
    sessions = {line: ["HELO c.test", line] for line in XCLIENT_ATTRIBUTE_LINES}  # (EHLO: 3.7 offers more)
    async with postfix_instance({**POSTFIX_BASE, "smtpd_authorized_xclient_hosts": "127.0.0.0/8"}) as pf:
        postfix = await replay(pf.port, sessions)
    port = await start_mailflow(mailflow_server, authorized_xclient_hosts=["127.0.0.0/8"])
    greeting_by_code = lambda text: "220" if text.startswith("220 ") else text  # noqa: E731 (the banners differ)
    assert differences(sessions, postfix, await replay(port, sessions), greeting_by_code) == {}
    assert postfix["XCLIENT NAME=bad-.test"][1] == "501 5.5.4 Bad NAME syntax: bad-.test"


XCLIENT_NAMED = {  # (a session each: once it names a client outside 127.0.0.0/8, XCLIENT is no longer allowed)
    "refused": ["HELO c.test", "XCLIENT NAME=MiXeD.Test ADDR=192.0.2.9", "HELO c.test", M, "RCPT TO:<x@relay.test>"],
    "queued": ["HELO c.test", "XCLIENT NAME=Other.Test ADDR=192.0.2.9", "HELO c.test", M, "RCPT TO:<x@relay.test>",
               "DATA", "Subject: named\r\n\r\nhi\r\n.", "QUIT"]}


def client_lines(lines) -> list[str]:
    return re.findall(r"\bclient=([^,\s]+)", "\n".join(line for line in lines if ": client=" in line))


async def xclient_message_both_ways(mailflow_server, smtp_peer, script: list[str], restrictions: str = ""):
    """`script` (an XCLIENT dialogue that queues one message) through a private Postfix, then mailflow relaying to a
    peer; their replies must not differ (but for the banner). Returns Postfix's replies, its `client=` lines, its
    Received header, and mailflow's Received header."""
    client_checks = {"smtpd_client_restrictions": restrictions} if restrictions else {}
    async with postfix_instance({**POSTFIX_BASE, "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
                                 **client_checks}) as pf:
        postfix = await replay(pf.port, script)
        [queue_id] = await eventually(lambda: re.findall(r"([0-9A-F]+): client=", pf.maillog), timeout=10)
        postfix_client = client_lines(pf.maillog.splitlines())
        postfix_received = received(pf.run("postcat", "-hq", queue_id).stdout.decode())
    peer = await smtp_peer()
    smtpd = {"authorized_xclient_hosts": ["127.0.0.0/8"], "client_restrictions": [restrictions] if restrictions else []}
    mf = await mailflow_server(mydestination=["local.test"], relayhost=f"[127.0.0.1]:{peer.port}",
                               relay_domains=["relay.test"], smtpd=smtpd)
    greeting_by_code = lambda text: "220" if text.startswith("220 ") else text  # noqa: E731 (the banners differ)
    mailflow = await replay(mf.smtp_addresses[0][1], script)
    assert differences(script, postfix, mailflow, greeting_by_code) == {}
    [message] = await eventually(lambda: peer.messages)
    return postfix, postfix_client, postfix_received, received(message.content.decode())


async def test_the_xclient_name_is_kept_as_given_as_postfix_keeps_it(mailflow_server, smtp_peer, caplog):
    """smtpd.c xclient_cmd keeps NAME's case: replies, the `client=` log line and the Received header name the
    client as the front end wrote it; check_client_access still finds it (table lookups fold the key themselves).
    mailflow lower-cased it."""
    caplog.set_level(logging.INFO, logger="mailflow")
    postfix, postfix_client, postfix_received, mailflow_received = await xclient_message_both_ways(
        mailflow_server, smtp_peer, XCLIENT_NAMED, "check_client_access inline:{mixed.test=REJECT}")
    assert postfix["refused"][4] == "554 5.7.1 <MiXeD.Test[192.0.2.9]>: Client host rejected: Access denied"
    assert mailflow_received == postfix_received
    assert postfix_received.startswith("Received: from c.test (Other.Test [192.0.2.9])")
    assert client_lines(r.getMessage() for r in caplog.records) == postfix_client == ["Other.Test[192.0.2.9]"]


XCLIENT_PARTS = {  # (a session each) what one XCLIENT does not give stays; attributes apply in the order given
    "ADDR keeps the name": ["HELO c.test", "XCLIENT ADDR=192.0.2.9", "HELO c.test", M, "RCPT TO:<x@relay.test>"],
    "a reverse name": ["HELO c.test", "XCLIENT NAME=ok.test REVERSE_NAME=Bad.Test ADDR=192.0.2.9", "HELO c.test", M,
                       "RCPT TO:<x@relay.test>"],
    "NAME after REVERSE_NAME": ["HELO c.test", "XCLIENT REVERSE_NAME=bad.test NAME=ok.test ADDR=192.0.2.9",
                                "HELO c.test", M, "RCPT TO:<x@relay.test>"],
    "judged again on the client named": ["HELO c.test", "XCLIENT NAME=ok.test ADDR=192.0.2.9",
                                         "XCLIENT ADDR=127.0.0.1", "EHLO c.test"],
}


async def test_xclient_changes_only_what_it_gives_as_postfix_does(mailflow_server):
    """smtpd.c xclient_cmd: ADDR alone keeps the client's name (here the front end's, localhost), REVERSE_NAME sets
    the reverse name only, a later NAME sets both; the client it names is judged again for XCLIENT (550 once it is
    outside authorized_xclient_hosts, and EHLO no longer offers it). mailflow reset the name at ADDR, refused
    REVERSE_NAME and judged XCLIENT on the connection's client for the whole session."""
    restrictions = ["check_reverse_client_hostname_access inline:{bad.test=REJECT}",
                    "check_client_access inline:{localhost=REJECT}"]
    async with postfix_instance({**POSTFIX_BASE, "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
                                 "smtpd_client_restrictions": ", ".join(restrictions)}) as pf:
        postfix = await replay(pf.port, XCLIENT_PARTS)
        postfix_ehlo = await ehlo_lines(pf.port)
    port = await start_mailflow(mailflow_server, authorized_xclient_hosts=["127.0.0.0/8"],
                                client_restrictions=restrictions)
    greeting_by_code = lambda text: "220" if text.startswith("220 ") else text  # noqa: E731 (the banners differ)
    assert differences(XCLIENT_PARTS, postfix, await replay(port, XCLIENT_PARTS), greeting_by_code) == {}
    assert postfix["ADDR keeps the name"][-1] == "554 5.7.1 <localhost[192.0.2.9]>: Client host rejected: Access denied"
    assert postfix["a reverse name"][-1] == "554 5.7.1 <Bad.Test>: Unverified Client host rejected: Access denied"
    assert postfix["judged again on the client named"][2] == "550 5.7.0 Error: insufficient authorization"
    offered = [line for line in postfix_ehlo if line.startswith("XCLIENT")]
    assert offered == [line for line in await ehlo_lines(port) if line.startswith("XCLIENT")]
    assert offered == ["XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT"]


async def ehlo_lines(port: int) -> list[str]:
    client = await SmtpClient.connect(port)
    try:
        return (await client.cmd("EHLO c.test")).lines
    finally:
        await client.close()


XCLIENT_ADDR_ONLY = {"queued": ["HELO c.test", "XCLIENT ADDR=192.0.2.9 PORT=99999", "HELO c.test", M,
                                 "RCPT TO:<x@relay.test>", "DATA", "Subject: addr\r\n\r\nhi\r\n.", "QUIT"]}


async def test_xclient_addr_alone_keeps_the_name_in_the_log_and_received_as_postfix(mailflow_server, smtp_peer,
                                                                                    caplog):
    """XCLIENT ADDR without NAME: the `client=` line and the Received header name the new address with the name
    found at connect (the front end's, localhost), as Postfix's xclient_cmd leaves state->name alone. mailflow
    named the client `unknown`."""
    caplog.set_level(logging.INFO, logger="mailflow")
    _, postfix_client, postfix_received, mailflow_received = await xclient_message_both_ways(
        mailflow_server, smtp_peer, XCLIENT_ADDR_ONLY)
    assert mailflow_received == postfix_received
    assert postfix_received.startswith("Received: from c.test (localhost [192.0.2.9])")
    assert client_lines(r.getMessage() for r in caplog.records) == postfix_client == ["localhost[192.0.2.9]"]


async def name_check_replies(port: int, names: tuple[str, ...]) -> dict[str, str]:
    """Per XCLIENT NAME, RCPT's reply under the client name checks."""
    replies = {}
    for name in names:
        replies[name] = (await dialogue(port, ["HELO c.test", f"XCLIENT NAME={name} ADDR=192.0.2.9", "HELO c.test",
                                               M, "RCPT TO:<x@relay.test>"]))[-1]
    return replies


@pytest.mark.parametrize("check, names", [
    ("reject_unknown_client_hostname", ("unknown", "UnKnown", "[UNAVAILABLE]", "[unavailable]", "given.test")),
    # (not [UNAVAILABLE] here: both then keep the reverse name of the connection, the front end's, which Postfix
    # reads from the hosts file and mailflow's checks from the DNS only)
    ("reject_unknown_reverse_client_hostname", ("unknown", "UnKnown", "given.test"))])
async def test_a_literal_xclient_name_unknown_is_a_name_as_postfix_takes_it(mailflow_server, check, names):
    """smtpd.c xclient_cmd's name_code maps only [UNAVAILABLE] and [TEMPUNAVAIL] (any case) to a failed name
    status: NAME=unknown is a name whose status is OK, which reject_unknown_client_hostname and
    reject_unknown_reverse_client_hostname (smtpd_check.c: they look at the status) pass. mailflow took it for no
    name and refused it."""
    async with postfix_instance({**POSTFIX_BASE, "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
                                 "smtpd_client_restrictions": check}) as pf:
        postfix = await name_check_replies(pf.port, names)
    port = await start_mailflow(mailflow_server, authorized_xclient_hosts=["127.0.0.0/8"], client_restrictions=[check])
    assert await name_check_replies(port, names) == postfix
    assert postfix["unknown"] == postfix["UnKnown"] == postfix["given.test"] == "250 2.1.5 Ok"
    assert postfix.get("[unavailable]", postfix["unknown"]).startswith(("250 ", "450 4.7.25 Client host rejected"))


async def test_authorized_xclient_hosts_is_judged_on_the_name_at_the_greeting_too_as_postfix(mailflow_server):
    """smtpd_proto and xclient_cmd both ask namadr_list_match(xclient_hosts, name, addr): a table holding the
    front end's name (localhost, from the hosts file) authorizes it at the greeting, and the client an XCLIENT names
    localhost keeps it. mailflow asked the address only at the greeting: EHLO offered no XCLIENT, XCLIENT got 550."""
    sessions = {"s": ["EHLO c.test", "XCLIENT NAME=localhost ADDR=192.0.2.7", "XCLIENT ADDR=192.0.2.8",
                      "XCLIENT NAME=other.test", "XCLIENT ADDR=192.0.2.9"]}
    async with postfix_instance({**POSTFIX_BASE, "smtpd_authorized_xclient_hosts": "inline:{localhost=ok}"}) as pf:
        postfix = await replay(pf.port, sessions)
    port = await start_mailflow(mailflow_server, authorized_xclient_hosts=["inline:{localhost=ok}"])
    greeting_by_code = lambda text: "220" if text.startswith("220 ") else text  # noqa: E731 (the banners differ)
    assert differences(sessions, postfix, await replay(port, sessions), greeting_by_code) == {}
    assert [reply[:3] for reply in postfix["s"][1:]] == ["220", "220", "220", "550"]


# --------------------------------------------------------------------------------- forbid_bare_newline

BARE_LF_SESSION = [b"EHLO c.test\n", b"MAIL FROM:<s@remote.test>\n", b"RCPT TO:<alice@local.test>\n", b"DATA\n",
                   b"Subject: bare\n\nline\nmore\r\n.\r\n", b"QUIT\n"]


async def bare_lf_dialogue(port: int) -> list[str]:
    """BARE_LF_SESSION's replies as compared (each line sent as it is); "closed" once the server hung up."""
    client = await SmtpClient.connect(port)
    got = []
    try:
        for line in BARE_LF_SESSION:
            await client.send(line)
            reply = await client.reply()
            if reply.code is None:
                got.append("closed")
                break
            got.append(compared(reply.text))
            if reply.code in (421, 521, 550) and await client.closed(timeout=3):
                got.append("closed")
                break
    finally:
        await client.close()
    return got


@pytest.mark.parametrize("postfix, mailflow", [
    ({}, {}),  # mynetworks (127.0.0.0/8) spared by default: the bare LFs end lines
    ({"smtpd_forbid_bare_newline_exclusions": "", "smtpd_forbid_bare_newline_reject_code": "521"},
     {"forbid_bare_newline_exclusions": []}),
])
async def test_a_bare_lf_is_taken_or_refused_as_postfix_3_7_11_does(mailflow_server, postfix, mailflow):
    """smtpd_forbid_bare_newline = reject with its exclusions ($mynetworks by default: a local client's bare LF
    ends its line) and, without them, reject_code 521 (mailflow's built-in reply: Postfix hangs up after a 521)."""
    async with postfix_instance({**POSTFIX_BASE, "mynetworks": "127.0.0.0/8", "smtpd_forbid_bare_newline": "reject",
                                 **postfix}) as pf:
        expected = await bare_lf_dialogue(pf.port)
    assert await bare_lf_dialogue(await start_mailflow(mailflow_server, **mailflow)) == expected
    assert expected[-2:] == (["250 2.0.0 Ok: queued as QID", "221 2.0.0 Bye"] if not postfix else
                             ["521 5.5.2 HOST Error: bare <LF> received", "closed"])


async def test_a_bare_lf_refused_with_postfix_s_default_code_is_where_mailflow_differs(mailflow_server):
    """Postfix 3.7.11's default reject_code, 550, after a command: the reply differs (mailflow: 521), the hang-up
    does not (config import notes it; docs/config.md, forbid_bare_newline)."""
    async with postfix_instance({**POSTFIX_BASE, "mynetworks": "127.0.0.0/8", "smtpd_forbid_bare_newline": "reject",
                                 "smtpd_forbid_bare_newline_exclusions": ""}) as pf:
        assert await bare_lf_dialogue(pf.port) == ["550 5.5.2 HOST Error: bare <LF> received", "closed"]
    port = await start_mailflow(mailflow_server, forbid_bare_newline_exclusions=[])
    assert await bare_lf_dialogue(port) == ["521 5.5.2 HOST Error: bare <LF> received", "closed"]


BDAT_BARE_LF: list[str | bytes] = ["EHLO c.test", M, R, b"BDAT 7 LAST\r\na\rb\nc", "QUIT"]  # (`cmd` adds CRLF)
DATA_BARE_LF: list[str | bytes] = ["EHLO c.test", M, R, "DATA", b"Subject: x\r\n\r\na\nb\r\n.", "QUIT"]


def reject_lines(lines) -> list[str]:
    """The `QID: reject: ...` lines, the queue id and the client's name masked."""
    return [re.sub(r"^\w+: reject: (\S+) from [^\[]*\[", r"QID: reject: \1 from CLIENT[", line[line.index(": ") + 2:]
                   if "/smtpd[" in line else line)
            for line in lines if ": reject: " in line]


@pytest.mark.parametrize("session", [BDAT_BARE_LF, DATA_BARE_LF], ids=["bdat", "data"])
async def test_a_message_refused_for_its_bare_lf_is_logged_as_postfix_logs_it(mailflow_server, caplog, session):
    """A client spared by no exclusion, its BDAT content holding a bare CR then a bare LF (or its DATA content a
    bare LF): `521 ... bare <LF>` (Postfix names only LF, whatever comes first or the chunks) and the
    END-OF-MESSAGE reject line, which fail2ban and pflogsumm read; mailflow logged none for BDAT, and for DATA
    its reply at the DATA stage."""
    caplog.set_level(logging.INFO, logger="mailflow")
    async with postfix_instance({**POSTFIX_BASE, "mynetworks": "127.0.0.0/8", "smtpd_forbid_bare_newline": "reject",
                                 "smtpd_forbid_bare_newline_exclusions": "",
                                 "smtpd_forbid_bare_newline_reject_code": "521"}) as pf:
        expected = await dialogue(pf.port, session)
        await eventually(lambda: ": reject: " in pf.maillog, timeout=10)
        postfix_logged = reject_lines(pf.maillog.splitlines())
    got = await dialogue(await start_mailflow(mailflow_server, forbid_bare_newline_exclusions=[]), session)
    assert got == expected and got[-1] == "521 5.5.2 HOST Error: bare <LF> received", (got, expected)  # (then closed)
    assert postfix_logged == ["QID: reject: END-OF-MESSAGE from CLIENT[127.0.0.1]: bare <LF> received; "
                              "from=<s@remote.test> to=<alice@local.test> proto=ESMTP helo=<c.test>"]
    assert reject_lines(r.getMessage() for r in caplog.records) == postfix_logged


# an excluded client's DATA: a "." line ends it whatever its line ends (Postfix 3.7.11: no bare LF detection for it);
# each chunk sent with the number of replies due after it (all read before the next chunk: Postfix answers a DATA
# whose content came early 554 5.5.0 synchronization, smtpd_forbid_unauth_pipelining)
EXCLUDED_HEAD = [(b"EHLO c.test\r\n", 1), (b"MAIL FROM:<s@remote.test>\r\n", 1), (b"RCPT TO:<bob@relay.test>\r\n", 1),
                 (b"DATA\r\n", 1)]
EXCLUDED_SESSIONS = {
    "lf.lf": [(b"EHLO c.test\n", 1), (b"MAIL FROM:<s@remote.test>\n", 1), (b"RCPT TO:<bob@relay.test>\n", 1),
              (b"DATA\n", 1), (b"Subject: a\n\nline\n..dot\n.\n", 1), (b"QUIT\n", 1)],
    "crlf.lf": EXCLUDED_HEAD + [(b"Subject: a\r\n\r\nline\r\n.\n", 1), (b"QUIT\r\n", 1)],
    "lf.crlf": EXCLUDED_HEAD + [(b"Subject: a\r\n\r\nline\n.\r\n", 1), (b"QUIT\r\n", 1)],
    "smuggle": EXCLUDED_HEAD + [(b"Subject: a\r\n\r\nline\n.\nMAIL FROM:<evil@remote.test>\r\n", 2),
                                (b"RCPT TO:<bob@relay.test>\r\n", 1), (b"DATA\r\n", 1),
                                (b"Subject: smuggled\r\n\r\nx\r\n.\r\n", 1), (b"QUIT\r\n", 1)],
    # bytes after the "." line are the next command's: a bare CR there does not refuse the message
    # (the NOOP itself: a bare CR in a command line is refused here, taken by Postfix; docs/security.md; the BDAT
    # message's bare CR is a space in both)
    "lf-body+cr-next": EXCLUDED_HEAD + [(b"Subject: a\r\n\r\nline\n.\r\nNOOP x\ry\r\n", 2), (b"QUIT\r\n", 1)],
    "crlf-body+cr-next-lf": EXCLUDED_HEAD + [(b"Subject: a\r\n\r\nline\r\n.\r\nNOOP x\ry\n", 2), (b"QUIT\r\n", 1)],
    # stray CRs: a space, those before a LF dropped (a full 2048-octet record's last one a space); `.<CR><CR><LF>` ends
    "stray-cr": EXCLUDED_HEAD + [(b"Subject: a\r\n\r\nx\r\r\ny\rz\r\n\r.\r\n" + b"a" * 2047 + b"\r\r\n.\r\r\n", 1),
                                 (b"QUIT\r\n", 1)],
    "crlf-body+bdat-binary": EXCLUDED_HEAD + [
        (b"Subject: a\r\n\r\nline\r\n.\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<bob@relay.test>\r\n"
         b"BDAT 21 LAST\r\nSubject: b\r\n\r\nx\ry\nz\r\n", 4), (b"QUIT\r\n", 1)],
}


async def excluded_dialogue(port: int, chunks: list[tuple[bytes, int]]) -> list[str]:
    """Each chunk sent as it is, then the replies due after it read ("no reply" after 3 s), then the rest until the
    server hangs up: every reply (each "queued as" is one message queued)."""
    client = await SmtpClient.connect(port)
    got = []
    try:
        for chunk, due in chunks:
            try:
                await client.send(chunk)
            except (ConnectionResetError, BrokenPipeError):
                break
            for _ in range(due):
                try:
                    got.append((await client.reply(timeout=3)).text)
                except asyncio.TimeoutError:
                    got.append("no reply")
        for _ in range(10):
            reply = await client.reply(timeout=3)
            if reply.code is None:
                break
            got.append(reply.text)
    finally:
        await client.close()
    return got


def bodies(messages: list[bytes]) -> list[bytes]:
    """Each message's body (what follows the header section), its lines ended by LF, as postcat -b shows it (from
    the blank line that ends the header section); a long line of `a`s unfolded (smtp_line_length_limit: the relay's
    SMTP client folds it, postcat shows it whole)."""
    return sorted(re.sub(rb"\n (?=a{10})", b"", b"\n" + message.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))
                  for message in messages)


@pytest.mark.parametrize("case", list(EXCLUDED_SESSIONS))
async def test_an_excluded_client_ends_data_at_a_dot_line_whatever_its_line_ends_as_postfix_3_7_11(
        mailflow_server, smtp_peer, case):
    """127.0.0.1, in mynetworks (the exclusions' default): its `\\n.\\n`, `\\r\\n.\\n`, `\\n.\\r\\n` end DATA, and a
    smuggle-shaped input is two messages, on both servers (it used to hang mailflow to the timeout); a bare CR after
    the "." line (a pipelined command, a BDAT chunk) leaves the message queued. The same bodies are queued: Postfix's
    held (HOLD) and read with postcat -bq, mailflow's as relayed to a peer."""
    async with postfix_instance({**POSTFIX_BASE, "mynetworks": "127.0.0.0/8", "smtpd_forbid_bare_newline": "reject",
                                 "smtpd_client_restrictions": "check_client_access inline:{127.0.0.1=HOLD}"}) as pf:
        theirs = await excluded_dialogue(pf.port, EXCLUDED_SESSIONS[case])
        queued = [match.group(1) for reply in theirs if (match := re.search(r"queued as (\w+)", reply))]
        postfix_bodies = sorted(pf.run("postcat", "-bq", qid).stdout for qid in queued)
    peer = await smtp_peer()
    mf = await mailflow_server(mydestination=["local.test"], relayhost=f"[127.0.0.1]:{peer.port}",
                               relay_domains=["relay.test"], mynetworks=["127.0.0.0/8"],
                               smtpd={"disable_vrfy_command": False})
    ours = [compared(reply) for reply in await excluded_dialogue(mf.smtp_addresses[0][1], EXCLUDED_SESSIONS[case])]
    theirs = [compared(reply) for reply in theirs]
    if "cr-next" in case:  # (mailflow has hung up after its 521: its QUIT gets no reply)
        assert (ours[5], theirs[5:]) == ("521 5.5.2 HOST Error: bare <CR> received", ["250 2.0.0 Ok", "221 2.0.0 Bye"])
        ours, theirs = ours[:5], theirs[:5]
    assert ours == theirs
    assert len(queued) == (2 if case in ("smuggle", "crlf-body+bdat-binary") else 1)
    await eventually(lambda: len(peer.messages) == len(queued) or None, timeout=10)
    assert bodies([message.content for message in peer.messages]) == postfix_bodies
    if "bdat" in case:  # (the BDAT message's bare CR: a space in both, cleanup_replace_stray_cr_lf)
        assert b"\nx y\nz\n" in postfix_bodies

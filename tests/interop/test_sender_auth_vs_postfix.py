"""Differential test: one relay account per sender (sender_dependent_relayhost_maps with smtp_sasl_password_maps
keyed by sender, smtp_sender_dependent_authentication) against a private Postfix configured alike. Both relay to
an aiosmtpd peer on 127.0.0.1 that requires AUTH and records, for each message, the envelope sender and the
account its session logged in as. The probes: a sender with an account of its own, one with its domain's, one
with none (the next hop's account), the null sender (never looked up by sender), and one sender twice (a cached
connection must not carry another sender's mail under the first one's account)."""
from __future__ import annotations

import asyncio

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from aiosmtpd.smtp import AuthResult

from tests.support import eventually, postfix_instance, queue_becomes

pytestmark = pytest.mark.interop

ACCOUNTS = {"alice": "pw-a", "acct": "pw-d", "relayuser": "pw-r"}
SENDERS = ["alice@acct.test", "bob@acct.test", "carol@plain.test", "", "alice@acct.test", "bob@acct.test"]


class AccountRecorder:
    """aiosmtpd handler and authenticator: takes the ACCOUNTS, records (tag, MAIL FROM, account) per message."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def __call__(self, server, session, envelope, mechanism, auth_data):
        ok = ACCOUNTS.get(auth_data.login.decode()) == auth_data.password.decode()
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    async def handle_DATA(self, server, session, envelope):
        tag = envelope.original_content.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        login = session.auth_data.login.decode() if session.auth_data else ""
        self.seen.append((tag, envelope.mail_from, login))
        return "250 2.0.0 Ok"


async def send(port: int, server: str) -> None:
    await send_from(port, server, SENDERS)


async def send_from(port: int, server: str, senders: list[str]) -> None:
    for i, sender in enumerate(senders):
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10) as client:
            await client.sendmail(sender, ["x@remote.test"], f"Subject: {server}-{i}\r\n\r\nx\r\n".encode())


def accounts(recorder: AccountRecorder, server: str) -> dict[int, tuple[str, str]]:
    return {int(tag.split("-")[1]): (sender, login) for tag, sender, login in recorder.seen
            if tag.startswith(f"{server}-")}


async def both_at_the_relay(recorder: AccountRecorder, count: int) -> set[int]:
    """Wait until both servers' `count` messages reached the relay; their numbers."""
    every = set(range(count))
    await eventually(lambda: set(accounts(recorder, "pf")) == every and set(accounts(recorder, "mf")) == every,
                     what="every message at the relay")
    return every


async def relay_requiring_auth(recorder: AccountRecorder) -> asyncio.Server:
    """A relay on 127.0.0.1 that takes mail only after AUTH, recording each login with its sender."""
    return await asyncio.get_running_loop().create_server(
        lambda: AiosmtpdSMTP(recorder, hostname="relay.test", authenticator=recorder, auth_required=True,
                             auth_require_tls=False), "127.0.0.1", 0)


async def test_sender_dependent_authentication_matches_a_real_postfix(mailflow_server):
    recorder = AccountRecorder()
    server = await relay_requiring_auth(recorder)
    try:
        relay = f"[127.0.0.1]:{server.sockets[0].getsockname()[1]}"
        passwords = (f"inline:{{ {{alice@acct.test = alice:pw-a}}, {{@acct.test = acct:pw-d}},"
                     f" {{{relay} = relayuser:pw-r}} }}")
        async with postfix_instance({"myhostname": "pf.test", "relayhost": relay, "smtp_sasl_auth_enable": "yes",
                                     "smtp_sasl_security_options": "noanonymous",
                                     "smtp_sender_dependent_authentication": "yes",
                                     "smtp_sasl_password_maps": passwords}) as pf:
            await send(pf.port, "pf")
            await pf.queue_empty()
        mf = await mailflow_server(mynetworks=["127.0.0.0/8"], relayhost=relay,
                                   smtp={"sasl_password_maps": [passwords], "sasl_tls_required": False,
                                         "sender_dependent_authentication": True})
        await send(mf.smtp_addresses[0][1], "mf")
        await queue_becomes(mf.store, {})
        every = await both_at_the_relay(recorder, len(SENDERS))
    finally:
        server.close()
        await server.wait_closed()
    postfix_used, mailflow_used = accounts(recorder, "pf"), accounts(recorder, "mf")
    assert mailflow_used == postfix_used
    # the edges themselves, so that a change in both cannot pass unnoticed
    assert [postfix_used[i][1] for i in sorted(every)] == ["alice", "acct", "relayuser", "relayuser", "alice", "acct"]


PATTERN_SENDERS = ['"a b"@acct.test', "carol@plain.test"]


async def test_a_regexp_password_table_is_asked_as_postfix_asks_it(mailflow_server, tmp_path):
    """smtp_sasl_passwd_lookup asks a pattern table the sender (mail_addr_find's FULL keys: quoted, then internal
    form), then the host name, then the next hop as written (`[127.0.0.1]:port`). mailflow asked such a table the
    quoted sender and the host name only: neither entry below was found, and the relay refused the mail."""
    recorder = AccountRecorder()
    server = await relay_requiring_auth(recorder)
    try:
        port = server.sockets[0].getsockname()[1]
        relay = f"[127.0.0.1]:{port}"
        table = tmp_path / "passwords.regexp"
        table.write_text(f"/^a b@acct\\.test$/ acct:pw-d\n/^\\[127\\.0\\.0\\.1\\]:{port}$/ relayuser:pw-r\n")
        async with postfix_instance({"myhostname": "pf.test", "relayhost": relay, "smtp_sasl_auth_enable": "yes",
                                     "smtp_sasl_security_options": "noanonymous",
                                     "smtp_sender_dependent_authentication": "yes",
                                     "smtp_sasl_password_maps": f"regexp:{table}"}) as pf:
            await send_from(pf.port, "pf", PATTERN_SENDERS)
            await pf.queue_empty()
        mf = await mailflow_server(mynetworks=["127.0.0.0/8"], relayhost=relay,
                                   smtp={"sasl_password_maps": [f"regexp:{table}"], "sasl_tls_required": False,
                                         "sender_dependent_authentication": True})
        await send_from(mf.smtp_addresses[0][1], "mf", PATTERN_SENDERS)
        every = await both_at_the_relay(recorder, len(PATTERN_SENDERS))
    finally:
        server.close()
        await server.wait_closed()
    assert accounts(recorder, "mf") == accounts(recorder, "pf")
    assert [accounts(recorder, "pf")[i][1] for i in sorted(every)] == ["acct", "relayuser"]

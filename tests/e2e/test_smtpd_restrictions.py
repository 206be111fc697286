"""Restrictions through a real mailflow over SMTP: a Postfix-protocol policy server written here, a DNSBL served
by an in-process DNS server, and HOLD/DISCARD actions carried to the queue."""
from __future__ import annotations

import asyncio
import logging
import re
import threading
import time


from mailflow import status
from mailflow.config import config_from_dict
from mailflow.tables import cidr
from tests.support import SmtpClient, free_port, lines_logged, maildir_messages, queue_becomes, rcpt_reply, send

MESSAGE = b"Subject: t\r\n\r\nhello\r\n"
POLICY_ACTIONS = {  # recipient -> the policy server's answer
    "alice@local.test": "DUNNO",
    "bob@local.test": "550 5.7.1 policy says no",
    "carol@relay.test": "DEFER greylisted, try again",
    "dave@relay.test": "OK",
}


class PolicyServer:
    """The Postfix policy delegation protocol: name=value lines, an empty line; answers `action=...`."""

    def __init__(self):
        self.requests: list[dict[str, str]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"inet:127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = {}
                while (line := (await reader.readline()).decode().rstrip("\n")):
                    name, _, value = line.partition("=")
                    request[name] = value
                if not request:
                    return
                self.requests.append(request)
                action = POLICY_ACTIONS.get(request.get("recipient", ""), "DUNNO")
                writer.write(f"action={action}\n\n".encode())
                await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def test_restriction_tables_are_read_off_the_event_loop_before_they_are_asked(mailflow_server, tmp_path,
                                                                                      monkeypatch):
    """A check_client_access cidr: table was read by the first lookup, the first session's, on the event loop: one
    of 100 000 lines held every session and delivery 0.5 s. The server reads a listener's restriction tables in a
    worker thread before it serves, and a reload the new lists' before it puts them in use."""
    readers: list[threading.Thread] = []
    parse = cidr.parse_cidr
    monkeypatch.setattr(cidr, "parse_cidr", lambda text: (readers.append(threading.current_thread()), parse(text))[1])
    first, second = tmp_path / "first.cidr", tmp_path / "second.cidr"
    first.write_text("192.0.2.0/24 REJECT\n")
    second.write_text("127.0.0.1/32 REJECT no loopback today\n")
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"],
                                      "client_restrictions": [f"check_client_access cidr:{first}"]})
    assert readers and threading.current_thread() not in readers
    code, _ = await rcpt_reply(mf.smtp_addresses[0][1], "alice@local.test")
    assert code == 250 and len(readers) == 1  # (the lookup found it read)
    settings = mf.config.model_dump()
    settings["smtpd"]["client_restrictions"] = (f"check_client_access cidr:{second}",)
    await mf.reload(config_from_dict(settings))
    read = len(readers)  # (a reload validates the new tables too: check-config's reading)
    assert read > 1 and threading.current_thread() not in readers
    code, reply = await rcpt_reply(mf.smtp_addresses[0][1], "alice@local.test")
    assert code == 554 and "no loopback today" in str(reply) and len(readers) == read, reply


async def test_policy_service_decides_per_recipient(mailflow_server):
    policy = PolicyServer()
    spec = await policy.start()
    try:
        mf = await mailflow_server(smtpd={"recipient_restrictions": [f"check_policy_service {spec}"]})
        port = mf.smtp_addresses[0][1]
        assert await rcpt_reply(port, "alice@local.test") == status.RCPT_OK
        assert await rcpt_reply(port, "bob@local.test") == status.restriction_rejected(
            550, "5.7.1", "bob@local.test", "Recipient address", "policy says no")
        assert await rcpt_reply(port, "carol@relay.test") == status.access_deferred(
            "carol@relay.test", "Recipient address", "greylisted, try again")
        assert await rcpt_reply(port, "dave@relay.test") == status.RCPT_OK
        # OK from the policy server does not open the relay: relay_restrictions ran first.
        assert (await rcpt_reply(port, "x@elsewhere.example"))[0] == 554
        first = policy.requests[0]
        assert first["request"] == "smtpd_access_policy" and first["protocol_state"] == "RCPT"
        assert first["client_address"] == "127.0.0.1" and first["sender"] == "s@remote.test"
        assert first["recipient"] == "alice@local.test" and first["helo_name"]
    finally:
        await policy.stop()


async def test_a_policy_server_that_went_away_defers(mailflow_server):
    nobody = f"inet:127.0.0.1:{free_port()}"
    mf = await mailflow_server(smtpd={"recipient_restrictions": [f"check_policy_service {nobody}"],
                                      "policy_service_timeout": "2s"})
    assert await rcpt_reply(mf.smtp_addresses[0][1], "alice@local.test") == status.restriction_rejected(
        451, "4.3.5", "alice@local.test", "Recipient address", "Server configuration problem")


ZONE = """
$ORIGIN bl.test.
1.0.0.127   60 IN A 127.0.0.2
"""


async def test_dnsbl_listed_client_is_refused(mailflow_server, dns_zone):
    nameserver = dns_zone(ZONE)
    mf = await mailflow_server(dns={"nameservers": [nameserver]},
                               smtpd={"client_restrictions": ["reject_rbl_client clean.test",
                                                              "reject_rbl_client bl.test=127.0.0.4",
                                                              "reject_rbl_client bl.test"]})
    assert (await rcpt_reply(mf.smtp_addresses[0][1], "alice@local.test")).text == \
        "554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using bl.test"


async def test_dnsbl_not_listing_the_client_lets_mail_in(mailflow_server, dns_zone):
    nameserver = dns_zone(ZONE)
    mf = await mailflow_server(dns={"nameservers": [nameserver]},
                               smtpd={"client_restrictions": ["reject_rbl_client bl.test=127.0.0.4"]})
    refused, reply = await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], MESSAGE)
    assert refused == {} and reply.startswith("2.0.0 Ok: queued as ")


async def test_hold_puts_the_message_on_hold_and_discard_drops_it(mailflow_server, tmp_path):
    mf = await mailflow_server(smtpd={"sender_restrictions": [
        "check_sender_access inline:{ {held@remote.test=HOLD review}, {junk@remote.test=DISCARD} }"]})
    port = mf.smtp_addresses[0][1]
    refused, reply = await send(port, "held@remote.test", ["alice@local.test"], MESSAGE)
    assert refused == {} and reply.startswith("2.0.0 Ok: queued as ")
    await queue_becomes(mf.store, {"hold": 1}, timeout=3)
    refused, reply = await send(port, "junk@remote.test", ["alice@local.test", "bob@local.test"], MESSAGE)
    assert refused == {} and reply.startswith("2.0.0 Ok: queued as ")
    # a message that is queued is committed before its 250: nothing more can come of this one
    assert await mf.store.counts() == {"hold": 1}
    assert maildir_messages(tmp_path / "mail" / "alice" / "Maildir") == []
    assert maildir_messages(tmp_path / "mail" / "bob" / "Maildir") == []


async def test_a_message_held_on_arrival_gets_qmgrs_from_line_when_it_is_released(mailflow_server, tmp_path, caplog):
    """Postfix's qmgr writes `QID: from=<s>, size=N, nrcpt=N (queue active)` when a message enters the active queue:
    for one held on arrival, once it is released (postsuper -H), never if it is deleted. pflogsumm counts a sender
    and its bytes from that line."""
    caplog.set_level(logging.INFO, logger="mailflow.mail")
    mf = await mailflow_server(smtpd={"sender_restrictions": ["check_sender_access inline:{held@remote.test=HOLD}"]})
    refused, reply = await send(mf.smtp_addresses[0][1], "held@remote.test", ["alice@local.test"], MESSAGE)
    assert refused == {} and reply.startswith("2.0.0 Ok: queued as ")
    qid = reply.rsplit(" ", 1)[1]
    await queue_becomes(mf.store, {"hold": 1}, timeout=3)

    def lines() -> list[str]:  # (qmgr's, cleanup's and the delivery agents': the mail events of this message)
        return [r.getMessage().removeprefix(f"{qid}: ") for r in caplog.records
                if r.name == "mailflow.mail" and r.getMessage().startswith(qid)]

    assert [line.partition("=")[0] for line in lines()] == ["client", "message-id"]
    await mf.store.release_messages([qid], time.time())  # what `mailflow queue release` does
    await queue_becomes(mf.store, {}, timeout=5)
    await lines_logged(caplog, f"{qid}: removed")  # (qmgr's last line follows the commit that empties the queue)
    after = lines()[2:]
    assert [line.partition(",")[0] for line in after] == ["from=<held@remote.test>", "to=<alice@local.test>",
                                                          "removed"]
    assert re.fullmatch(r"from=<held@remote\.test>, size=\d+, nrcpt=1 \(queue active\)", after[0])
    assert len(maildir_messages(tmp_path / "mail" / "alice" / "Maildir")) == 1


async def test_data_restrictions_refuse_the_data_command(mailflow_server):
    """Postfix's smtpd_check_data runs at DATA: the refusal is DATA's reply, no 354 comes, no content is read, and
    the transaction stays open (its sender and recipients kept: a second DATA is refused the same way, RSET ends
    it)."""
    mf = await mailflow_server(smtpd={"data_restrictions": ["check_sender_access inline:{s@remote.test=REJECT}"]})
    refusal = status.access_denied("s@remote.test", "Sender address")
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<s@remote.test>")
    await client.cmd("RCPT TO:<alice@local.test>")
    assert await client.cmd("DATA") == refusal
    assert (await client.cmd("MAIL FROM:<t@remote.test>")).text == "503 5.5.1 Error: nested MAIL command"
    assert await client.cmd("DATA") == refusal
    assert (await client.cmd("RSET")).code == 250
    await client.close()
    assert await mf.store.counts() == {}


ASKED_ZONE = """
$ORIGIN test.
client      60 IN A 192.0.2.1
1.0.0.127.bl 60 IN A 127.0.0.2
"""


async def test_a_listed_clients_txt_reason_is_asked_once_a_session_and_only_of_the_list_naming_it(mailflow_server,
                                                                                                  dns_zone):
    """The reason (the list's TXT records) is asked when a list names the client, once a session however many
    RCPTs refuse it; a list that does not name the client is asked nothing more than its address record."""
    asked: list[tuple[str, str]] = []
    nameserver = dns_zone(ASKED_ZONE + '1.0.0.127.bl 60 IN TXT "listed: see https://bl.test/"\n', asked=asked)
    mf = await mailflow_server(dns={"nameservers": [nameserver]}, smtpd={
        "client_restrictions": ["reject_rbl_client clean.test", "reject_rbl_client bl.test"]})
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    try:
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
        for rcpt in ("alice@local.test", "bob@local.test", "alice@local.test"):
            assert (await client.cmd(f"RCPT TO:<{rcpt}>")).text == (
                "554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using bl.test; "
                "listed: see https://bl.test/")
    finally:
        await client.close()
    assert sorted(q for q in asked if "clean.test" in q[0] or "bl.test" in q[0]) == [
        ("1.0.0.127.bl.test.", "A"), ("1.0.0.127.bl.test.", "TXT"), ("1.0.0.127.clean.test.", "A")]


async def test_a_session_asks_the_dns_once_however_many_recipients(mailflow_server, dns_zone, caplog):
    """delay_reject runs the client and HELO restrictions again at every RCPT: a DNSBL's answer (a failure too, whose
    warning Postfix logs once: its RBL cache keeps it) and the HELO name's records are asked once a session."""
    caplog.set_level(logging.WARNING, logger="mailflow.smtpd")
    asked: list[tuple[str, str]] = []
    nameserver = dns_zone(ASKED_ZONE, servfail=("1.0.0.127.failing.test",), asked=asked)
    mf = await mailflow_server(dns={"nameservers": [nameserver]}, smtpd={
        "client_restrictions": ["reject_rbl_client failing.test", "permit_dnswl_client wl.test"],
        "helo_restrictions": ["reject_unknown_helo_hostname", "reject_rhsbl_helo dbl.test"]})
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    try:
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
        assert await client.cmd("RCPT TO:<alice@local.test>") == status.RCPT_OK
        asked_by_the_first = list(asked)
        assert {name for name, _ in asked_by_the_first} >= {
            "1.0.0.127.failing.test.", "1.0.0.127.wl.test.", "client.test.", "client.test.dbl.test."}
        for rcpt in ("bob@local.test", "alice@local.test", "bob@local.test"):
            assert await client.cmd(f"RCPT TO:<{rcpt}>") == status.RCPT_OK
        assert asked == asked_by_the_first
    finally:
        await client.close()
    # (as smtpd_check.c's rbl_lookup words it, dns_lookup's why whole: mailflow left out its first sentence)
    assert [r.getMessage() for r in caplog.records if "RBL lookup error" in r.getMessage()] == [
        "1.0.0.127.failing.test: RBL lookup error: Host or domain name not found. Name service error for "
        "name=1.0.0.127.failing.test type=A: Host not found, try again"]

"""The inbound filters end to end on a real server: header/body checks in cleanup, the after-queue content
filter and its return listener, greylisting, SPF/DKIM/DMARC with the in-process DNS, the new restrictions."""
from __future__ import annotations

import asyncio
import random
import sys

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP

from mailflow import status
from mailflow.signing import keygen
from tests.support import eventually, free_port, maildir_messages, queue_becomes, rcpt_reply, send
from tests.support.deliverability import dkim_signed, make_key

MESSAGE = b"Subject: hello\r\nFrom: <s@remote.test>\r\n\r\nfirst line\r\nsecond line\r\n"


def maildir(tmp_path, user="alice"):
    return tmp_path / "mail" / user / "Maildir"


async def refusal(port: int, sender: str, rcpts: list[str], content: bytes) -> tuple[int, str]:
    try:
        await send(port, sender, rcpts, content)
    except aiosmtplib.SMTPResponseException as e:
        return e.code, e.message
    return 250, ""


# ---------------------------------------------------------------------------------------------- header/body checks


@pytest.fixture
def checks_file(tmp_path):
    def write(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(text)
        return f"regexp:{path}"
    return write


async def test_header_and_body_checks_reject_hold_discard_and_edit(mailflow_server, tmp_path, checks_file):
    header = checks_file("header_checks", "/^Subject: .*viagra/ REJECT no pills here\n"
                                          "/^Subject: hold me/ HOLD\n"
                                          "/^Subject: drop me/ DISCARD\n"
                                          "/^X-Secret:/ IGNORE\n"
                                          "/^Subject: (.*) rewrite/ REPLACE Subject: rewritten $1\n")
    body = checks_file("body_checks", "/^BAD WORD$/ REJECT\n/^mark me$/ PREPEND X-Marked: yes\n")
    mf = await mailflow_server(checks={"header_checks": [header], "body_checks": [body]})
    port = mf.smtp_addresses[0][1]
    assert await refusal(port, "s@remote.test", ["alice@local.test"],
                         b"Subject: cheap viagra\r\n\r\nhi\r\n") == (550, "5.7.1 no pills here")
    assert await refusal(port, "s@remote.test", ["alice@local.test"],
                         b"Subject: ok\r\n\r\nline\r\nBAD WORD\r\n") == (550, "5.7.1 message content rejected")
    await send(port, "s@remote.test", ["alice@local.test"], b"Subject: hold me\r\n\r\nhi\r\n")
    assert (await queue_becomes(mf.store, {"hold": 1})) == {"hold": 1}
    _, reply = await send(port, "s@remote.test", ["alice@local.test"], b"Subject: drop me\r\n\r\nhi\r\n")
    assert reply.startswith("2.0.0 Ok: queued as ")
    await send(port, "s@remote.test", ["alice@local.test"],
               b"Subject: please rewrite\r\nX-Secret: 42\r\n\r\nmark me\r\nlast\r\n")
    files = await eventually(lambda: maildir_messages(maildir(tmp_path)))
    assert len(files) == 1  # the discarded message never arrives; the held one waits
    data = files[0]
    assert b"Subject: rewritten please\n" in data and b"X-Secret" not in data
    assert data.endswith(b"\n\nX-Marked: yes\nmark me\nlast\n")


async def test_mime_part_headers_go_to_mime_header_checks(mailflow_server, tmp_path, checks_file):
    mime = checks_file("mime_checks", "/^Content-Type: application\\/x-msdownload/ REJECT no executables\n")
    mf = await mailflow_server(checks={"mime_header_checks": [mime]})
    message = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
               b"--b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
               b"--b1\r\nContent-Type: application/x-msdownload\r\n\r\nMZ\r\n--b1--\r\n")
    assert await refusal(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], message) == \
        (550, "5.7.1 no executables")


# ---------------------------------------------------------------------------------------------- after-queue filter


class PassThroughFilter:
    """An after-queue content filter as amavisd is one: SMTP in, a header added, SMTP back out."""

    def __init__(self):
        self.seen = 0
        self.return_port = 0

    async def handle_DATA(self, server, session, envelope):
        self.seen += 1
        content = b"X-Filtered: yes\r\n" + envelope.original_content
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=self.return_port, start_tls=False) as client:
            await client.sendmail(envelope.mail_from, envelope.rcpt_tos, content)
        return "250 2.0.0 Ok: filtered"


async def test_after_queue_filter_sees_each_message_once_and_it_is_delivered_once(mailflow_server, tmp_path):
    loop = asyncio.get_running_loop()
    scanner = PassThroughFilter()
    server = await loop.create_server(lambda: AiosmtpdSMTP(scanner, hostname="filter.test"), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        mf = await mailflow_server(smtpd={
            "listen": ["127.0.0.1:0"], "content_filter": f"smtp:[127.0.0.1]:{port}",
            "listeners": [{"address": "127.0.0.1:0", "overrides": {
                "content_filter": "", "receive_override_options": ["no_header_body_checks", "no_milters",
                                                                   "no_unknown_recipient_checks"]}}]})
        scanner.return_port = mf.smtpd.listeners[1].server.sockets[0].getsockname()[1]
        await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test", "bob@local.test"], MESSAGE)
        alice = await eventually(lambda: maildir_messages(maildir(tmp_path)))
        bob = await eventually(lambda: maildir_messages(maildir(tmp_path, "bob")))
        assert await queue_becomes(mf.store, {}) == {}
        assert scanner.seen == 1 and len(alice) == 1 and len(bob) == 1
        assert b"\nX-Filtered: yes\n" in alice[0] and b"\nX-Filtered: yes\n" in bob[0]
    finally:
        server.close()


async def test_the_documented_filter_set_up_makes_one_automatic_bcc_copy_over_smtp_and_sendmail(
        mailflow_server, smtp_peer, write_config, tmp_path):
    # docs/filtering.md's set-up: [smtpd] receive_override_options = no_address_mappings (Postfix's FILTER_README
    # puts it on the smtpd in front of the filter; its main.cf value covers pickup, pickup.c), so the mail is
    # mapped once, on its way back, and always_bcc makes one copy, whether it came by SMTP or by sendmail
    loop = asyncio.get_running_loop()
    peer = await smtp_peer()
    scanner = PassThroughFilter()
    server = await loop.create_server(lambda: AiosmtpdSMTP(scanner, hostname="filter.test"), "127.0.0.1", 0)
    try:
        settings = {"always_bcc": "archive@arch.test", "relayhost": f"[127.0.0.1]:{peer.port}",
                    "mynetworks": ["127.0.0.0/8"], "smtpd": {
                        "listen": ["127.0.0.1:0"], "content_filter": f"smtp:[127.0.0.1]:{server_port(server)}",
                        "receive_override_options": ["no_address_mappings"],
                        "listeners": [{"address": "127.0.0.1:0", "overrides": {
                            "content_filter": "", "receive_override_options": [
                                "no_header_body_checks", "no_milters", "no_unknown_recipient_checks"]}}]}}
        mf = await mailflow_server(**settings)
        scanner.return_port = mf.smtpd.listeners[1].server.sockets[0].getsockname()[1]
        await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], MESSAGE)
        await eventually(lambda: len(peer.messages) == 1)
        sendmail = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mailflow", "sendmail", "-C", str(write_config(tmp_path / "sendmail.toml")),
            "alice@local.test", stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(sendmail.communicate(b"Subject: by sendmail\n\nx\n"), 20)
        assert sendmail.returncode == 0, err
        await eventually(lambda: len(maildir_messages(maildir(tmp_path))) == 2, timeout=10)
        await eventually(lambda: len(peer.messages) >= 2)
        assert await queue_becomes(mf.store, {}) == {}
        await asyncio.sleep(0.2)  # (a second copy would be on its way by now)
        assert scanner.seen == 2
        assert [m.rcpt_tos for m in peer.messages] == [["archive@arch.test"], ["archive@arch.test"]]
    finally:
        server.close()


def server_port(server: asyncio.Server) -> int:
    return server.sockets[0].getsockname()[1]


async def test_a_filter_that_is_down_defers_the_message(mailflow_server):
    unused_port = free_port()
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "content_filter": f"smtp:[127.0.0.1]:{unused_port}"})
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], MESSAGE)
    assert await queue_becomes(mf.store, {"deferred": 1}) == {"deferred": 1}


async def test_an_access_filter_action_sends_that_client_to_the_filter(mailflow_server):
    unused_port = free_port()
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "client_restrictions": [
        f"check_client_access inline:{{ {{ 127.0.0.1 = FILTER smtp:[127.0.0.1]:{unused_port} }} }}"]})
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], MESSAGE)
    assert await queue_becomes(mf.store, {"deferred": 1}) == {"deferred": 1}  # (the filter is down)


# ---------------------------------------------------------------------------------------------- greylisting


async def test_greylisting_defers_the_first_attempt_and_accepts_the_retry(mailflow_server):
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "recipient_restrictions": ["check_greylist"]},
                               greylist={"delay": "1s"})
    port = mf.smtp_addresses[0][1]
    code, text = await rcpt_reply(port, "alice@local.test")
    greylisted = "450 4.2.0 <alice@local.test>: Recipient address rejected: Greylisted, try again later"
    assert (code, text) == (450, greylisted)
    assert (await rcpt_reply(port, "alice@local.test"))[0] == 450  # too early: still deferred
    await asyncio.sleep(1.05)
    assert (await rcpt_reply(port, "alice@local.test"))[0] == 250
    assert (await rcpt_reply(port, "alice@local.test"))[0] == 250  # known now
    assert (await rcpt_reply(port, "bob@local.test"))[0] == 450  # another triplet


async def test_greylisting_in_a_restriction_class_is_served(mailflow_server):
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "restriction_classes": {"grey": ["check_greylist"]},
                                      "recipient_restrictions": ["grey"]})
    assert (await rcpt_reply(mf.smtp_addresses[0][1], "alice@local.test"))[0] == 450


async def test_greylisting_whitelists_and_auto_whitelists(mailflow_server):
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "recipient_restrictions": ["check_greylist"]},
                               greylist={"delay": 0, "whitelist_domains": ["friend.test"], "auto_whitelist_count": 1})
    port = mf.smtp_addresses[0][1]
    assert (await rcpt_reply(port, "alice@local.test", sender="x@sub.friend.test"))[0] == 250
    assert (await rcpt_reply(port, "alice@local.test"))[0] == 450
    assert (await rcpt_reply(port, "alice@local.test"))[0] == 250  # passed once: the client is whitelisted
    assert (await rcpt_reply(port, "bob@local.test", sender="new@remote.test"))[0] == 250


async def test_greylisting_defers_only_what_would_be_accepted(mailflow_server):
    """postgrey answers DEFER_IF_PERMIT: a later refusal of the same recipient is the answer, not 450."""
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "recipient_restrictions": [
        "check_greylist", "check_recipient_access inline:{ {bob@local.test=REJECT no mail for bob} }"]},
        greylist={"delay": "1h"})
    port = mf.smtp_addresses[0][1]
    assert await rcpt_reply(port, "bob@local.test") == status.access_denied("bob@local.test", "Recipient address",
                                                                            "no mail for bob")
    assert await rcpt_reply(port, "alice@local.test") == status.greylisted("alice@local.test")


async def test_a_greylist_database_that_cannot_be_made_lets_mail_pass(mailflow_server, tmp_path, caplog):
    (tmp_path / "a-file").write_text("")  # its folder cannot be made: the path goes through a file
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "recipient_restrictions": ["check_greylist"]},
                               greylist={"database_file": str(tmp_path / "a-file" / "greylist.db")})
    port = mf.smtp_addresses[0][1]
    with caplog.at_level("ERROR", logger="mailflow"):
        assert (await rcpt_reply(port, "alice@local.test"))[0] == 250
        assert (await rcpt_reply(port, "bob@local.test"))[0] == 250
    logged = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(logged) == 1 and "mail passes ungreylisted" in logged[0].getMessage()  # once, no traceback
    assert logged[0].exc_info is None


# ---------------------------------------------------------------------------------------------- SPF, DKIM, DMARC


@pytest.fixture
def auth_zone(dns_zone, tmp_path):
    key = make_key(tmp_path, "pass.test", "sel1")
    zone = f"""
pass.test. 300 IN TXT "v=spf1 ip4:127.0.0.0/8 -all"
_dmarc.pass.test. 300 IN TXT "v=DMARC1; p=reject"
{keygen.txt_record(key, 300)}
fail.test. 300 IN TXT "v=spf1 -all"
_dmarc.fail.test. 300 IN TXT "v=DMARC1; p=reject"
quarantine.test. 300 IN TXT "v=spf1 -all"
_dmarc.quarantine.test. 300 IN TXT "v=DMARC1; p=quarantine"
"""
    return dns_zone(zone), key


def auth_results(data: bytes) -> str:
    head = data.split(b"\n\n", 1)[0].decode()
    fields = [f for f in head.replace("\n\t", " ").replace("\n ", " ").split("\n")
              if f.startswith("Authentication-Results:")]
    assert len(fields) == 1, head
    return fields[0]


async def test_spf_dkim_and_dmarc_pass_are_reported_by_cleanup(mailflow_server, tmp_path, auth_zone):
    nameserver, key = auth_zone
    mf = await mailflow_server(dns={"nameservers": [nameserver], "timeout": "2s", "tries": 1},
                               sender_auth={"verify": ["spf", "dkim", "dmarc"]})
    body = b"From: <s@pass.test>\r\nSubject: signed\r\n\r\nsigned body  \r\n\r\n"
    await send(mf.smtp_addresses[0][1], "s@pass.test", ["alice@local.test"], dkim_signed(key, body))
    data = (await eventually(lambda: maildir_messages(maildir(tmp_path))))[0]
    ar = auth_results(data)
    assert ar.startswith("Authentication-Results: mx.mailflow.test; spf=pass smtp.mailfrom=s@pass.test")
    assert "dkim=pass header.d=pass.test header.s=sel1" in ar and "dmarc=pass header.from=pass.test" in ar
    assert data.index(b"Authentication-Results:") > data.index(b"Received:")


async def test_a_changed_body_fails_dkim_and_dmarc_fails_without_alignment(mailflow_server, tmp_path, auth_zone):
    nameserver, key = auth_zone
    mf = await mailflow_server(dns={"nameservers": [nameserver], "timeout": "2s", "tries": 1},
                               sender_auth={"verify": ["dkim", "dmarc"]})
    message = dkim_signed(key, b"From: <s@pass.test>\r\nSubject: signed\r\n\r\noriginal\r\n")
    await send(mf.smtp_addresses[0][1], "bounce@other.test", ["alice@local.test"],
               message.replace(b"original", b"changed!"))
    ar = auth_results((await eventually(lambda: maildir_messages(maildir(tmp_path))))[0])
    assert "dkim=fail" in ar and "header.d=pass.test" in ar
    assert "dmarc=fail header.from=pass.test policy.dmarc=reject" in ar


async def test_reject_spf_fail_and_dmarc_policies(mailflow_server, auth_zone, caplog):
    caplog.set_level("INFO", logger="mailflow.smtpd")
    nameserver, _ = auth_zone
    mf = await mailflow_server(dns={"nameservers": [nameserver], "timeout": "2s", "tries": 1},
                               smtpd={"listen": ["127.0.0.1:0"], "sender_restrictions": ["reject_spf_fail"],
                                      "end_of_data_restrictions": ["reject_dmarc_policy"]})
    port = mf.smtp_addresses[0][1]
    code, text = await rcpt_reply(port, "alice@local.test", sender="x@fail.test")
    assert (code, text) == (550, "550 5.7.23 <x@fail.test>: Sender address rejected: SPF validation failed for client "
                                 "[127.0.0.1]")
    assert (await rcpt_reply(port, "alice@local.test", sender="x@pass.test"))[0] == 250
    # SPF passes for pass.test, but the From domain is fail.test: no alignment, p=reject
    assert await refusal(port, "x@pass.test", ["alice@local.test"], b"From: <a@fail.test>\r\n\r\nhi\r\n") == \
        (550, "5.7.1 Message rejected per DMARC policy of fail.test")
    # a second author whose check passes does not lift the first one's p=reject (RFC 7489 6.6.1: each domain)
    # nor does an author that cannot be checked (it was a permerror, which no policy acts on)
    for authors in (b"From: <a@fail.test>, <b@pass.test>\r\n", b"From: <b@pass.test>\r\nFrom: <a@fail.test>\r\n",
                    b"From: <a@fail.test>, nobody@\r\n", b"From: <a@fail.test>, team:;\r\n"):
        assert await refusal(port, "x@pass.test", ["alice@local.test"], authors + b"\r\nhi\r\n") == \
            (550, "5.7.1 Message rejected per DMARC policy of fail.test")
    # a From Python's parser cannot read (500 '(' exhaust its stack) is one that cannot be checked: no policy found
    # here, so accepted; it raised out of the DMARC check: 451 4.3.0 and a traceback for each message
    assert await refusal(port, "x@pass.test", ["alice@local.test"], b"From: " + b"(" * 500 + b"a@pass.test\r\n\r\n"
                                                                        b"hi\r\n") == (250, "")
    await send(port, "x@pass.test", ["alice@local.test"], b"From: <a@quarantine.test>\r\n\r\nhi\r\n")
    assert await queue_becomes(mf.store, {"hold": 1}) == {"hold": 1}
    # (no access action: the hold is logged where it is decided, at the end of the message, once)
    held = [r.getMessage() for r in caplog.records if ": hold: " in r.getMessage()]
    assert [line.partition(": ")[2] for line in held] == [
        "hold: END-OF-MESSAGE from localhost[127.0.0.1]: DMARC policy of quarantine.test: quarantine; "
        "from=<x@pass.test> to=<alice@local.test> proto=ESMTP helo=<localhost>"]


async def test_a_dmarc_temperror_under_p_reject_is_deferred(mailflow_server, dns_zone):
    """The From domain asks p=reject and its own SPF record cannot be had (SERVFAIL): an aligned SPF pass was
    possible, so DMARC is temperror carrying the policy and reject_dmarc_policy defers (RFC 7489 6.6.2); it
    rejected, as if the check had failed."""
    nameserver = dns_zone('_dmarc.unsure.test. 300 IN TXT "v=DMARC1; p=reject"\n'
                          'unsure.test. 300 IN TXT "v=spf1 ip4:127.0.0.0/8 -all"\n', servfail=["unsure.test/TXT"])
    mf = await mailflow_server(dns={"nameservers": [nameserver], "timeout": "2s", "tries": 1},
                               smtpd={"listen": ["127.0.0.1:0"], "end_of_data_restrictions": ["reject_dmarc_policy"]})
    assert await refusal(mf.smtp_addresses[0][1], "x@unsure.test", ["alice@local.test"],
                         b"From: <a@unsure.test>\r\n\r\nhi\r\n") == \
        (450, "4.7.1 Message deferred per DMARC policy of unsure.test: authentication could not be completed, "
              "try again later")


async def test_the_servers_seed_draws_the_same_dmarc_pct_samples(mailflow_server, dns_zone, tmp_path):
    """A DMARC record's pct= samples messages with a generator seeded from the server's RNG (what a Sink's `seed`
    makes): two servers of one seed, sent the same messages one after the other, refuse the same ones (inside the
    sample: p=reject), though the second also queues other mail meanwhile (a queue id each, drawn from the
    server's RNG: drawn from that RNG too, the samples shifted)."""
    nameserver = dns_zone('half.test. 300 IN TXT "v=spf1 -all"\n'
                          '_dmarc.half.test. 300 IN TXT "v=DMARC1; p=reject; pct=50"\n')

    async def sampled(seed: int, queue: str, other_mail: bool) -> list[int]:
        mf = await mailflow_server(rng=random.Random(seed), queue_directory=str(tmp_path / queue),
                                   dns={"nameservers": [nameserver], "timeout": "2s", "tries": 1},
                                   smtpd={"listen": ["127.0.0.1:0"],
                                          "end_of_data_restrictions": ["reject_dmarc_policy"]})
        port = mf.smtp_addresses[0][1]
        codes = []
        for n in range(24):
            if other_mail:
                other = f"From: <b@local.test>\r\nSubject: other {n}\r\n\r\nhi\r\n".encode()
                assert await refusal(port, "b@local.test", ["alice@local.test"], other) == (250, "")
            sampled_message = f"From: <a@half.test>\r\nSubject: {n}\r\n\r\nhi\r\n".encode()
            codes.append((await refusal(port, "a@half.test", ["alice@local.test"], sampled_message))[0])
        return codes

    first = await sampled(7, "one", other_mail=False)
    assert set(first) == {250, 550}  # a sample (outside it: quarantine, held), not all or nothing
    assert await sampled(7, "two", other_mail=True) == first


# ---------------------------------------------------------------------------------------------- DNS restrictions


async def test_unknown_client_and_sender_domain_and_rhsbl(mailflow_server, dns_zone):
    nameserver = dns_zone("""
known.test. 300 IN MX 10 mx.known.test.
mx.known.test. 300 IN A 192.0.2.1
bad.test. 300 IN A 192.0.2.2
bad.test.dbl.test. 300 IN A 127.0.1.2
""")
    mf = await mailflow_server(dns={"nameservers": [nameserver], "timeout": "2s", "tries": 1},
                               smtpd={"listen": ["127.0.0.1:0"], "sender_restrictions": [
                                   "reject_unknown_sender_domain", "reject_rhsbl_sender dbl.test"]})
    port = mf.smtp_addresses[0][1]
    assert await rcpt_reply(port, "alice@local.test", sender="x@nowhere.test") == \
        (450, "450 4.1.8 <x@nowhere.test>: Sender address rejected: Domain not found")
    assert await rcpt_reply(port, "alice@local.test", sender="x@bad.test") == \
        (554, "554 5.7.1 Service unavailable; Sender address [x@bad.test] blocked using dbl.test")
    assert (await rcpt_reply(port, "alice@local.test", sender="x@known.test"))[0] == 250


async def test_reject_unknown_client_hostname(mailflow_server, dns_zone):
    nameserver = dns_zone("0.0.0.127.in-addr.arpa. 300 IN TXT \"nothing here\"\n")
    mf = await mailflow_server(dns={"nameservers": [nameserver], "timeout": "2s", "tries": 1},
                               smtpd={"listen": ["127.0.0.1:0"], "client_restrictions": [
                                   "reject_unknown_reverse_client_hostname"]})
    assert await rcpt_reply(mf.smtp_addresses[0][1], "alice@local.test") == \
        (450, "450 4.7.1 Client host rejected: cannot find your reverse hostname, [127.0.0.1]")

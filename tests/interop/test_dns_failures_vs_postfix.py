"""Differential test of the checks that ask the DNS about a name, when the DNS answers oddly: a private Postfix 3.7
and mailflow ask the same in-process DNS server (Postfix from its own mount namespace, where its resolv.conf names
that server on port 53: tests.support.postfix) under reject_unknown_helo_hostname, reject_unknown_sender_domain
and reject_unknown_recipient_domain (both reject codes 550, so that "not found" and "cannot tell now" differ),
and each RCPT reply is compared word for word: every mix of MX, A and AAAA answers (records, NODATA, NXDOMAIN,
SERVFAIL, a null MX), a reply naming no host (an MX host, a CNAME target), a reply cut short, FORMERR, REFUSED,
NOTIMP, YXDOMAIN and NOTAUTH. Then the SMTP client's outcome for mail to domains whose MX lookup meets the same.
(The client names' cases were seen with a private Postfix whose /etc/hosts was empty, which this harness does not
do: 127.0.0.1 is `localhost` there; see tests/e2e/test_smtpd_dns_restrictions.py and tests/unit/test_peername.py.)"""
from __future__ import annotations

import asyncio

import socket
import threading

import aiosmtplib
import pytest
from dnslib import EDNS0, MX, QTYPE, RCODE, RR, DNSRecord

from tests.e2e.test_smtpd_dns_restrictions import MALFORMED_RECORDS, combination_zone
from tests.interop.test_smtp_faults_vs_postfix import MailLogLines, outcomes
from tests.support import SmtpClient, eventually, postfix_instance
from tests.support.postfix import private_nameserver_address, side_by_side

pytestmark = pytest.mark.interop

ANSWERS = ("records", "nodata", "nxdomain", "servfail")
COMBINATIONS = [(mx, a, aaaa) for mx in (*ANSWERS, "null") for a in ANSWERS for aaaa in ANSWERS]
ODD_ZONE = """
known.test.             60 IN A     192.0.2.1
mx.known.test.          60 IN A     192.0.2.2
""" + MALFORMED_RECORDS + """
mixedmx.test.           60 IN MX    10 mx.known.test.
mixedmx.test.           60 IN MX    20 bad-.example.test.
nullformerr.test.       60 IN MX    0 .
"""
ODD = ("badmx", "badmxaddr", "mixedmx", "badcname", "garbled", "formerr", "refused", "notimp", "yxdomain", "notauth",
       "nullformerr")
# (nullformerr: a null MX beside FORMERR for A and AAAA, where Postfix ranks DNS_FAIL over DNS_NULLMX)
RCODES = {"formerr.test": "FORMERR", "refused.test": "REFUSED", "notimp.test": "NOTIMP", "yxdomain.test": "YXDOMAIN",
          "notauth.test": "NOTAUTH", "nullformerr.test/A": "FORMERR", "nullformerr.test/AAAA": "FORMERR"}
CHECKS = {"helo_restrictions": ["reject_unknown_helo_hostname"],
          "sender_restrictions": ["reject_unknown_sender_domain"],
          "recipient_restrictions": ["reject_unknown_recipient_domain", "permit_mynetworks", "reject"]}


def probes() -> list[tuple[str, str, str]]:
    """(HELO name, sender, recipient): each odd name once as each of the three, the others known."""
    names = ["-".join(c) + ".combo.test" for c in COMBINATIONS] + [f"{name}.test" for name in ODD]
    return ([(name, "s@known.test", "r@known.test") for name in names]
            + [("known.test", f"s@{name}", "r@known.test") for name in names]
            + [("known.test", "s@known.test", f"r@{name}") for name in names])


async def replies(port: int, sessions: int = 8) -> dict[tuple[str, str, str], str]:
    """Each probe's RCPT reply, the probes spread over `sessions` sessions at once (each probe is judged alone:
    EHLO, MAIL, RCPT, RSET)."""
    async def session(share: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], str]:
        answers = {}
        client = await SmtpClient.connect(port)
        try:
            for helo, sender, rcpt in share:
                assert (await client.cmd(f"EHLO {helo}")).code == 250
                assert (await client.cmd(f"MAIL FROM:<{sender}>")).code == 250
                answers[helo, sender, rcpt] = (await client.cmd(f"RCPT TO:<{rcpt}>")).text
                assert (await client.cmd("RSET")).code == 250
        finally:
            await client.close()
        return answers

    every = probes()
    found: dict[tuple[str, str, str], str] = {}
    for answers in await asyncio.gather(*(session(every[i::sessions]) for i in range(sessions))):
        found.update(answers)
    return found


async def test_odd_dns_answers_make_the_same_replies_as_a_real_postfix(mailflow_server, dns_zone):
    zone, servfail, nxdomain, _ = combination_zone(COMBINATIONS, base="")
    address = private_nameserver_address()
    dns_zone(ODD_ZONE + zone, servfail=servfail, nxdomain=nxdomain, garbled=("garbled.test",), rcodes=RCODES,
             address=address, port=53)
    settings = {"unknown_address_reject_code": "550", "unknown_hostname_reject_code": "550",
                "smtpd_error_sleep_time": "0", "smtpd_soft_error_limit": "10000", "smtpd_hard_error_limit": "10000"}

    async def with_postfix() -> dict:
        async with postfix_instance({**settings, **{f"smtpd_{k}": ", ".join(v) for k, v in CHECKS.items()}},
                                    nameserver=address) as pf:
            return await replies(pf.port)

    mf = await mailflow_server(mynetworks=["127.0.0.0/8"],
                               dns={"nameservers": [f"{address}:53"], "timeout": "2s", "tries": 1},
                               smtpd={"unknown_address_reject_code": 550, "unknown_hostname_reject_code": 550,
                                      "error_sleep_time": 0, "soft_error_limit": 10000, "hard_error_limit": 10000,
                                      "relay_restrictions": ["permit_mynetworks", "reject"], **CHECKS})
    mailflow, postfix = await side_by_side(replies(mf.smtp_addresses[0][1]), with_postfix())
    assert {probe: (postfix[probe], mailflow[probe]) for probe in postfix if postfix[probe] != mailflow[probe]} == {}
    # what Postfix said, so that the same mistake on both sides cannot pass unnoticed
    assert postfix["known.test", "s@nxdomain-servfail-nodata.combo.test", "r@known.test"] == \
        "450 4.1.8 <s@nxdomain-servfail-nodata.combo.test>: Sender address rejected: Domain not found"
    assert postfix["known.test", "s@known.test", "r@badmx.test"] == \
        "550 5.1.2 <r@badmx.test>: Recipient address rejected: Malformed DNS server reply"
    assert postfix["null-servfail-nodata.combo.test", "s@known.test", "r@known.test"] == \
        "450 4.7.1 <null-servfail-nodata.combo.test>: Helo command rejected: Host not found"
    assert postfix["formerr.test", "s@known.test", "r@known.test"] == \
        "550 5.7.1 <formerr.test>: Helo command rejected: Host not found"
    assert postfix["known.test", "s@mixedmx.test", "r@known.test"] == "250 2.1.5 Ok"
    assert postfix["nullformerr.test", "s@known.test", "r@known.test"] == \
        "550 5.7.1 <nullformerr.test>: Helo command rejected: Host not found"


DELIVERY_ZONE = """
garbled.test.           60 IN MX    10 mx.known.test.
badmx.test.             60 IN MX    10 bad-.example.test.
bad-.example.test.      60 IN A     192.0.2.1
"""
DELIVERY_RCODES = {"formerr.test": "FORMERR", "refused.test": "REFUSED", "notimp.test": "NOTIMP",
                   "yxdomain.test": "YXDOMAIN", "notauth.test": "NOTAUTH"}
DESTINATIONS = ("garbled", "badmx", "mixedmx", "formerr", "refused", "notimp", "yxdomain", "notauth", "broken")


async def relay_one_each(port: int) -> None:
    for name in DESTINATIONS:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10) as client:
            await client.sendmail("s@sender.test", [f"r@{name}.test"], b"Subject: t\r\n\r\nhello\r\n")


async def test_the_smtp_client_ends_mail_for_odd_mx_answers_as_a_real_postfix(mailflow_server, dns_zone, smtp_peer):
    """Each recipient's outcome (relay, dsn, status, text) in the mail log: an MX reply cut short defers (4.4.3) and
    one naming no host bounces (5.4.4), both "Name service error for name=N type=MX: Malformed or unexpected name
    server reply"; FORMERR, YXDOMAIN and NOTAUTH bounce 5.4.3 ("...: Non-recoverable error"); REFUSED, NOTIMP and
    SERVFAIL defer ("...: Host not found, try again"), these three after "Host or domain name not found. "."""
    address = private_nameserver_address()
    dns_zone(ODD_ZONE + DELIVERY_ZONE, servfail=("broken.test",), garbled=("garbled.test",), rcodes=DELIVERY_RCODES,
             address=address, port=53)
    notices = await smtp_peer()
    log = MailLogLines().start()
    everyone = {f"r@{name}.test" for name in DESTINATIONS}
    try:
        async with postfix_instance({
                "myhostname": "pf.test", "mydestination": "", "smtp_dns_support_level": "enabled",
                "transport_maps": f"inline:{{sender.test=smtp:[127.0.0.1]:{notices.port}}}"}, nameserver=address) as pf:
            await relay_one_each(pf.port)
            await eventually(lambda: set(outcomes(pf.maillog)) >= everyone or None, timeout=20,
                             what="Postfix ended every recipient")
            postfix = outcomes(pf.maillog)
        mf = await mailflow_server(mynetworks=["127.0.0.0/8"],
                                   dns={"nameservers": [f"{address}:53"], "timeout": "2s", "tries": 1},
                                   transport_maps=[f"inline:{{sender.test=smtp:[127.0.0.1]:{notices.port}}}"])
        await relay_one_each(mf.smtp_addresses[0][1])
        await eventually(lambda: set(outcomes("\n".join(log.lines))) >= everyone or None, timeout=20,
                         what="mailflow ended every recipient")
        mailflow = outcomes("\n".join(log.lines))
    finally:
        log.stop()
    assert {r: (postfix[r], mailflow[r]) for r in everyone if postfix[r] != mailflow[r]} == {}
    # what Postfix said, so that the same mistake on both sides cannot pass unnoticed
    malformed = "Malformed or unexpected name server reply"
    said = "Name service error for name={}.test type=MX: {}"
    assert postfix["r@badmx.test"][1:] == ("5.4.4", "bounced", said.format("badmx", malformed))
    assert postfix["r@mixedmx.test"][2] == "deferred"  # mx.known.test asked, not bounced
    assert postfix["r@garbled.test"][1:] == ("4.4.3", "deferred", said.format("garbled", malformed))
    assert postfix["r@formerr.test"][1:] == \
        ("5.4.3", "bounced", "Host or domain name not found. " + said.format("formerr", "Non-recoverable error"))
    assert postfix["r@yxdomain.test"][1:] == \
        ("5.4.3", "bounced", "Host or domain name not found. " + said.format("yxdomain", "Non-recoverable error"))


MX_ACCESS_ZONE = """
spam.test.              60 IN MX    10 mx.bad-hoster.test.
spam.test.              60 IN MX    20 bad-.example.test.
mx.bad-hoster.test.     60 IN A     198.51.100.66
known.test.             60 IN A     192.0.2.1
"""
MX_ACCESS = "check_sender_mx_access inline:{mx.bad-hoster.test=REJECT}"


async def mx_access_replies(port: int) -> dict[str, str]:
    answers = {}
    client = await SmtpClient.connect(port)
    try:
        await client.cmd("EHLO known.test")
        for sender, rcpt in (("s@spam.test", "r@known.test"), ("s@known.test", "r@known.test")):
            await client.cmd(f"MAIL FROM:<{sender}>")
            answers[sender, rcpt] = (await client.cmd(f"RCPT TO:<{rcpt}>")).text
            await client.cmd("RSET")
    finally:
        await client.close()
    return answers


async def test_an_mx_record_naming_no_host_beside_good_ones_is_dropped_alone_as_by_a_real_postfix(mailflow_server,
                                                                                                   dns_zone):
    """Postfix's dns_get_answer drops an MX record whose host is no host name and keeps the others: a listed MX host
    is still refused by check_sender_mx_access: one bogus record must not slip a blocklist."""
    address = private_nameserver_address()
    dns_zone(MX_ACCESS_ZONE, address=address, port=53)
    async with postfix_instance({"smtpd_sender_restrictions": MX_ACCESS, "smtpd_error_sleep_time": "0",
                                 "smtpd_relay_restrictions": "permit_mynetworks, reject",
                                 "mynetworks": "127.0.0.0/8"}, nameserver=address) as pf:
        postfix = await mx_access_replies(pf.port)
    mf = await mailflow_server(mynetworks=["127.0.0.0/8"],
                               dns={"nameservers": [f"{address}:53"], "timeout": "2s", "tries": 1},
                               smtpd={"sender_restrictions": [MX_ACCESS], "error_sleep_time": 0,
                                      "relay_restrictions": ["permit_mynetworks", "reject"]})
    mailflow = await mx_access_replies(mf.smtp_addresses[0][1])
    assert mailflow == postfix
    assert postfix["s@spam.test", "r@known.test"] == "554 5.7.1 <s@spam.test>: Sender address rejected: Access denied"
    assert postfix["s@known.test", "r@known.test"] == "250 2.1.5 Ok"


def answer_plain_queries_only(sock: socket.socket, asked_with_edns: list[bool]) -> None:
    """FORMERR, with an OPT record, to every query carrying EDNS; an MX answer to a plain one (until closed)."""
    sock.settimeout(0.1)
    while True:
        try:
            data, peer = sock.recvfrom(4096)
        except TimeoutError:
            continue
        except OSError:  # closed
            return
        request = DNSRecord.parse(data)
        with_edns = any(record.rtype == QTYPE.OPT for record in request.ar)
        asked_with_edns.append(with_edns)
        reply = request.reply()
        if with_edns:
            reply.header.rcode = RCODE.FORMERR
            reply.add_ar(EDNS0())
        elif request.q.qtype == QTYPE.MX:
            reply.add_answer(RR(request.q.qname, QTYPE.MX, rdata=MX("mx.known.test"), ttl=60))
        sock.sendto(reply.pack(), peer)


async def recipient_domain_replies(port: int) -> list[str]:
    answers = []
    client = await SmtpClient.connect(port)
    try:
        await client.cmd("EHLO known.test")
        for n in range(3):
            await client.cmd("MAIL FROM:<s@known.test>")
            answers.append((await client.cmd(f"RCPT TO:<r@d{n}.test>")).text)
            await client.cmd("RSET")
    finally:
        await client.close()
    return answers


async def test_a_server_answering_formerr_to_edns_answers_both_as_it_answers_postfix(mailflow_server):
    """Postfix's resolver asks without EDNS (unless it wants DNSSEC), so a server refusing EDNS with FORMERR answers
    it; mailflow (c-ares: EDNS, a plain retry only for its first query) found the later domains not there."""
    address = private_nameserver_address()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 53))
    asked_with_edns: list[bool] = []
    threading.Thread(target=answer_plain_queries_only, args=(sock, asked_with_edns), daemon=True).start()
    try:
        async with postfix_instance({"unknown_address_reject_code": "550", "smtpd_error_sleep_time": "0",
                                     "smtpd_recipient_restrictions": "reject_unknown_recipient_domain, permit",
                                     "smtpd_relay_restrictions": "permit_mynetworks, reject",
                                     "mynetworks": "127.0.0.0/8"}, nameserver=address) as pf:
            postfix = await recipient_domain_replies(pf.port)
        mf = await mailflow_server(mynetworks=["127.0.0.0/8"],
                                   dns={"nameservers": [f"{address}:53"], "timeout": "2s", "tries": 1},
                                   smtpd={"unknown_address_reject_code": 550, "error_sleep_time": 0,
                                          "recipient_restrictions": ["reject_unknown_recipient_domain", "permit"],
                                          "relay_restrictions": ["permit_mynetworks", "reject"]})
        mailflow = await recipient_domain_replies(mf.smtp_addresses[0][1])
    finally:
        sock.close()
    assert mailflow == postfix == ["250 2.1.5 Ok"] * 3
    assert not any(asked_with_edns)

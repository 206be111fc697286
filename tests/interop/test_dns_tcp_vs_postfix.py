"""Differential test of answers too big for a UDP reply without EDNS (512 bytes), which the DNS server cuts at a
record boundary with TC set: a private Postfix 3.7 (glibc's resolver: TC, then TCP) and mailflow (c-ares) ask the
same in-process server (tests.support.postfix), whose TCP answers, refuses connections, or closes them unanswered.
Compared word for word: reject_unknown_sender_domain and check_sender_mx_access for a domain of 30 MX hosts (the
listed one past the cut), a DNSBL's reply text from TXT records of several strings, past 512 bytes too, and the
SMTP client's outcome for mail to a domain of 30 MX hosts (the most preferred, the only one that answers, past the
cut). Without TCP every lookup is a temporary failure: 450, a deferral, never the cut records."""
from __future__ import annotations


import aiosmtplib
import pytest

from tests.interop.test_smtp_faults_vs_postfix import MailLogLines, outcomes
from tests.support import SmtpClient, eventually, postfix_instance
from tests.support.postfix import private_nameserver_address

pytestmark = pytest.mark.interop

TCP_MODES = ("answer", "refuse", "close")
# 30 MX hosts each (about 1 000 bytes); the zone's order is the answer's: the last record is past the UDP cut.
BIG_MX = "".join(f"{domain}. 60 IN MX {10 + i} mail-exchanger-number-{i:02d}.hoster.test.\n"
                 for domain in ("bigmx.test", "bigclean.test", "bigdest.test") for i in range(29))
BIG_MX += "bigmx.test. 60 IN MX 50 listed.hoster.test.\n"
BIG_MX += "bigclean.test. 60 IN MX 50 clean.hoster.test.\n"
BIG_MX += "bigdest.test. 60 IN MX 0 best.hoster.test.\n"
HOSTS = "".join(f"mail-exchanger-number-{i:02d}.hoster.test. 60 IN A 127.0.0.{10 + i}\n" for i in range(29))
HOSTS += "listed.hoster.test. 60 IN A 192.0.2.66\nclean.hoster.test. 60 IN A 192.0.2.67\n"
HOSTS += "best.hoster.test. 60 IN A 127.0.0.3\nknown.test. 60 IN A 192.0.2.1\n"
A250, B250, C250 = "a" * 250, "b" * 250, "c" * 250
LISTS = f"""
1.0.0.127.strings.test.  60 IN A   127.0.0.2
1.0.0.127.strings.test.  60 IN TXT "first string" "second string"
1.0.0.127.strings.test.  60 IN TXT "another record"
1.0.0.127.long.test.     60 IN A   127.0.0.2
1.0.0.127.long.test.     60 IN TXT "{A250}" "{B250}" "{C250}"
1.0.0.127.long.test.     60 IN TXT "short"
"""
ZONE = BIG_MX + HOSTS + LISTS
CLASSES = {"unknown": "reject_unknown_sender_domain", "mx": "check_sender_mx_access inline:{listed.hoster.test=REJECT}",
           "strings": "reject_rbl_client strings.test", "long": "reject_rbl_client long.test"}
PROBES = [("unknown", "s@bigmx.test"), ("mx", "s@bigmx.test"), ("mx", "s@bigclean.test"),
          ("strings", "s@known.test"), ("long", "s@known.test")]
ACCESS = "inline:{ " + ", ".join(f"{name}-{sender}={name}" for name, sender in PROBES) + " }"


async def replies(port: int) -> dict[tuple[str, str], str]:
    """The RCPT reply of each probe, a session each (the sender, `class-address`, names the restriction class)."""
    answers = {}
    for name, sender in PROBES:
        client = await SmtpClient.connect(port)
        try:
            assert (await client.cmd("EHLO known.test")).code == 250
            await client.cmd(f"MAIL FROM:<{name}-{sender}>")
            answers[name, sender] = (await client.cmd("RCPT TO:<r@known.test>")).text
        finally:
            await client.close()
    return answers


@pytest.mark.parametrize("tcp", TCP_MODES)
async def test_smtpd_checks_on_answers_past_512_bytes_match_a_real_postfix(mailflow_server, dns_zone, tcp):
    address = private_nameserver_address()
    dns_zone(ZONE, tcp=tcp, address=address, port=53)
    async with postfix_instance({
            "unknown_address_reject_code": "550", "smtpd_error_sleep_time": "0", "mynetworks": "127.0.0.0/8",
            "smtpd_restriction_classes": ", ".join(CLASSES), **CLASSES,
            "smtpd_sender_restrictions": f"check_sender_access {ACCESS}",
            "smtpd_relay_restrictions": "permit_mynetworks, reject"}, nameserver=address) as pf:
        postfix = await replies(pf.port)
    mf = await mailflow_server(mynetworks=["127.0.0.0/8"],
                               dns={"nameservers": [f"{address}:53"], "timeout": "2s", "tries": 1},
                               smtpd={"unknown_address_reject_code": 550, "error_sleep_time": 0,
                                      "restriction_classes": {name: [item] for name, item in CLASSES.items()},
                                      "sender_restrictions": [f"check_sender_access {ACCESS}"],
                                      "relay_restrictions": ["permit_mynetworks", "reject"]})
    mailflow = await replies(mf.smtp_addresses[0][1])
    assert {probe: (postfix[probe], mailflow[probe]) for probe in postfix if postfix[probe] != mailflow[probe]} == {}
    # what Postfix said, so that the same mistake on both sides cannot pass unnoticed
    if tcp == "answer":
        assert postfix["unknown", "s@bigmx.test"] == "250 2.1.5 Ok"
        assert postfix["mx", "s@bigmx.test"] == \
            "554 5.7.1 <mx-s@bigmx.test>: Sender address rejected: Access denied"
        assert postfix["mx", "s@bigclean.test"] == "250 2.1.5 Ok"
        # each record's first string, records joined with " / " (dns_lookup.c keeps a TXT record's first string)
        assert postfix["strings", "s@known.test"].endswith("blocked using strings.test; first string / another record")
        assert postfix["long", "s@known.test"].endswith(f"blocked using long.test; {A250} / short")
    else:
        assert postfix["unknown", "s@bigmx.test"] == \
            "450 4.1.8 <unknown-s@bigmx.test>: Sender address rejected: Domain not found"
        assert postfix["mx", "s@bigmx.test"] == "250 2.1.5 Ok"  # (check_server_access: a failed MX lookup is DUNNO)
        assert postfix["long", "s@known.test"].endswith("blocked using long.test")  # no reason: TXT failed
    assert all(not reply.startswith("5") or "Access denied" in reply or "blocked using" in reply
               for reply in postfix.values())


async def deliver_to_bigdest(port: int) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10) as client:
        await client.sendmail("s@sender.test", ["r@bigdest.test"], b"Subject: t\r\n\r\nhello\r\n")


@pytest.mark.parametrize("tcp", TCP_MODES)
async def test_delivery_to_30_mx_hosts_past_512_bytes_ends_as_by_a_real_postfix(mailflow_server, dns_zone, smtp_peer,
                                                                                  tcp):
    """The most preferred host (the only one listening) is the last record, past the UDP cut: over TCP both deliver
    to it; without TCP both defer (4.4.3, "Host not found, try again"), neither tries the hosts of the cut set."""
    address = private_nameserver_address()
    dns_zone(ZONE, tcp=tcp, address=address, port=53)
    peer = await smtp_peer("127.0.0.3", 0)
    nexthop = f"inline:{{bigdest.test=smtp:bigdest.test:{peer.port}}}"
    log = MailLogLines().start()
    try:
        async with postfix_instance({"myhostname": "pf.test", "mydestination": "", "transport_maps": nexthop,
                                     "smtp_dns_support_level": "enabled"},
                                    nameserver=address) as pf:
            await deliver_to_bigdest(pf.port)
            await eventually(lambda: "r@bigdest.test" in outcomes(pf.maillog) or None, timeout=20,
                             what="Postfix ended the recipient")
            postfix = outcomes(pf.maillog)["r@bigdest.test"]
        mf = await mailflow_server(mynetworks=["127.0.0.0/8"], transport_maps=[nexthop],
                                   dns={"nameservers": [f"{address}:53"], "timeout": "2s", "tries": 1})
        await deliver_to_bigdest(mf.smtp_addresses[0][1])
        await eventually(lambda: "r@bigdest.test" in outcomes("\n".join(log.lines)) or None, timeout=20,
                         what="mailflow ended the recipient")
        mailflow = outcomes("\n".join(log.lines))["r@bigdest.test"]
    finally:
        log.stop()
    assert mailflow[:3] == postfix[:3] and (tcp == "answer" or mailflow == postfix)  # (the peer's queue ids differ)
    if tcp == "answer":
        assert postfix[:3] == (f"best.hoster.test[127.0.0.3]:{peer.port}", "2.0.0", "sent")
        assert len(peer.messages) == 2
    else:
        assert postfix == ("none", "4.4.3", "deferred", "Host or domain name not found. Name service error for "
                           "name=bigdest.test type=MX: Host not found, try again")
        assert peer.messages == []

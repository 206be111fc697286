"""reject_unverified_recipient / reject_unverified_sender through a whole mailflow: probes to mailflow's own fake
destinations (mailflow.testing.destinations, real SMTP peers on loopback behind a fake name service), one per
behaviour of the internal server: accepts, refuses 550, defers 450, says nothing (times out). And the verifier's
cache on its own, on a virtual clock: Postfix's lifetimes, its bounds."""
from __future__ import annotations

import asyncio
import logging
import sys
import tracemalloc

import pytest

from mailflow import status
from mailflow.app import Mailflow
from mailflow.clock import SystemClock, VirtualClock
from mailflow.config import DEFAULTS
from mailflow.errors import LookupRetry, TemporaryError
from mailflow.logs import MAIL_LOGGER, MailLog
from mailflow.stages import verify
from mailflow.stages.verify import IN_PROGRESS, TEXT_BYTES, ProbeSender, Status, Verdict, Verifier
from mailflow.testing.destinations import Destinations
from tests.support import SmtpClient
from tests.support.dialogue import send
from tests.support.peers import record_senders
from tests.support.waiting import eventually

DAY = 86400
DOMAINS = ("good.test", "bad.test", "soft.test", "slow.test", "down.test")
SHUTTING_DOWN = "421 4.3.2 Service shutting down"
# one failed delivery makes a destination dead, for a minute (qmgr's memory: a window of 1, one failed cohort)
DIES_AT_ONCE = {"initial_destination_concurrency": 1, "minimal_backoff_time": "60s", "maximal_backoff_time": "120s"}


@pytest.fixture
async def destinations():
    found = Destinations()
    good, bad, soft, slow, down = (found.add(d) for d in DOMAINS)
    bad.answers(550, "5.1.1 User unknown")
    soft.answers(450, "4.2.0 Try again later")
    slow.times_out()
    down.answers(421, "4.3.2 Service shutting down", at="connect")
    yield found
    await found.stop()


@pytest.fixture
async def verifying(mailflow_server, destinations):
    """Start a mailflow that verifies recipients (its smtpd, address_verify and queue settings as given) against
    the destinations: waits up to 0.4 s for a probe; a peer that says nothing is given up after 0.5 s. `main`: top-level
    settings."""
    async def start(verify: dict | None = None, queue: dict | None = None, main: dict | None = None,
                    **smtpd) -> Mailflow:
        return await mailflow_server(
            resolver=destinations.resolver, relay_domains=list(DOMAINS), **(main or {}),
            smtpd={"listen": ["127.0.0.1:0"], "recipient_restrictions": ["reject_unverified_recipient"], **smtpd},
            smtp={"port": destinations.port, "helo_timeout": "0.5s", "command_timeout": "0.5s"},
            address_verify={"poll_delay": "0.2s", "poll_count": 3, **(verify or {})}, queue=queue or {})

    return start


async def rcpt(mf: Mailflow, address: str, sender: str = "s@remote.test"):
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    try:
        await client.cmd("EHLO client.test")
        await client.cmd(f"MAIL FROM:<{sender}>")
        return await client.cmd(f"RCPT TO:<{address}>", timeout=10)
    finally:
        await client.close()


def unverified(address: str, text: str, code: int = 450) -> status.Reply:
    return status.unverified_address(address, "Recipient address", code, f"{str(code)[0]}.1.1", text)


def said(destinations: Destinations, domain: str, reply: str) -> str:
    host = destinations.add(domain)
    return f"host {host.mx_host}[{host.address}] said: {reply} (in reply to RCPT TO command)"


async def test_the_first_rcpt_waits_for_the_probe_and_a_later_one_gets_the_cached_result(verifying, destinations):
    mf = await verifying()
    first = await asyncio.gather(*(rcpt(mf, f"u@{d}") for d in DOMAINS[:3]))
    bad = unverified("u@bad.test", said(destinations, "bad.test", "550 5.1.1 User unknown"))
    soft = unverified("u@soft.test", said(destinations, "soft.test", "450 4.2.0 Try again later"))
    assert first == [status.RCPT_OK, bad, soft]
    assert await asyncio.gather(*(rcpt(mf, f"u@{d}") for d in DOMAINS[:3])) == first
    for domain in DOMAINS[:3]:  # one probe each, MAIL and RCPT only: nothing delivered
        assert (destinations.add(domain).transactions, destinations.add(domain).messages) == (1, [])


async def test_a_probe_that_outlasts_the_wait_is_in_progress_then_its_failure_is_cached(verifying, destinations):
    mf = await verifying()
    assert await rcpt(mf, "u@slow.test") == unverified("u@slow.test", IN_PROGRESS)
    slow = destinations.add("slow.test")
    timed_out = unverified("u@slow.test", f"conversation with {slow.mx_host}[{slow.address}] timed out while "
                                          "receiving the initial server greeting")

    async def answered() -> bool:
        return await rcpt(mf, "u@slow.test") != unverified("u@slow.test", IN_PROGRESS)

    await eventually(answered, timeout=8, step=0.2)
    assert await rcpt(mf, "u@slow.test") == timed_out
    assert slow.connections == 1


async def test_a_5xx_reject_code_refuses_a_bounced_address_and_keeps_450_for_a_deferred_one(verifying, destinations):
    mf = await verifying(unverified_recipient_reject_code=550)
    text = said(destinations, "bad.test", "550 5.1.1 User unknown")
    assert await rcpt(mf, "u@bad.test") == status.undeliverable_address("u@bad.test", "Recipient address", 550,
                                                                         "5.1.1", text)
    assert (await rcpt(mf, "u@soft.test")).code == 450


async def test_the_deferral_is_defer_if_permit_a_later_refusal_wins_unless_tempfail_action_is_defer(verifying):
    later = ["reject_unverified_recipient", "check_recipient_access inline:{ { u@soft.test = REJECT no } }"]
    mf = await verifying(recipient_restrictions=later)
    assert await rcpt(mf, "u@soft.test") == status.access_denied("u@soft.test", "Recipient address", "no")
    await mf.stop()  # (one server per queue)
    mf = await verifying(recipient_restrictions=later, unverified_recipient_tempfail_action="defer",
                         unverified_recipient_reject_reason="go away")
    assert await rcpt(mf, "u@soft.test") == unverified("u@soft.test", "go away")


async def test_local_addresses_are_verified_as_postfix_local_answers_a_probe(verifying):
    mf = await verifying()
    assert await rcpt(mf, "alice@local.test") == status.RCPT_OK
    assert await rcpt(mf, "nobody@local.test") == unverified("nobody@local.test", 'unknown user: "nobody"')


async def test_every_verdict_is_a_mail_log_line_under_the_agent_that_gave_it(verifying, destinations, caplog):
    caplog.set_level(logging.INFO, logger=MAIL_LOGGER)
    mf = await verifying()
    await asyncio.gather(rcpt(mf, "nobody@local.test"), rcpt(mf, "u@bad.test"))
    lines = sorted((r.service, r.getMessage()) for r in caplog.records if getattr(r, "event", "") == "verified")
    bad = said(destinations, "bad.test", "550 5.1.1 User unknown")
    host = destinations.add("bad.test")
    assert [(service, line.partition(": ")[2]) for service, line in lines] == [
        ("local", 'to=<nobody@local.test>, relay=local, dsn=5.1.1, status=undeliverable (unknown user: "nobody")'),
        ("relay/smtp", f"to=<u@bad.test>, relay={host.mx_host}[{host.address}]:{destinations.port}, dsn=5.1.1, "
                 f"status=undeliverable ({bad})")]
    assert sorted(line.partition(": ")[0] for _, line in lines) == ["VRFY000001", "VRFY000002"]


async def test_the_sender_is_verified_with_its_own_words(verifying, destinations):
    mf = await verifying(recipient_restrictions=[], sender_restrictions=["reject_unverified_sender"])
    reply = await rcpt(mf, "alice@local.test", sender="s@bad.test")
    assert reply == status.unverified_address("s@bad.test", "Sender address", 450, "4.1.7",
                                              said(destinations, "bad.test", "550 5.1.1 User unknown"))
    assert await rcpt(mf, "alice@local.test", sender="") == status.RCPT_OK  # the null sender is not probed


async def test_probes_are_bounded_in_number_and_one_per_address(verifying, destinations):
    mf = await verifying(verify={"probe_limit": 2})
    replies = await asyncio.gather(*(rcpt(mf, f"u{n % 4}@slow.test") for n in range(8)))
    assert all(r == unverified(f"u{n % 4}@slow.test", IN_PROGRESS) for n, r in enumerate(replies))
    assert destinations.add("slow.test").connections == 2  # probe_limit 2; the RCPTs for one address share one


def refused_greeting(destinations: Destinations, domain: str, reply: str) -> str:
    host = destinations.add(domain)
    return f"host {host.mx_host}[{host.address}] refused to talk to me: {reply}"


def suspended(why: str) -> str:
    return f"delivery temporarily suspended: {why}"


async def test_a_probe_failure_makes_no_destination_dead_a_delivery_s_does_and_the_next_probe_is_suspended(
        verifying, destinations):
    mail_passes = "check_recipient_access inline:{ {mail@down.test = OK} }"
    mf = await verifying(queue=DIES_AT_ONCE, recipient_restrictions=[mail_passes, "reject_unverified_recipient"])
    down = destinations.add("down.test")
    why = refused_greeting(destinations, "down.test", SHUTTING_DOWN)
    assert await rcpt(mf, "u@down.test") == unverified("u@down.test", why)
    assert await rcpt(mf, "v@down.test") == unverified("v@down.test", why)  # probed: the failure above taught nothing
    assert down.connections == 2
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["mail@down.test"], b"Subject: x\r\n\r\nx\r\n")
    await eventually(lambda: [d for d in mf.qmgr.destinations() if d[1] == "down.test" and d[6]], timeout=5,
                     what="down.test dead in qmgr's memory after the message's attempt")
    assert await rcpt(mf, "w@down.test") == unverified("w@down.test", suspended(why))
    assert down.connections == 3  # the message's attempt; the last probe tried none


async def test_probes_go_where_address_verify_relayhost_and_transport_maps_send_them(verifying, destinations):
    good = destinations.add("good.test")
    mf = await verifying(verify={"relayhost": f"[{good.address}]:{destinations.port}"})
    assert await rcpt(mf, "u@bad.test") == status.RCPT_OK  # asked of good.test's host, which takes anyone
    assert destinations.add("bad.test").transactions == 0
    await mf.stop()  # (one server per queue)
    mf = await verifying(verify={"transport_maps": [f"inline:{{ {{soft.test = smtp:[{good.address}]}} }}"]})
    assert await rcpt(mf, "u@soft.test") == status.RCPT_OK
    assert await rcpt(mf, "u@bad.test") == unverified("u@bad.test", said(destinations, "bad.test",
                                                                         "550 5.1.1 User unknown"))
    assert destinations.add("soft.test").transactions == 0


async def test_probes_go_where_the_sender_dependent_relayhost_of_the_probe_sender_sends_them(verifying, destinations):
    """Postfix's probe is a message from address_verify_sender: sender_dependent_relayhost_maps (or [address_verify]'s
    own, address_verify_sender_dependent_relayhost_maps) route it by that sender, as mail from it."""
    good = destinations.add("good.test")
    by_probe_sender = [f"inline:{{ {{@mx.mailflow.test = [{good.address}]:{destinations.port}}} }}"]
    mf = await verifying(main={"sender_dependent_relayhost_maps": by_probe_sender})
    assert await rcpt(mf, "u@bad.test") == status.RCPT_OK  # double-bounce@mx.mailflow.test's relayhost takes anyone
    assert destinations.add("bad.test").transactions == 0
    await mf.stop()  # (one server per queue)
    mf = await verifying(verify={"sender_dependent_relayhost_maps": by_probe_sender})
    assert await rcpt(mf, "u@bad.test") == status.RCPT_OK
    assert destinations.add("bad.test").transactions == 0


async def test_a_probe_routed_to_an_undefined_transport_gets_qmgr_s_answer_for_mail(verifying, caplog):
    """A transport that is not defined: the probe is answered as qmgr answers a message routed there (one text,
    one enhanced code for both), its line error's as the mail's (Postfix's probe is a message, handed to error(8)
    as mail is)."""
    caplog.set_level(logging.INFO, logger=MAIL_LOGGER)
    mf = await verifying(verify={"transport_maps": ["inline:{ {good.test = nosuch:} }"]})
    text = "mail transport unavailable"  # Postfix's words (qmgr_deliver.c)
    assert await rcpt(mf, "u@good.test") == unverified("u@good.test", text)
    [record] = [r for r in caplog.records if getattr(r, "event", "") == "verified"]
    assert record.getMessage().partition(": ")[2] == (
        f"to=<u@good.test>, relay=none, dsn=4.3.0, status=undeliverable ({text})")
    assert record.service == "error"


async def test_with_a_sender_ttl_probes_come_from_a_stamped_sender_that_smtpd_takes_unrefused(smtp_peer,
                                                                                                mailflow_server):
    peer = await smtp_peer()
    senders = record_senders(peer)
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}", address_verify={"sender_ttl": "1d"},
                               smtpd={"recipient_restrictions": ["reject_unverified_recipient"]})
    assert await rcpt(mf, "u@relay.test") == status.RCPT_OK
    [sender] = senders
    now = ProbeSender("double-bounce", DAY, lambda a: f"{a}@mx.mailflow.test", SystemClock()).address()
    assert sender == now != "double-bounce@mx.mailflow.test"
    # mx.mailflow.test is no domain of this server's: only the exemption of its own probe sender lets it in
    assert await rcpt(mf, sender) == status.RCPT_OK
    assert await rcpt(mf, "double-bounce@mx.mailflow.test") == status.relay_denied("double-bounce@mx.mailflow.test")


async def test_without_a_sender_ttl_smtpd_takes_the_fixed_probe_sender_unrefused(mailflow_server):
    mf = await mailflow_server(smtpd={"recipient_restrictions": ["reject"]})
    assert await rcpt(mf, "Double-Bounce@mx.mailflow.test") == status.RCPT_OK
    assert await rcpt(mf, "double-bounceNGP@mx.mailflow.test") == status.relay_denied(
        "double-bounceNGP@mx.mailflow.test")


# ---------------------------------------------------------------------------------------------- the cache


class Probes:
    """A probe that answers what `answers` says for the address, counting the probes."""

    def __init__(self, answer: Status = Status.OK):
        self.answer = answer
        self.count = 0

    async def __call__(self, addr: str, probe_id: str) -> Verdict:
        self.count += 1
        return Verdict(self.answer, f"said {self.answer.value}")


async def settled(verifier: Verifier, addr: str) -> Verdict:
    verdict = verifier.query(addr)
    await verifier.wait(addr, 1.0)
    return verdict


async def test_a_deliverable_address_is_refreshed_after_7_days_and_expires_after_31():
    clock, probes = VirtualClock(), Probes()
    verifier = Verifier(DEFAULTS.address_verify, probes, clock)
    assert (await settled(verifier, "a@x.test")).status is Status.TODO
    clock.advance(6 * 86400)
    assert (await settled(verifier, "a@x.test")).status is Status.OK
    assert probes.count == 1
    clock.advance(2 * 86400)  # past the refresh time: still OK, probed again
    assert (await settled(verifier, "a@x.test")).status is Status.OK
    assert probes.count == 2
    clock.advance(32 * 86400)  # expired
    assert (await settled(verifier, "a@x.test")).status is Status.TODO


async def test_a_failure_is_refreshed_after_3_hours_expires_after_3_days_and_never_replaces_an_ok():
    clock, probes = VirtualClock(), Probes(Status.BOUNCE)
    verifier = Verifier(DEFAULTS.address_verify, probes, clock)
    await settled(verifier, "a@x.test")
    clock.advance(2 * 3600)
    assert (await settled(verifier, "a@x.test")) == Verdict(Status.BOUNCE, "said bounced")
    assert probes.count == 1
    clock.advance(2 * 3600)
    await settled(verifier, "a@x.test")
    assert probes.count == 2
    clock.advance(4 * 86400)
    assert (await settled(verifier, "a@x.test")).status is Status.TODO
    probes.answer = Status.OK
    await settled(verifier, "b@x.test")
    probes.answer = Status.DEFER
    clock.advance(8 * 86400)  # refresh due; the failed probe keeps the OK
    await settled(verifier, "b@x.test")
    assert verifier.query("b@x.test", probe=False).status is Status.OK



async def test_an_expired_ok_is_unknown_and_the_failure_of_the_next_probe_is_cached_and_answered():
    clock, probes = VirtualClock(), Probes()
    verifier = Verifier(DEFAULTS.address_verify, probes, clock)
    await settled(verifier, "a@x.test")
    probes.answer = Status.BOUNCE
    clock.advance(32 * 86400)  # the OK expired: in progress, the probe bounces
    assert (await settled(verifier, "a@x.test")).status is Status.TODO
    assert verifier.query("a@x.test") == Verdict(Status.BOUNCE, "said bounced")
    assert probes.count == 2  # the bounce is answered from the cache, not probed again


async def test_close_waits_for_the_probes_it_cancels_and_a_later_query_starts_none():
    started: list[str] = []
    ended: list[str] = []

    async def probe(addr: str, probe_id: str) -> Verdict:
        started.append(addr)
        try:
            await asyncio.Event().wait()  # (a peer that says nothing)
        finally:
            await asyncio.sleep(0)  # (closing its connection takes a turn of the loop)
            ended.append(addr)
        raise AssertionError("not reached")

    verifier = Verifier(DEFAULTS.address_verify, probe, VirtualClock())
    verifier.query("a@x.test")
    await asyncio.sleep(0)  # (the probe is under way)
    await asyncio.wait_for(verifier.close(), 1.0)
    assert ended == ["a@x.test"]
    assert verifier.query("b@x.test").status is Status.TODO
    await asyncio.sleep(0)
    assert started == ["a@x.test"]


async def test_probe_ids_go_on_across_a_reload_and_a_failed_probe_is_logged_too():
    events: list[tuple[str, str, dict]] = []

    async def fails(addr: str, probe_id: str) -> Verdict:
        raise LookupRetry("table inline:x is unavailable")

    log = MailLog(observer=lambda *event: events.append(event))
    verifier = Verifier(DEFAULTS.address_verify, Probes(), VirtualClock(), log)
    await settled(verifier, "a@x.test")
    verifier.reconfigure(DEFAULTS.address_verify, fails)
    await settled(verifier, "b@x.test")
    assert [(i, event, f["to"], f["dsn"], f["status"]) for i, event, f in events] == [
        ("VRFY000001", "verified", "a@x.test", "2.0.0", "deliverable"),
        ("VRFY000002", "verified", "b@x.test", "4.3.0", "undeliverable")]


async def test_the_probe_limit_is_logged_once_and_again_only_after_a_probe_has_ended(caplog):
    caplog.set_level(logging.INFO, logger="mailflow.verify")
    answers: dict[str, asyncio.Event] = {}

    async def probe(addr: str, probe_id: str) -> Verdict:
        await answers.setdefault(addr, asyncio.Event()).wait()
        return Verdict(Status.OK, "said deliverable")

    settings = DEFAULTS.address_verify.model_copy(update={"probe_limit": 1})
    verifier = Verifier(settings, probe, VirtualClock())
    for n in range(4):  # a@ is probed; b@, c@, d@ are over the limit: one line
        verifier.query(f"{'abcd'[n]}@x.test")
    answers.setdefault("a@x.test", asyncio.Event()).set()
    await verifier.wait("a@x.test", 1.0)
    for n in range(3):  # b@ is probed; c@, d@ over the limit again: one more line
        verifier.query(f"{'bcd'[n]}@x.test")
    assert [r.getMessage().partition(";")[0] for r in caplog.records] == \
        ["address verification: 1 probes under way (probe_limit)"] * 2
    await verifier.close()


async def test_a_probe_failure_logs_the_reason_that_names_the_table_or_the_loop(caplog):
    loop = "virtual alias loop: a@x.test -> b@x.test -> a@x.test"

    async def fails(addr: str, probe_id: str) -> Verdict:
        raise TemporaryError("4.6.0", "Alias expansion error", loop)

    verifier = Verifier(DEFAULTS.address_verify, fails, VirtualClock())
    with caplog.at_level(logging.WARNING, logger="mailflow.verify"):
        assert (await settled(verifier, "a@x.test")).status is Status.TODO
    assert verifier.query("a@x.test", probe=False) == Verdict(Status.DEFER, "Alias expansion error", "4.6.0")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, f"VRFY000001: address verification of <a@x.test>: {loop}")]

async def test_the_cache_keeps_at_most_cache_size_addresses_the_least_recently_used_go():
    probes = Probes()
    settings = DEFAULTS.address_verify.model_copy(update={"cache_size": 3})
    verifier = Verifier(settings, probes, VirtualClock())
    for n in range(10):
        await settled(verifier, f"a{n}@x.test")
    assert [verifier.query(f"a{n}@x.test", probe=False).status for n in range(10)] == [Status.TODO] * 7 + \
        [Status.OK] * 3


def long_address(n: int) -> str:
    """254 UTF-8 bytes, the longest address smtpd lets through, with an emoji in it (SMTPUTF8)."""
    return f"{n:08d}{'x' * 235}\U0001F600@x.test"


async def strangers_mx(addr: str, probe_id: str) -> Verdict:
    """What a stranger's MX answers a probe (reject_unverified_sender probes the sender's own MX): a ~4 KB reply
    (the most the SMTP client keeps), with an emoji, from a 255-character MX name."""
    mx = f"{addr[:8]}.{'m' * 60}.{'m' * 60}.{'m' * 60}.{'m' * 60}.test"[:255]
    return Verdict(Status.BOUNCE, f"host {mx}[192.0.2.1] said: 550 5.1.1 <{addr}>: {'y' * 3600}\U0001F600 "
                   "(in reply to RCPT TO command)", "5.1.1", f"{mx}[192.0.2.1]:25", "smtp")


async def test_the_cache_holds_at_most_cache_bytes_of_memory_at_its_peak(monkeypatch):
    """Python stores a string with an emoji at 4 bytes a character: counted in characters, such addresses and
    replies (strangers_mx) held 3.7 times CACHE_BYTES (241 MiB for 64). Past CACHE_BYTES, as memory counts it,
    the least recently used go (here with a smaller CACHE_BYTES, to stay fast). The peak is the cache's whatever the
    log level: no record is made while it is measured (under `-o log_level=INFO` the capture kept a result line per
    probe, 4000 of 8 KB, and the test measured them)."""
    monkeypatch.setattr(verify, "CACHE_BYTES", 4 * 2**20)
    verifier = Verifier(DEFAULTS.address_verify, strangers_mx, VirtualClock())
    await settled(verifier, long_address(0))
    disabled = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    tracemalloc.start()
    try:
        for n in range(1, 4000):
            await settled(verifier, long_address(n))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        logging.disable(disabled)
    assert verifier.query(long_address(3999), probe=False).status is Status.BOUNCE
    assert verifier.query(long_address(0), probe=False).status is Status.TODO
    assert peak < 4 * 2**20 * 1.1


async def test_a_strangers_long_replies_are_kept_cut_so_it_takes_many_probes_to_push_an_address_out(monkeypatch,
                                                                                                     caplog):
    """A probe's text is kept cut to TEXT_BYTES of memory, the log line has it whole. So a stranger's MX answering
    ~4 KB replies (strangers_mx) needs a probe per ~2 KB of CACHE_BYTES (over 30 000 for 64 MiB) to push the
    addresses in use out of the cache, not one per 17 KB (~4 000)."""
    monkeypatch.setattr(verify, "CACHE_BYTES", 2**20)
    verifier = Verifier(DEFAULTS.address_verify, Probes(), VirtualClock())
    await settled(verifier, "in-use@x.test")
    verifier.reconfigure(verifier.settings, strangers_mx)
    with caplog.at_level(logging.INFO, logger=MAIL_LOGGER):
        for n in range(2**20 // 2200):
            await settled(verifier, long_address(n))
    assert verifier.query("in-use@x.test", probe=False).status is Status.OK
    said = (await strangers_mx(long_address(0), "")).text
    kept = verifier.query(long_address(0), probe=False).text
    assert sys.getsizeof(kept) <= TEXT_BYTES + sys.getsizeof("\U0001F600") and kept == said[:len(kept) - 3] + "..."
    assert [r for r in caplog.records if said in r.getMessage()]

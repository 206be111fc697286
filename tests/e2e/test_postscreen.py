"""postscreen ([smtpd.postscreen]) in front of an mta listener, over real sockets: the teaser and the greet wait, a
pregreeting client, the cache of passed clients, the access list, DNSBL scores (from the in-process DNS) with
their actions; replies and log lines in postscreen's words (Postfix 3.7's src/postscreen)."""
from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time

import pytest

from mailflow import status
from mailflow.config import config_from_dict
from mailflow.errors import ConfigError
from tests.support import SmtpClient, eventually
from tests.support.client_certs import ClientPki
from tests.support.servers import base_settings

ZONE = """
$ORIGIN bl.test.
1.0.0.127   60 IN A 127.0.0.2
$ORIGIN wl.test.
1.0.0.127   60 IN A 127.0.0.3
"""


def screen(**settings) -> dict:
    """[smtpd] with postscreen on (no access list: loopback is not in mynetworks anyway) and a short greet wait."""
    return {"postscreen": {"enable": True, "access_list": [], "greet_wait": 0.3, **settings}}


@pytest.fixture(autouse=True)
async def no_loop_errors():
    """Every test here fails on an exception a loop callback left unhandled (a protocol's connection_lost, a
    task nobody awaited): asyncio would only log it. (Scoped to postscreen's tests, where sessions end early.)"""
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield
    await asyncio.sleep(0.05)  # the last connection_lost callbacks
    loop.set_exception_handler(None)
    assert not errors, [(e.get("message"), repr(e.get("exception"))) for e in errors]


@pytest.fixture
def screen_log(caplog):
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "mailflow.postscreen"]
    return lines


async def test_a_client_that_talks_before_its_turn_is_dropped(mailflow_server, screen_log):
    mf = await mailflow_server(smtpd=screen(greet_wait=2, greet_action="drop"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1], greet=False)
    teaser = await c.reader.readline()
    assert teaser == b"220-mx.mailflow.test ESMTP mailflow\r\n"
    await c.send(b"EHLO zombie.test\r\n")
    assert await c.reply() == status.postscreen_protocol_error(521)
    assert str(status.postscreen_protocol_error(521)) == "521 5.5.1 Protocol error"
    assert await c.closed()
    lines = screen_log()
    where = r"\[127\.0\.0\.1\]:\d+"
    assert re.fullmatch(rf"CONNECT from {where} to {where}", lines[0]), lines
    assert re.fullmatch(rf"PREGREET 18 after 0(\.\d+)? from {where}: EHLO zombie\.test\\r\\n", lines[1]), lines
    assert re.fullmatch(rf"DISCONNECT {where}", lines[2]), lines
    assert len(lines) == 3, lines


async def test_a_patient_client_passes_and_is_remembered(mailflow_server, screen_log):
    mf = await mailflow_server(smtpd=screen(greet_wait=0.5))
    port = mf.smtp_addresses[0][1]
    loop = asyncio.get_running_loop()
    started = loop.time()
    c = await SmtpClient.connect(port)  # the teaser, then smtpd's own greeting: one multi-line 220
    assert loop.time() - started >= 0.5
    assert c.greeting.text == "220-mx.mailflow.test ESMTP mailflow\n220 mx.mailflow.test ESMTP mailflow"
    assert (await c.send_message()).code == 250
    await c.cmd("QUIT")
    assert any(re.fullmatch(r"PASS NEW \[127\.0\.0\.1\]:\d+", line) for line in screen_log())

    started = loop.time()
    again = await SmtpClient.connect(port)  # cached: straight to smtpd, no teaser, no wait
    assert loop.time() - started < 0.4
    assert again.greeting.text == "220 mx.mailflow.test ESMTP mailflow"
    assert any(re.fullmatch(r"PASS OLD \[127\.0\.0\.1\]:\d+", line) for line in screen_log())
    await again.cmd("QUIT")


async def test_a_pregreet_ignored_is_logged_not_remembered(mailflow_server, screen_log):
    mf = await mailflow_server(smtpd={**screen(), "forbid_unauth_pipelining": False})
    port = mf.smtp_addresses[0][1]
    c = await SmtpClient.connect(port, first=b"NOOP\r\n", greet=False)
    assert (await c.reply()).text.startswith("220-mx.mailflow.test ESMTP mailflow\n220 ")  # smtpd takes it
    assert (await c.reply()).code == 250  # smtpd answers the early NOOP
    await c.cmd("QUIT")
    lines = screen_log()
    assert any(line.startswith("PREGREET 6 after ") for line in lines), lines
    assert not any(line.startswith("PASS") for line in lines), lines


async def test_dnsbl_enforce_hands_the_client_to_the_dummy_engine(mailflow_server, dns_zone, screen_log):
    nameserver = dns_zone(ZONE)
    mf = await mailflow_server(dns={"nameservers": [nameserver]},
                               smtpd=screen(dnsbl_sites=["bl.test=127.0.0.[2..11]*2", "bl.test=127.0.0.4"],
                                            dnsbl_threshold=2, dnsbl_action="enforce"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO zombie.test")).code == 250
    assert await c.cmd("MAIL FROM:<s@remote.test>") == status.SENDER_OK
    reply = await c.cmd("RCPT TO:<alice@local.test>")
    assert reply == status.postscreen_dnsbl(550, "127.0.0.1", "bl.test")
    assert reply.text == "550 5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test"
    assert (await c.cmd("DATA")).text == "554 5.5.1 Error: no valid recipients"
    assert await c.closed()
    lines = screen_log()
    where = r"\[127\.0\.0\.1\]:\d+"
    assert any(re.fullmatch(rf"DNSBL rank 2 for {where}", line) for line in lines), lines
    assert any(re.fullmatch(rf"NOQUEUE: reject: RCPT from {where}: 550 5\.7\.1 Service unavailable; client "
                            r"\[127\.0\.0\.1\] blocked using bl\.test; from=<s@remote\.test>, "
                            r"to=<alice@local\.test>, proto=ESMTP, helo=<zombie\.test>", line) for line in lines), lines
    await eventually(lambda: re.fullmatch(rf"DISCONNECT {where}", screen_log()[-1]))
    assert mf.smtpd.screened.passed("127.0.0.1", ("pregreet",), 0) is False  # a failed client is not remembered


async def test_a_site_adds_its_weight_once_however_many_of_its_replies_match(mailflow_server, dns_zone, screen_log):
    """psc_dnsbl_receive: a site whose filter accepts any of the list's A records adds its weight once (two records
    .2 and .4: zen.test*2 adds 2, not 4; zen.test=127.0.0.4 adds 1)."""
    zone = "$ORIGIN zen.test.\n1.0.0.127   60 IN A 127.0.0.2\n1.0.0.127   60 IN A 127.0.0.4\n"
    mf = await mailflow_server(dns={"nameservers": [dns_zone(zone)]},
                               smtpd=screen(dnsbl_sites=["zen.test*2", "zen.test=127.0.0.4"], dnsbl_threshold=3,
                                            dnsbl_action="drop"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1], greet=False)
    assert (await c.reply()).text == ("220-mx.mailflow.test ESMTP mailflow\n"
                                      "521 5.7.1 Service unavailable; client [127.0.0.1] blocked using zen.test")
    assert await c.closed()
    assert any(re.fullmatch(r"DNSBL rank 3 for \[127\.0\.0\.1\]:\d+", line) for line in screen_log()), screen_log()


async def test_a_dnsbl_pass_without_every_answer_is_remembered_for_the_min_ttl(mailflow_server, dns_zone, screen_log):
    """A list the DNS failed to answer has no TTL: Postfix clamps the pass to postscreen_dnsbl_min_ttl (not max)."""
    nameserver = dns_zone(ZONE, servfail=("1.0.0.127.bad.test",))
    mf = await mailflow_server(dns={"nameservers": [nameserver]}, smtpd=screen(
        dnsbl_sites=["wl.test=127.0.0.9", "bad.test"], dnsbl_min_ttl=60, dnsbl_max_ttl=3600, dnsbl_action="drop"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await c.cmd("QUIT")
    assert any(line.startswith("PASS NEW [127.0.0.1]:") for line in screen_log()), screen_log()
    # (dnsblog's why, as Postfix's dns_lookup words a resolver's error; mailflow left out its first sentence)
    assert ("dnsblog_query: lookup error for DNS query 1.0.0.127.bad.test: Host or domain name not found. Name "
            "service error for name=1.0.0.127.bad.test type=A: Host not found, try again") in screen_log(), screen_log()
    now = time.time()
    assert mf.smtpd.screened.passed("127.0.0.1", ("dnsbl",), now + 30)
    assert not mf.smtpd.screened.passed("127.0.0.1", ("dnsbl",), now + 120)


async def test_the_dnsbl_score_counts_the_lists_that_answered_in_time(mailflow_server, dns_zone, screen_log):
    """Postfix's partial score: a list still to answer when the greet wait ends counts nothing, the others count."""
    zone = ZONE + "$ORIGIN slow.test.\n1.0.0.127   60 IN A 127.0.0.2\n"
    nameserver = dns_zone(zone, slow=("1.0.0.127.slow.test",), delay=1.5)
    mf = await mailflow_server(dns={"nameservers": [nameserver]}, smtpd=screen(
        greet_wait=0.5, dnsbl_sites=["bl.test", "slow.test*5"], dnsbl_action="drop"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1], greet=False)
    assert (await c.reply()).text.endswith("\n521 5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test")
    assert any(re.fullmatch(r"DNSBL rank 1 for \[127\.0\.0\.1\]:\d+", line) for line in screen_log()), screen_log()


async def test_dnsbl_queries_ask_a_records_once_per_client(mailflow_server, dns_zone, screen_log):
    """As dnsblog: A records only; two connections of one client in the tests at once share one query
    (psc_dnsbl_request: one score per client address)."""
    asked: list[tuple[str, str]] = []
    nameserver = dns_zone(ZONE, slow=("1.0.0.127.bl.test",), delay=0.4, asked=asked)
    mf = await mailflow_server(dns={"nameservers": [nameserver]}, smtpd=screen(
        greet_wait=1, dnsbl_sites=["bl.test"], dnsbl_action="drop"))
    port = mf.smtp_addresses[0][1]
    clients = await asyncio.gather(*(SmtpClient.connect(port, greet=False) for _ in range(2)))
    for c in clients:
        assert (await c.reply()).text.endswith(" blocked using bl.test")
    assert asked == [("1.0.0.127.bl.test.", "A")], asked


async def test_a_cached_client_meets_only_its_expired_tests(mailflow_server, dns_zone, screen_log):
    """psc_parse_tests / psc_early_tests: only the DNSBL due: no teaser, no read, the wait ends with the DNSBL
    answer, then `PASS OLD`; only the pregreet due: the teaser and the wait, no DNSBL query."""
    asked: list[tuple[str, str]] = []
    mf = await mailflow_server(dns={"nameservers": [dns_zone(ZONE, asked=asked)]}, smtpd=screen(
        greet_wait=3, dnsbl_sites=["bl.test=127.0.0.9"]))
    port = mf.smtp_addresses[0][1]
    cache = mf.smtpd.screened
    cache.record("127.0.0.1", {"pregreet": time.time() + 1000, "dnsbl": 0.0}, time.time())  # the DNSBL pass expired
    loop = asyncio.get_running_loop()
    started = loop.time()
    c = await SmtpClient.connect(port)
    assert c.greeting.text == "220 mx.mailflow.test ESMTP mailflow"
    assert loop.time() - started < 2
    await c.cmd("QUIT")
    assert asked == [("1.0.0.127.bl.test.", "A")], asked
    assert cache.passed("127.0.0.1", ("pregreet", "dnsbl"), time.time())
    assert re.fullmatch(r"PASS OLD \[127\.0\.0\.1\]:\d+", screen_log()[-1]), screen_log()

    cache.record("127.0.0.1", {"pregreet": 0.0}, time.time())  # now only the pregreet test is due
    c = await SmtpClient.connect(port)
    assert c.greeting.text.startswith("220-")
    await c.cmd("QUIT")
    assert len(asked) == 1, asked


async def test_a_listing_the_filter_refuses_counts_nothing(mailflow_server, dns_zone, screen_log):
    nameserver = dns_zone(ZONE)
    mf = await mailflow_server(dns={"nameservers": [nameserver]},
                               smtpd=screen(dnsbl_sites=["bl.test=127.0.0.4"], dnsbl_action="drop"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.send_message()).code == 250
    await c.cmd("QUIT")
    assert not any(line.startswith("DNSBL rank") for line in screen_log())


async def test_dnsbl_drop_refuses_in_place_of_the_greeting(mailflow_server, dns_zone, screen_log):
    nameserver = dns_zone(ZONE)
    mf = await mailflow_server(dns={"nameservers": [nameserver]},
                               smtpd=screen(dnsbl_sites=["bl.test"], dnsbl_action="drop"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1], greet=False)
    reply = await c.reply()
    assert reply.text == ("220-mx.mailflow.test ESMTP mailflow\n"
                          "521 5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test")
    assert await c.closed()
    assert any(line.startswith("DNSBL rank 1 for [127.0.0.1]:") for line in screen_log())


async def test_soft_bounce_softens_the_pregreet_and_dnsbl_drops(mailflow_server, dns_zone, tmp_path):
    """soft_bounce (psc_send_reply): the pregreet drop's 521 and the DNSBL drop's 521 go out as 421 (the code's and
    the enhanced code's first digit), as every 5xx postscreen sends."""
    nameserver = dns_zone(ZONE)
    mf = await mailflow_server(soft_bounce=True, dns={"nameservers": [nameserver]},
                               smtpd=screen(dnsbl_sites=["bl.test"], dnsbl_action="drop"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1], greet=False)
    assert (await c.reply()).text == ("220-mx.mailflow.test ESMTP mailflow\n"
                                      "421 4.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test")
    assert await c.closed()
    await mf.stop()
    mf = await mailflow_server(soft_bounce=True, smtpd=screen(greet_wait=2, greet_action="drop"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1], greet=False)
    await c.reader.readline()
    await c.send(b"EHLO zombie.test\r\n")
    assert (await c.reply()).text == "421 4.5.1 Protocol error"
    assert await c.closed()


async def test_a_negative_score_allowlists_and_ends_the_wait(mailflow_server, dns_zone, screen_log):
    nameserver = dns_zone(ZONE)
    mf = await mailflow_server(dns={"nameservers": [nameserver]},
                               smtpd=screen(greet_wait=4, dnsbl_sites=["wl.test*-2"], dnsbl_allowlist_threshold=-1))
    loop = asyncio.get_running_loop()
    started = loop.time()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert loop.time() - started < 3
    assert (await c.send_message()).code == 250
    await c.cmd("QUIT")
    assert any(line.startswith("PASS NEW [127.0.0.1]:") for line in screen_log())
    now = time.time()  # psc_allowlist_non_dnsbl: the pregreet pass lasts as the DNSBL's (1 h here), not greet_ttl
    assert mf.smtpd.screened.passed("127.0.0.1", ("pregreet", "dnsbl"), now + 3000)
    assert not mf.smtpd.screened.passed("127.0.0.1", ("pregreet",), now + 4000)


async def test_the_access_list_denylists_and_allowlists(mailflow_server, tmp_path, screen_log):
    table = tmp_path / "access.cidr"
    table.write_text("127.0.0.1/32 reject\n")
    mf = await mailflow_server(smtpd=screen(greet_wait=5, access_list=[f"cidr:{table}"], denylist_action="drop"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1], greet=False)
    assert (await c.reply()).text == "521 5.3.2 Service currently unavailable"
    assert await c.closed()
    assert any(line.startswith("DENYLISTED [127.0.0.1]:") for line in screen_log())

    await mf.stop()
    table.write_text("127.0.0.1/32 permit\n")
    allowed = await mailflow_server(smtpd=screen(greet_wait=5, access_list=[f"cidr:{table}"]))
    c = await SmtpClient.connect(allowed.smtp_addresses[0][1], timeout=2)
    assert c.greeting.text == "220 mx.mailflow.test ESMTP mailflow"  # no teaser, no wait
    await c.cmd("QUIT")
    assert any(line.startswith("ALLOWLISTED [127.0.0.1]:") for line in screen_log())


async def test_a_denylisted_client_under_ignore_still_passes_and_is_remembered(mailflow_server, tmp_path,
                                                                                screen_log):
    """PSC_UNFAIL_SESSION_STATE, as a private Postfix 3.7.11 logged it: DENYLISTED, PASS NEW; then DENYLISTED,
    PASS OLD (no teaser)."""
    table = tmp_path / "access.cidr"
    table.write_text("127.0.0.0/8 reject\n")
    mf = await mailflow_server(smtpd=screen(access_list=[f"cidr:{table}"], denylist_action="ignore"))
    port = mf.smtp_addresses[0][1]
    for greeting in ("220-mx.mailflow.test ESMTP mailflow\n220 mx.mailflow.test ESMTP mailflow",
                     "220 mx.mailflow.test ESMTP mailflow"):
        c = await SmtpClient.connect(port)
        assert c.greeting.text == greeting
        await c.cmd("QUIT")
    lines = [re.sub(r"\]:\d+", "]:PORT", line) for line in screen_log() if not line.startswith("CONNECT")]
    assert lines == ["DENYLISTED [127.0.0.1]:PORT", "PASS NEW [127.0.0.1]:PORT", "DENYLISTED [127.0.0.1]:PORT",
                     "PASS OLD [127.0.0.1]:PORT"], lines


async def test_a_pregreet_under_ignore_keeps_the_dnsbl_pass(mailflow_server, dns_zone, screen_log):
    """ignore: the pregreet test is not passed (repeated next time, no PASS NEW), the DNSBL pass is cached."""
    mf = await mailflow_server(dns={"nameservers": [dns_zone(ZONE)]}, smtpd={
        **screen(dnsbl_sites=["bl.test=127.0.0.9"]), "forbid_unauth_pipelining": False})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1], first=b"NOOP\r\n", greet=False)
    assert (await c.reply()).text.startswith("220-")
    await c.cmd("QUIT")
    now = time.time()
    assert mf.smtpd.screened.passed("127.0.0.1", ("dnsbl",), now)
    assert not mf.smtpd.screened.passed("127.0.0.1", ("pregreet",), now)
    assert not any(line.startswith("PASS") for line in screen_log()), screen_log()


async def test_an_unknown_access_answer_ends_the_access_list_as_postfix(mailflow_server, tmp_path, screen_log):
    """server_acl_eval: answers are case-sensitive; an unknown one (PERMIT) is warned about and ends the list as
    dunno (the reject of the next table is not reached; the client meets the tests)."""
    first, second = tmp_path / "first.cidr", tmp_path / "second.cidr"
    first.write_text("127.0.0.1/32 PERMIT\n")
    second.write_text("127.0.0.1/32 reject\n")
    mf = await mailflow_server(smtpd=screen(access_list=[f"cidr:{first}", f"cidr:{second}"], denylist_action="drop"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert c.greeting.text.startswith("220-")
    await c.cmd("QUIT")
    lines = screen_log()
    assert f"cidr:{first}: unknown command: PERMIT -- ignoring the remainder of this access list" in lines, lines
    assert not any(line.startswith(("ALLOWLISTED", "DENYLISTED")) for line in lines), lines


async def test_postscreen_on_one_listener_only(mailflow_server, screen_log):
    mf = await mailflow_server(smtpd={"listeners": [{"address": "127.0.0.1:0", "overrides": screen()}]})
    plain, screened = mf.smtp_addresses[0][1], mf.smtp_addresses[1][1]
    c = await SmtpClient.connect(plain)
    assert c.greeting.text == "220 mx.mailflow.test ESMTP mailflow"
    await c.cmd("QUIT")
    assert screen_log() == []
    c = await SmtpClient.connect(screened)
    assert c.greeting.text.startswith("220-")
    await c.cmd("QUIT")


def test_config_errors_name_the_key(tmp_path):
    bad_site = {**base_settings(tmp_path), "smtpd": screen(dnsbl_sites=["bl.test=127.0.[1"])}
    with pytest.raises(ConfigError, match=r"smtpd\.postscreen\.dnsbl_sites.*127\.0\.\[1"):
        config_from_dict(bad_site)
    submission = {**base_settings(tmp_path), "smtpd": {"listeners": [
        {"address": "127.0.0.1:0", "role": "submissions",
         "overrides": {**screen(), "sasl_user_maps": ["inline:{ alice=x }"]}}]}}
    with pytest.raises(ConfigError, match="postscreen screens mta listeners only"):
        config_from_dict(submission)


async def test_a_global_screen_leaves_submission_listeners_alone_and_overrides_merge_key_by_key(
        mailflow_server, tmp_path, pki):
    """[smtpd.postscreen] on for the server: an mta listener's override of one key keeps the rest (enable); a
    submission listener is not screened (its role presets it off), and the configuration is accepted."""
    _, cert, _ = pki
    mf = await mailflow_server(smtpd={
        **screen(greet_wait=3), "listen": [], "tls_cert_file": str(cert), "listeners": [
            {"address": "127.0.0.1:0", "role": "mta", "overrides": {"postscreen": {"greet_wait": 0.2}}},
            {"address": "127.0.0.1:0", "role": "submission",
             "overrides": {"sasl_user_maps": ["inline:{ alice=x }"]}}]})
    (_, mta), (_, submission) = mf.smtp_addresses[:2]
    loop = asyncio.get_running_loop()
    started = loop.time()
    c = await SmtpClient.connect(mta)
    assert c.greeting.text.startswith("220-") and loop.time() - started < 2  # screened, with its own greet_wait
    await c.cmd("QUIT")
    c = await SmtpClient.connect(submission)
    assert c.greeting.text == "220 mx.mailflow.test ESMTP mailflow"  # no teaser
    await c.cmd("QUIT")


async def test_a_long_pregreet_is_counted_whole_and_quoted_to_100_characters(mailflow_server, screen_log):
    mf = await mailflow_server(smtpd=screen(greet_wait=2, greet_action="drop"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1], greet=False)
    await c.reader.readline()
    await c.send(b"X" * 300 + b"\r\n")
    assert (await c.reply()).code == 521
    pregreet = next(line for line in screen_log() if line.startswith("PREGREET"))
    assert re.fullmatch(r"PREGREET 302 after \S+ from \[127\.0\.0\.1\]:\d+: X{100}", pregreet), pregreet


async def test_a_client_that_leaves_during_the_wait_is_logged_as_postscreen_does(mailflow_server, screen_log):
    mf = await mailflow_server(smtpd=screen(greet_wait=2))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1], greet=False)
    await c.reader.readline()
    c.writer.close()
    await eventually(lambda: screen_log()[-1].startswith("DISCONNECT"))
    assert re.fullmatch(r"HANGUP after \S+ from \[127\.0\.0\.1\]:\d+ in tests before SMTP handshake",
                        screen_log()[-2]), screen_log()
    assert mf.smtpd.sessions == set()


async def test_a_reload_turns_postscreen_on_and_the_cache_outlives_reloads(mailflow_server, screen_log):
    mf = await mailflow_server()
    port = mf.smtp_addresses[0][1]
    settings = mf.config.model_dump()
    await mf.reload(config_from_dict({**settings, "smtpd": {**settings["smtpd"], **screen(greet_wait=0.2)}}))
    c = await SmtpClient.connect(port)
    assert c.greeting.text.startswith("220-")  # new sessions are screened
    await c.cmd("QUIT")
    assert any(line.startswith("PASS NEW [127.0.0.1]:") for line in screen_log())
    settings = mf.config.model_dump()
    await mf.reload(config_from_dict({**settings, "smtpd": {**settings["smtpd"], **screen(greet_wait=3)}}))
    c = await SmtpClient.connect(port, timeout=2)
    assert c.greeting.text == "220 mx.mailflow.test ESMTP mailflow"  # remembered across the reload
    await c.cmd("QUIT")
    assert screen_log()[-1].startswith("PASS OLD [127.0.0.1]:")


async def test_a_client_cached_before_a_test_was_enabled_passes_old(mailflow_server, screen_log):
    """psc_print_tests stores a test not enabled as passed long ago: once it is enabled the client meets it, and its
    pass is `PASS OLD`, not NEW."""
    mf = await mailflow_server(smtpd=screen())
    port = mf.smtp_addresses[0][1]
    c = await SmtpClient.connect(port)
    await c.cmd("QUIT")
    settings = mf.config.model_dump()
    await mf.reload(config_from_dict({**settings, "smtpd": {**settings["smtpd"], **screen(pipelining_enable=True)}}))
    c = await SmtpClient.connect(port)
    assert c.greeting.text == "220 mx.mailflow.test ESMTP mailflow"  # (the dummy engine: pregreet still passed)
    assert (await through_rcpt(c))[-1] == status.POSTSCREEN_COME_BACK
    await c.cmd("QUIT")
    await eventually(lambda: screen_log()[-1].startswith("DISCONNECT"))
    passes = [line for line in screen_log() if line.startswith("PASS")]
    assert len(passes) == 2 and passes[0].startswith("PASS NEW") and passes[1].startswith("PASS OLD"), screen_log()


async def test_concurrent_connections_of_one_client_log_pass_new_once(mailflow_server, screen_log):
    """psc_conclude's pass_new_count: of one client's connections in the screen at once only the first is NEW."""
    mf = await mailflow_server(smtpd=screen(pipelining_enable=True))
    port = mf.smtp_addresses[0][1]
    clients = await asyncio.gather(SmtpClient.connect(port), SmtpClient.connect(port))
    for c in clients:
        await through_rcpt(c)
    for c in clients:
        await c.cmd("QUIT")
    await eventually(lambda: sum(line.startswith("DISCONNECT") for line in screen_log()) == 2)
    passes = [line.split(" [")[0] for line in screen_log() if line.startswith("PASS")]
    assert passes == ["PASS NEW", "PASS OLD"], screen_log()


async def test_a_deep_test_one_connection_fails_undoes_the_pass_another_connection_shared(mailflow_server,
                                                                                          screen_log):
    """B passes the pipelining test at its RCPT (into the record the client's connections share); A, at the same
    time, fails it under enforce, which undoes that pass for every connection (Postfix: expire_time[...] =
    PSC_TIME_STAMP_DISABLED). B's end caches the record, so the client's next connection meets the test again."""
    mf = await mailflow_server(smtpd={**screen(pipelining_enable=True), "forbid_unauth_pipelining": False})
    port = mf.smtp_addresses[0][1]
    b = await SmtpClient.connect(port)
    a = await SmtpClient.connect(port)  # (B passed the pregreet test: A skips it and meets the pipelining test)
    assert (await through_rcpt(b))[-1] == status.POSTSCREEN_COME_BACK
    await a.send(b"EHLO a.test\r\nNOOP\r\n")
    assert [(await a.reply()).code for _ in range(2)] == [250, 250]
    await eventually(lambda: any(line.startswith("COMMAND PIPELINING") for line in screen_log()))
    await a.cmd("QUIT")
    await b.cmd("QUIT")
    await eventually(lambda: sum(line.startswith("DISCONNECT") for line in screen_log()) == 2)
    assert any(line.startswith("PASS NEW") for line in screen_log()), screen_log()
    c = await SmtpClient.connect(port)
    assert "PIPELINING" not in (await c.cmd("EHLO c.test")).text  # the dummy engine again, not smtpd
    await c.close()


async def test_the_teaser_can_be_set_or_left_out(mailflow_server):
    mf = await mailflow_server(smtpd=screen(greet_wait=0.1, greet_banner="hold on"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert c.greeting.text == "220-hold on\n220 mx.mailflow.test ESMTP mailflow"
    await c.cmd("QUIT")
    await mf.stop()
    quiet = await mailflow_server(smtpd=screen(greet_wait=0.1, greet_banner=""))
    c = await SmtpClient.connect(quiet.smtp_addresses[0][1])
    assert c.greeting.text == "220 mx.mailflow.test ESMTP mailflow"
    await c.cmd("QUIT")


async def test_a_denylisted_client_under_enforce_meets_the_dummy_engine(mailflow_server, tmp_path, screen_log):
    table = tmp_path / "access.cidr"
    table.write_text("127.0.0.0/8 reject\n")
    mf = await mailflow_server(smtpd=screen(access_list=[f"cidr:{table}"], denylist_action="enforce"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("HELO zombie.test")).text == "250 mx.mailflow.test"
    assert (await c.cmd("MAIL FROM:<>")).code == 250
    assert await c.cmd("RCPT TO:<alice@local.test>") == status.postscreen_denylisted(550)
    assert (await c.cmd("QUIT")).text == "221 2.0.0 Bye"
    assert any(line.endswith("550 5.3.2 Service currently unavailable; from=<>, to=<alice@local.test>, proto=SMTP, "
                              "helo=<zombie.test>") for line in screen_log()), screen_log()


async def test_a_denylisted_clients_second_connection_meets_the_dummy_engine_too(mailflow_server, tmp_path,
                                                                                    screen_log):
    """denylist_action enforce: a second connection while the first is in the dummy engine (it passed the pregreet
    test, so the shared record has every test passed) is still refused at RCPT, never handed to smtpd (Postfix's
    PSC_STATE_FLAG_NOFORWARD: psc_smtpd_tests)."""
    table = tmp_path / "access.cidr"
    table.write_text("127.0.0.0/8 reject\n")
    mf = await mailflow_server(smtpd=screen(access_list=[f"cidr:{table}"], denylist_action="enforce"))
    port = mf.smtp_addresses[0][1]
    first = await SmtpClient.connect(port)
    assert (await first.cmd("HELO zombie.test")).code == 250
    second = await SmtpClient.connect(port)
    assert "PIPELINING" not in (await second.cmd("EHLO zombie.test")).text  # the dummy engine's EHLO
    assert (await second.cmd("MAIL FROM:<s@remote.test>")).code == 250
    assert await second.cmd("RCPT TO:<alice@local.test>") == status.postscreen_denylisted(550)
    await first.close()
    await second.close()
    assert sum(line.startswith("DENYLISTED") for line in screen_log()) == 2, screen_log()


async def test_a_cached_client_denylisted_later_shares_no_cached_pass_with_its_second_connection(
        mailflow_server, tmp_path, screen_log):
    """A client denylisted under enforce is not looked up in the cache (psc_new_tests: every test new), so a second
    connection during its first's greet wait shares nothing cached: it meets the teaser and the greet wait too."""
    mf = await mailflow_server(smtpd=screen(greet_wait=0.2))
    port = mf.smtp_addresses[0][1]
    c = await SmtpClient.connect(port)
    await c.cmd("QUIT")
    await eventually(lambda: any(line.startswith("PASS NEW") for line in screen_log()))
    table = tmp_path / "access.cidr"
    table.write_text("127.0.0.0/8 reject\n")
    settings = mf.config.model_dump()
    await mf.reload(config_from_dict({**settings, "smtpd": {**settings["smtpd"], **screen(
        greet_wait=1, access_list=[f"cidr:{table}"], denylist_action="enforce")}}))
    first = await SmtpClient.connect(port, greet=False)
    assert (await first.reader.readline()).startswith(b"220-")  # the teaser: in its greet wait
    second = await SmtpClient.connect(port, greet=False)
    assert (await asyncio.wait_for(second.reader.readline(), 3)).startswith(b"220-")  # not the engine's 220 at once
    await first.close()
    await second.close()


async def screened(port: int, count: int) -> list[SmtpClient]:
    """`count` clients in their greet wait (each has had the teaser), each holding a screening place."""
    clients = [await SmtpClient.connect(port, greet=False) for _ in range(count)]
    for client in clients:
        assert (await asyncio.wait_for(client.reader.readline(), 3)).startswith(b"220-")
    return clients


async def test_beyond_the_screening_places_a_client_is_told_to_come_back(mailflow_server, screen_log):
    """postscreen_pre_queue_limit's least, 10 (Postfix refuses less), all taken. A greet wait of 10 s: the first
    client's must not end (freeing its place) while a loaded host sets up the other nine."""
    mf = await mailflow_server(smtpd=screen(greet_wait=10, pre_queue_limit=10))
    port = mf.smtp_addresses[0][1]
    held = await screened(port, 10)
    second = await SmtpClient.connect(port, greet=False)
    assert await second.reply() == status.SCREENING_PORTS_BUSY
    assert str(status.SCREENING_PORTS_BUSY) == "421 4.3.2 All screening ports are busy"
    assert await second.closed()
    assert any(re.fullmatch(r"reject: connect from \[127\.0\.0\.1\]:\d+: all screening ports busy", line)
               for line in screen_log()), screen_log()
    for client in held:
        client.writer.close()


async def test_allowlisted_and_cached_clients_pass_while_the_screening_places_are_full(mailflow_server, screen_log):
    """psc_endpt_lookup_done: the access list and the cache come before "all screening ports busy"."""
    mf = await mailflow_server(mynetworks=["127.0.0.2/32"],
                               smtpd=screen(greet_wait=10, pre_queue_limit=10, access_list=["permit_mynetworks"]))
    port = mf.smtp_addresses[0][1]
    zombies = await screened(port, 10)  # holding every place
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
    assert await asyncio.wait_for(reader.readline(), 3) == b"220 mx.mailflow.test ESMTP mailflow\r\n"
    assert any(re.fullmatch(r"ALLOWLISTED \[127\.0\.0\.2\]:\d+", line) for line in screen_log()), screen_log()
    writer.close()
    for zombie in zombies:
        zombie.writer.close()


async def test_one_client_has_at_most_its_connection_count_in_the_screen(mailflow_server, screen_log):
    """postscreen_client_connection_count_limit (by default smtpd's): the one beyond it gets Postfix's 421 4.7.0."""
    mf = await mailflow_server(smtpd=screen(greet_wait=10, client_connection_count_limit=2))
    port = mf.smtp_addresses[0][1]
    held = [await SmtpClient.connect(port, greet=False) for _ in range(2)]
    for c in held:
        assert (await c.reader.readline()).startswith(b"220-")
    third = await SmtpClient.connect(port, greet=False)
    assert await third.reply() == status.SCREENING_TOO_MANY_CONNECTIONS
    assert str(status.SCREENING_TOO_MANY_CONNECTIONS) == "421 4.7.0 Error: too many connections"
    assert await third.closed()
    await eventually(lambda: screen_log()[-1].startswith("DISCONNECT"))
    assert re.fullmatch(r"NOQUEUE: reject: CONNECT from \[127\.0\.0\.1\]:\d+: too many connections",
                        screen_log()[-2]), screen_log()
    held[0].writer.close()
    await eventually(lambda: any(line.startswith("HANGUP") for line in screen_log()))
    again = await SmtpClient.connect(port, greet=False)  # a place of its own again
    assert (await again.reader.readline()).startswith(b"220-")
    for c in (held[1], again):
        c.writer.close()


async def test_the_screens_connection_count_is_smtpds_by_default(mailflow_server):
    mf = await mailflow_server(smtpd={"client_connection_count_limit": 1, **screen(greet_wait=3)})
    port = mf.smtp_addresses[0][1]
    first = await SmtpClient.connect(port, greet=False)
    assert (await first.reader.readline()).startswith(b"220-")
    second = await SmtpClient.connect(port, greet=False)  # (the default: smtpd's limit)
    assert await second.reply() == status.SCREENING_TOO_MANY_CONNECTIONS
    first.writer.close()


async def test_a_pregreet_still_waits_for_the_dnsbl_answer(mailflow_server, dns_zone, screen_log):
    """The DNS answers after the client has talked: postscreen waits on (within greet_wait) and counts it."""
    nameserver = dns_zone(ZONE, slow=("1.0.0.127.bl.test",), delay=0.3)
    mf = await mailflow_server(dns={"nameservers": [nameserver]},
                               smtpd=screen(greet_wait=2, dnsbl_sites=["bl.test"], dnsbl_action="drop"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1], first=b"EHLO zombie.test\r\n", greet=False)
    assert (await c.reply()).text.endswith("\n521 5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test")
    lines = screen_log()
    assert lines[1].startswith("PREGREET 18 after ") and lines[2].startswith("DNSBL rank 1 for "), lines


async def test_a_pregreet_is_logged_at_its_first_read_and_dropped_without_the_dnsbl(mailflow_server, dns_zone,
                                                                                      screen_log):
    """psc_early_event: PREGREET n is what the first read found, when it found it; under drop the client goes at
    once (the DNSBL answer is not waited for); under ignore the wait goes on for the DNSBL (below)."""
    nameserver = dns_zone(ZONE, slow=("1.0.0.127.bl.test",), delay=1.0)
    mf = await mailflow_server(dns={"nameservers": [nameserver]}, smtpd={
        **screen(greet_wait=3, dnsbl_sites=["bl.test"], greet_action="drop"), "forbid_unauth_pipelining": False})
    loop = asyncio.get_running_loop()
    started = loop.time()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1], first=b"EHLO zombie.test\r\n", greet=False)
    assert (await c.reply()).text.endswith("\n521 5.5.1 Protocol error")
    assert loop.time() - started < 0.8
    assert not any(line.startswith("DNSBL") for line in screen_log())


async def test_a_pregreet_ignored_waits_for_the_dnsbl_and_is_logged_as_first_read(mailflow_server, dns_zone,
                                                                                   screen_log):
    nameserver = dns_zone(ZONE, slow=("1.0.0.127.bl.test",), delay=1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    ignoring = await mailflow_server(dns={"nameservers": [nameserver]}, smtpd={
        **screen(greet_wait=3, dnsbl_sites=["bl.test=127.0.0.9"]), "forbid_unauth_pipelining": False})
    c = await SmtpClient.connect(ignoring.smtp_addresses[0][1], first=b"NOOP\r\n", greet=False)
    await asyncio.sleep(0.3)
    await c.send(b"NOOP\r\n")  # while the DNSBL is still to answer
    assert (await c.reply()).text.startswith("220-mx.mailflow.test ESMTP mailflow\n220 ")
    pregreets = [line for line in screen_log() if line.startswith("PREGREET")]
    assert re.fullmatch(r"PREGREET 6 after 0(\.0\d*)? from \[127\.0\.0\.1\]:\d+: NOOP\\r\\n", pregreets[-1]), pregreets
    assert loop.time() - started >= 1.0  # (the wait went on for the DNSBL's answer)


async def test_the_dummy_engine_times_out_and_sees_a_hangup_as_postscreen(mailflow_server, dns_zone, screen_log):
    nameserver = dns_zone(ZONE)
    mf = await mailflow_server(dns={"nameservers": [nameserver]}, smtpd={
        "timeout": 0.5, **screen(dnsbl_sites=["bl.test"], dnsbl_action="enforce")})
    port = mf.smtp_addresses[0][1]
    c = await SmtpClient.connect(port)
    assert (await c.cmd("HELO zombie.test")).code == 250
    for _ in range(3):  # (longer than `timeout` in all: the deadline is per command, smtpd's own timer is off)
        await asyncio.sleep(0.3)
        assert (await c.cmd("NOOP")).code == 250
    assert await c.reply(timeout=3) == status.session_timeout("mx.mailflow.test")
    assert await c.closed()
    await eventually(lambda: screen_log()[-1].startswith("DISCONNECT"))
    assert re.fullmatch(r"COMMAND TIME LIMIT from \[127\.0\.0\.1\]:\d+ after NOOP", screen_log()[-2]), screen_log()

    c = await SmtpClient.connect(port)
    c.writer.close()
    await eventually(lambda: screen_log()[-1].startswith("DISCONNECT") and "HANGUP" in screen_log()[-2])
    assert re.fullmatch(r"HANGUP after \S+ from \[127\.0\.0\.1\]:\d+ in tests after SMTP handshake",
                        screen_log()[-2]), screen_log()


async def test_a_greet_wait_longer_than_smtpds_timeout_is_not_cut(mailflow_server):
    mf = await mailflow_server(smtpd={"timeout": 0.3, **screen(greet_wait=0.8)})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert c.greeting.text.endswith("\n220 mx.mailflow.test ESMTP mailflow")
    assert (await c.cmd("NOOP")).code == 250


async def test_the_dummy_engine_bounds_commands_and_line_length_as_postscreen(mailflow_server, tmp_path, screen_log):
    """postscreen_smtpd.c, as a private Postfix 3.7.11 answered (postscreen_command_count_limit = 3): beyond the
    limit (QUIT excepted) `COMMAND COUNT LIMIT` and the generic 421; a line of line_limit (2048) bytes before its
    end `COMMAND LENGTH LIMIT` and the same 421; a bare LF ends a line."""
    table = tmp_path / "access.cidr"
    table.write_text("127.0.0.0/8 reject\n")
    mf = await mailflow_server(smtpd=screen(access_list=[f"cidr:{table}"], denylist_action="enforce",
                                            command_count_limit=3))
    port = mf.smtp_addresses[0][1]
    unavailable = status.postscreen_unavailable("mx.mailflow.test")
    assert str(unavailable) == "421 mx.mailflow.test Service unavailable - try again later"

    c = await SmtpClient.connect(port)
    await c.send(b"NOOP\nNOOP\r\n" + b"HELO x\r\n" * 1000)  # pipelined, never read meanwhile
    assert [(await c.reply()).code for _ in range(3)] == [250, 250, 250]
    assert await c.reply() == unavailable
    assert await c.closed()
    await eventually(lambda: screen_log()[-1].startswith("DISCONNECT"))
    assert re.fullmatch(r"COMMAND COUNT LIMIT from \[127\.0\.0\.1\]:\d+ after HELO", screen_log()[-2]), screen_log()

    c = await SmtpClient.connect(port)
    await c.send(b"NOOP\r\nNOOP\r\nNOOP\r\nQUIT\r\n")  # QUIT beyond the limit is still answered
    assert [(await c.reply()).code for _ in range(4)] == [250, 250, 250, 221]
    assert await c.closed()

    c = await SmtpClient.connect(port)
    await c.send(b"NOOP " + b"x" * 2043 + b"\r\n")  # 2048 bytes before its CRLF: one too many (Postfix 3.7)
    assert await c.reply() == unavailable
    assert await c.closed()
    await eventually(lambda: screen_log()[-1].startswith("DISCONNECT"))
    assert re.fullmatch(r"COMMAND LENGTH LIMIT from \[127\.0\.0\.1\]:\d+ after CONNECT", screen_log()[-2]), screen_log()

    c = await SmtpClient.connect(port)
    await c.send(b"NOOP " + b"x" * 2042 + b"\nQUIT\r\n")  # 2047 bytes before a bare LF: the longest line taken
    assert (await c.reply()).code == 250
    assert (await c.reply()).code == 221


# -- the deep protocol tests (postscreen_smtpd.c): in the dummy engine after the 220; a client that passes them is told
# 450 at its RCPT, cached, and goes to smtpd when it comes back

DEEP = {"pipelining_enable": True, "non_smtp_command_enable": True, "bare_newline_enable": True}
WHERE = r"\[127\.0\.0\.1\]:\d+"


async def through_rcpt(c: SmtpClient, ehlo: bytes = b"EHLO client.test\r\n") -> list:
    """EHLO (as given), MAIL and RCPT one at a time: their replies."""
    await c.send(ehlo)
    return [await c.reply(), await c.cmd("MAIL FROM:<s@remote.test>"), await c.cmd("RCPT TO:<alice@local.test>")]


async def test_a_client_that_passes_the_deep_tests_comes_back_to_smtpd(mailflow_server, screen_log):
    mf = await mailflow_server(smtpd=screen(**DEEP, pipelining_ttl="2d"))
    port = mf.smtp_addresses[0][1]
    c = await SmtpClient.connect(port)
    assert c.greeting.text == "220-mx.mailflow.test ESMTP mailflow\n220 mx.mailflow.test ESMTP mailflow"
    ehlo, mail, rcpt = await through_rcpt(c)
    assert "250-SIZE 10240000" in ehlo.text.splitlines() and "PIPELINING" not in ehlo.text
    assert mail.code == 250
    assert rcpt == status.POSTSCREEN_COME_BACK
    assert str(rcpt.text) == "450 4.3.2 Service currently unavailable"
    assert (await c.cmd("QUIT")).text == "221 2.0.0 Bye"
    assert await c.closed()
    await eventually(lambda: screen_log()[-1].startswith("DISCONNECT"))
    assert re.fullmatch(rf"PASS NEW {WHERE}", screen_log()[-2]), screen_log()
    assert re.fullmatch(rf"NOQUEUE: reject: RCPT from {WHERE}: 450 4\.3\.2 Service currently unavailable; "
                        r"from=<s@remote\.test>, to=<alice@local\.test>, proto=ESMTP, helo=<client\.test>",
                        screen_log()[-3]), screen_log()
    now = time.time()
    cache = mf.smtpd.screened
    assert cache.passed("127.0.0.1", ("pregreet", "pipelining", "non_smtp_command", "bare_newline"), now)
    assert not cache.passed("127.0.0.1", ("pipelining",), now + 2 * 86400 + 5)  # its own TTL
    assert cache.passed("127.0.0.1", ("non_smtp_command", "bare_newline"), now + 29 * 86400)

    again = await SmtpClient.connect(port)  # cached: smtpd's own greeting at once, and mail goes through
    assert again.greeting.text == "220 mx.mailflow.test ESMTP mailflow"
    assert (await again.send_message()).code == 250
    assert re.fullmatch(rf"PASS OLD {WHERE}", [line for line in screen_log() if line.startswith("PASS")][-1])


async def test_a_dnsbl_allowlisted_client_skips_the_deep_tests(mailflow_server, dns_zone, screen_log):
    """psc_allowlist_non_dnsbl: a score at or below a negative allowlist threshold passes every other test, the deep
    ones too: smtpd's own 220 in this connection, mail accepted, each test cached for the DNSBL TTL."""
    mf = await mailflow_server(dns={"nameservers": [dns_zone(ZONE)]}, smtpd=screen(
        **DEEP, greet_wait=4, dnsbl_sites=["wl.test*-5"], dnsbl_allowlist_threshold=-1))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert c.greeting.text == "220-mx.mailflow.test ESMTP mailflow\n220 mx.mailflow.test ESMTP mailflow"
    assert (await c.send_message()).code == 250
    await c.cmd("QUIT")
    verdicts = [line for line in screen_log() if line.startswith(("PASS", "NOQUEUE"))]
    assert len(verdicts) == 1 and re.fullmatch(rf"PASS NEW {WHERE}", verdicts[0]), screen_log()
    now, cache = time.time(), mf.smtpd.screened
    tests = ("pregreet", "dnsbl", "pipelining", "non_smtp_command", "bare_newline")
    assert cache.passed("127.0.0.1", tests, now + 3000)  # (the DNSBL's 1 h, not the deep tests' 30 days)
    assert not cache.passed("127.0.0.1", ("pipelining",), now + 4000)


@pytest.mark.parametrize("action", ["enforce", "drop", "ignore"])
async def test_a_pipelining_client_under_each_action(mailflow_server, screen_log, action):
    mf = await mailflow_server(smtpd=screen(pipelining_enable=True, pipelining_action=action))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await c.send(b"EHLO client.test\r\nMAIL FROM:<s@remote.test>\r\n")
    if action == "drop":
        assert await c.reply() == status.postscreen_protocol_error(521)
        assert await c.closed()
    else:
        assert [(await c.reply()).code for _ in range(2)] == [250, 250]
        rcpt = await c.cmd("RCPT TO:<alice@local.test>")
        assert rcpt == (status.postscreen_protocol_error(550) if action == "enforce" else status.POSTSCREEN_COME_BACK)
        assert (await c.cmd("QUIT")).code == 221
    await eventually(lambda: screen_log()[-1].startswith("DISCONNECT"))
    assert any(re.fullmatch(rf"COMMAND PIPELINING from {WHERE} after EHLO: MAIL FROM:<s@remote\.test>\\r\\n", line)
               for line in screen_log()), screen_log()
    cache = mf.smtpd.screened
    if action == "ignore":  # passed for the least TTL of all tests (here dnsbl_min_ttl's 60 s), PASS NEW
        assert cache.passed("127.0.0.1", ("pipelining",), time.time() + 50)
        assert not cache.passed("127.0.0.1", ("pipelining",), time.time() + 70)
        assert any(line.startswith("PASS NEW") for line in screen_log())
    else:
        assert cache.due("127.0.0.1", ("pipelining",), time.time()) is None  # nothing of a failed client is kept
        assert not any(line.startswith("PASS") for line in screen_log())


@pytest.mark.parametrize("action", ["enforce", "drop", "ignore"])
async def test_a_non_smtp_command_under_each_action(mailflow_server, screen_log, action):
    mf = await mailflow_server(smtpd=screen(non_smtp_command_enable=True, non_smtp_command_action=action))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    first = await c.cmd("GET /index.html HTTP/1.1")
    if action == "drop":
        assert first == status.POSTSCREEN_NON_SMTP_DROP
        assert first.text == "521 5.7.0 Error: I can break rules, too. Goodbye."
        assert await c.closed()
    else:
        assert first.text == "502 5.5.2 Error: command not recognized"
        rcpt = (await through_rcpt(c))[-1]
        assert rcpt == (status.postscreen_protocol_error(550) if action == "enforce" else status.POSTSCREEN_COME_BACK)
    assert any(re.fullmatch(rf"NON-SMTP COMMAND from {WHERE} after CONNECT: GET /index\.html HTTP/1\.1", line)
               for line in screen_log()), screen_log()


@pytest.mark.parametrize("action", ["enforce", "drop", "ignore"])
async def test_a_bare_newline_under_each_action(mailflow_server, screen_log, action):
    mf = await mailflow_server(smtpd=screen(bare_newline_enable=True, bare_newline_action=action))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await c.send(b"NOOP\r\nHELO client.test\n")
    assert (await c.reply()).code == 250
    if action == "drop":
        assert await c.reply() == status.postscreen_protocol_error(521)
        assert await c.closed()
    else:
        assert (await c.reply()).text == "250 mx.mailflow.test"
        assert (await c.cmd("MAIL FROM:<>")).code == 250
        rcpt = await c.cmd("RCPT TO:<alice@local.test>")
        assert rcpt == (status.postscreen_protocol_error(550) if action == "enforce" else status.POSTSCREEN_COME_BACK)
    assert any(re.fullmatch(rf"BARE NEWLINE from {WHERE} after HELO client\.test", line)
               for line in screen_log()), screen_log()


async def test_forbidden_commands_are_smtpds_unless_set(mailflow_server, screen_log):
    """postscreen_forbidden_commands' default is $smtpd_forbidden_commands; a header label, a word that is not a
    letter's, is non-SMTP whatever the list."""
    mf = await mailflow_server(smtpd={"forbid_cmds": ["XYZZY"], **screen(non_smtp_command_enable=True)})
    port = mf.smtp_addresses[0][1]
    for line, non_smtp in ((b"XYZZY now", True), (b"GET /", False), (b"Subject: hi", True), (b"Subject\t: hi", True),
                           (b"123 go", True)):
        c = await SmtpClient.connect(port)
        reply = await c.cmd(line)
        assert reply.code == (521 if non_smtp else 502), (line, reply)
        await c.close()


async def test_forbidden_commands_of_its_own(mailflow_server):
    """postscreen_forbidden_commands set: its words, not smtpd's (whose GET is then a mere unknown command)."""
    mf = await mailflow_server(smtpd=screen(non_smtp_command_enable=True, forbidden_commands=["XYZZY"]))
    port = mf.smtp_addresses[0][1]
    c = await SmtpClient.connect(port)
    assert (await c.cmd("get /")).text == "502 5.5.2 Error: command not recognized"
    await c.close()
    c = await SmtpClient.connect(port)
    assert await c.cmd("xyzzy now") == status.POSTSCREEN_NON_SMTP_DROP


async def test_a_pipelined_bdat_chunk_is_not_command_pipelining(mailflow_server, screen_log):
    """psc_smtpd_read_event: BDAT's chunk follows its command at once, so BDAT is exempt from the pipelining test."""
    mf = await mailflow_server(smtpd=screen(pipelining_enable=True, pipelining_action="drop"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>")).code == 250
    await c.send(b"BDAT 10 LAST\r\n0123456789")
    assert (await c.reply()).text == "554 5.5.1 Error: no valid recipients"
    await eventually(lambda: screen_log()[-1].startswith("DISCONNECT"))
    assert not any(line.startswith("COMMAND PIPELINING") for line in screen_log()), screen_log()
    assert any(re.fullmatch(rf"BDAT without valid RCPT from {WHERE}", line) for line in screen_log()), screen_log()


async def test_only_the_expired_deep_test_is_met_again(mailflow_server, screen_log):
    """A client whose pregreet pass holds and whose pipelining pass has expired: no teaser, no wait, the dummy
    engine at once; its other passes are kept."""
    mf = await mailflow_server(smtpd=screen(**DEEP, greet_wait=5))
    cache = mf.smtpd.screened
    later = time.time() + 1000
    cache.record("127.0.0.1", {"pregreet": later, "pipelining": 0.0, "non_smtp_command": later,
                               "bare_newline": later}, time.time())
    loop = asyncio.get_running_loop()
    started = loop.time()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert loop.time() - started < 3  # (no greet wait: 5 s)
    assert c.greeting.text == "220 mx.mailflow.test ESMTP mailflow"  # the dummy engine's
    assert (await through_rcpt(c))[-1] == status.POSTSCREEN_COME_BACK
    assert (await c.cmd("QUIT")).code == 221
    await eventually(lambda: screen_log()[-1].startswith("DISCONNECT"))
    assert re.fullmatch(rf"PASS OLD {WHERE}", screen_log()[-2]), screen_log()
    assert cache.passed("127.0.0.1", ("pregreet", "pipelining", "non_smtp_command", "bare_newline"), time.time())


async def test_a_client_that_leaves_before_its_rcpt_keeps_only_the_early_passes(mailflow_server, screen_log):
    mf = await mailflow_server(smtpd=screen(**DEEP))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("HELO client.test")).code == 250
    await c.close()
    await eventually(lambda: screen_log()[-1].startswith("DISCONNECT"))
    assert re.fullmatch(rf"HANGUP after \S+ from {WHERE} in tests after SMTP handshake", screen_log()[-2])
    cache = mf.smtpd.screened
    assert cache.passed("127.0.0.1", ("pregreet",), time.time())
    assert not cache.passed("127.0.0.1", ("pipelining",), time.time())
    assert not any(line.startswith("PASS") for line in screen_log())


async def test_a_client_that_floods_the_engine_is_bounded(mailflow_server, screen_log):
    """Deep tests on, their failures ignored: a client that sends a megabyte of commands without reading its
    replies is cut off at command_count_limit, at once, each deep test logged once."""
    mf = await mailflow_server(smtpd=screen(**DEEP, pipelining_action="ignore", non_smtp_command_action="ignore",
                                            command_count_limit=5))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    loop = asyncio.get_running_loop()
    started = loop.time()
    c.writer.write(b"NOOP\nGET x\r\n" * 80_000)
    await eventually(lambda: screen_log()[-1].startswith("DISCONNECT"), timeout=10)
    assert loop.time() - started < 10  # (the count limit is what ends it: checked below)
    await eventually(lambda: c.reader.exception() is not None or c.reader.at_eof())  # (a reset: input left unread)
    lines = screen_log()
    assert re.fullmatch(rf"COMMAND COUNT LIMIT from {WHERE} after NOOP", lines[-3]), lines
    assert sum(line.startswith(("COMMAND PIPELINING", "BARE NEWLINE", "NON-SMTP")) for line in lines) == 3, lines


async def test_the_dummy_engine_has_its_own_command_time_limit_and_a_session_bound(mailflow_server, screen_log):
    """postscreen_command_time_limit (smtpd's timeout unless set) bounds each command; smtpd's session_time_limit
    the whole dummy session, so a client that keeps sending NOOP in time cannot hold a screening place longer."""
    mf = await mailflow_server(smtpd={"timeout": 300, "session_time_limit": 1.5,
                                      **screen(pipelining_enable=True, command_time_limit=0.4)})
    port = mf.smtp_addresses[0][1]
    c = await SmtpClient.connect(port)
    assert (await c.reply()).text == "421 4.4.2 mx.mailflow.test Error: timeout exceeded"  # (no command: 0.4 s)
    await eventually(lambda: screen_log()[-1].startswith("DISCONNECT"))
    assert re.fullmatch(rf"COMMAND TIME LIMIT from {WHERE} after CONNECT", screen_log()[-2]), screen_log()

    slow = await SmtpClient.connect(port)
    replies = []
    while len(replies) < 20 and (not replies or replies[-1].code == 250):
        await asyncio.sleep(0.25)
        replies.append(await slow.cmd("NOOP"))
    assert replies[-1].text == "421 4.4.2 mx.mailflow.test Error: timeout exceeded", replies
    # the session's 1.5 s hold 6 commands 0.25 s apart at most (fewer on a slow machine), not 20 commands' 5 s
    assert len(replies) <= 7, replies


async def test_stress_mode_shortens_the_greet_wait_and_the_command_time_limit(mailflow_server, screen_log):
    """Postfix's stress mode: from 90 % of pre_queue_limit taken (here 9 of 10: 8 clients held in their greet wait,
    then this one) the greet wait and the command time limit are the stress ones; left at 70 % (7 of 10, as the
    held ones go), each logged as postscreen does."""
    mf = await mailflow_server(smtpd={"timeout": 300, **screen(
        pipelining_enable=True, pre_queue_limit=10, greet_wait=30, stress_greet_wait=0.2,
        stress_command_time_limit=0.4)})
    held = await screened(mf.smtp_addresses[0][1], 8)
    started = time.monotonic()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.reply()).text == "421 4.4.2 mx.mailflow.test Error: timeout exceeded"
    assert time.monotonic() - started < 10  # (neither the greet wait's 30 s nor smtpd's 300 s)
    for client in held:
        client.writer.close()
    await eventually(lambda: any(line.startswith("leaving") for line in screen_log()))
    assert [line for line in screen_log() if "STRESS" in line] == [
        "entering STRESS mode with 9 connections", "leaving STRESS mode with 7 connections"], screen_log()


async def test_a_client_on_a_vetoed_interface_never_reaches_smtpd_nor_the_cache(mailflow_server, screen_log):
    """postscreen_allowlist_interfaces: a listener address outside it (a backup MX's): `ALLOWLIST VETO`, the dummy
    engine with every deep test on whatever is enabled, nothing cached; a client cached already still passes."""
    mf = await mailflow_server(smtpd=screen(allowlist_interfaces=["!127.0.0.1", "static:all"]))
    port = mf.smtp_addresses[0][1]
    c = await SmtpClient.connect(port)
    assert c.greeting.text == "220-mx.mailflow.test ESMTP mailflow\n220 mx.mailflow.test ESMTP mailflow"
    assert (await through_rcpt(c))[-1] == status.POSTSCREEN_COME_BACK
    await c.send(b"RSET\r\nQUIT\r\n")  # pipelined: the test is on, enforced
    assert [(await c.reply()).code for _ in range(2)] == [250, 221]
    await eventually(lambda: screen_log()[-1].startswith("DISCONNECT"))
    lines = screen_log()
    assert re.fullmatch(rf"ALLOWLIST VETO {WHERE}", lines[1]), lines
    assert any(line.startswith("COMMAND PIPELINING") for line in lines), lines
    assert not any(line.startswith("PASS") for line in lines), lines
    assert mf.smtpd.screened.due("127.0.0.1", ("pregreet",), time.time()) is None

    mf.smtpd.screened.record("127.0.0.1", {"pregreet": time.time() + 100}, time.time())
    again = await SmtpClient.connect(port)
    assert again.greeting.text == "220 mx.mailflow.test ESMTP mailflow"
    assert (await again.send_message()).code == 250


async def test_the_dnsbl_reply_map_names_the_list_in_the_refusal(mailflow_server, dns_zone, tmp_path):
    table = tmp_path / "dnsbl_reply"
    table.write_text("bl.test  a private list\n")
    mf = await mailflow_server(dns={"nameservers": [dns_zone(ZONE)]}, smtpd=screen(
        dnsbl_sites=["bl.test"], dnsbl_action="drop", dnsbl_reply_map=f"texthash:{table}"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1], greet=False)
    assert (await c.reply()).text.endswith("\n521 5.7.1 Service unavailable; client [127.0.0.1] blocked using "
                                           "a private list")


async def test_a_pregreeting_client_under_enforce_gets_no_greeting_from_the_engine(mailflow_server, screen_log):
    mf = await mailflow_server(smtpd={**screen(greet_action="enforce"), "forbid_unauth_pipelining": False})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1], first=b"HELO zombie.test\r\n", greet=False)
    assert (await c.reply()).text == "220-mx.mailflow.test ESMTP mailflow\n250 mx.mailflow.test"


async def test_a_client_can_starttls_in_the_dummy_engine_and_is_still_screened(mailflow_server, pki, caplog,
                                                                               screen_log):
    """postscreen_tls_security_level (smtpd's may by default) with smtpd's certificate: STARTTLS offered and done
    in the dummy engine (Postfix's tlsproxy), the HELO forgotten, the deep tests on over TLS; the client that gets
    to RCPT passes and comes back to smtpd. Postfix 3.7.11's replies and tlsproxy's lines."""
    caplog.set_level(logging.INFO, logger="mailflow.tlsproxy")
    _, cert, ctx = pki
    mf = await mailflow_server(smtpd={"tls_cert_file": cert, "tls_loglevel": 1, **screen(**DEEP)})
    port = mf.smtp_addresses[0][1]
    c = await SmtpClient.connect(port)
    assert "250-STARTTLS" in (await c.cmd("EHLO client.test")).text.splitlines()
    assert (await c.cmd("STARTTLS x")).text == "501 5.5.4 Syntax: STARTTLS"
    await c.starttls(ctx)
    ehlo, mail, rcpt = await through_rcpt(c, b"EHLO again.test\r\n")
    assert "STARTTLS" not in ehlo.text and "250 CHUNKING" in ehlo.text.splitlines()
    assert mail.code == 250 and rcpt == status.POSTSCREEN_COME_BACK
    assert (await c.cmd("STARTTLS")).text == "554 5.5.1 Error: TLS already active"
    assert (await c.cmd("QUIT")).text == "221 2.0.0 Bye"
    await eventually(lambda: any(r.getMessage().startswith("DISCONNECT") for r in caplog.records
                                 if r.name == "mailflow.tlsproxy"))
    assert re.search(r"helo=<again\.test>$", [line for line in screen_log() if "NOQUEUE" in line][0])
    assert re.fullmatch(rf"PASS NEW {WHERE}", screen_log()[-2]), screen_log()
    proxy = [r.getMessage() for r in caplog.records if r.name == "mailflow.tlsproxy"]
    assert [line.split(" from ")[0].split(" ")[0] for line in proxy] == ["CONNECT", "Anonymous", "DISCONNECT"], proxy
    assert re.fullmatch(rf"Anonymous TLS connection established from {WHERE}: TLSv1\.[23] with cipher \S+ "
                        r"\(\d+/\d+ bits\)", proxy[1]), proxy
    again = await SmtpClient.connect(port)  # passed: smtpd's own greeting
    assert again.greeting.text == "220 mx.mailflow.test ESMTP mailflow"
    await again.close()


async def test_tlsproxys_summary_says_whether_the_client_certificate_is_trusted(mailflow_server, tmp_path, caplog):
    """tls_ask_ccert: tlsproxy's summary, as smtpd's, is `Trusted` for a client that sent a certificate the CA
    file verifies (tls_misc.c's tls_log_summary), `Anonymous` only without one."""
    caplog.set_level(logging.INFO, logger="mailflow.tlsproxy")
    pki = ClientPki(tmp_path)
    mf = await mailflow_server(smtpd={"tls_cert_file": pki.server_cert, "tls_ask_ccert": True,
                                      "tls_ca_file": pki.ca_file, "tls_loglevel": 1, **screen(**DEEP)})
    port = mf.smtp_addresses[0][1]
    anonymous = ssl.create_default_context()
    pki.ca.configure_trust(anonymous)
    for context in (pki.client("trusted").context(pki), anonymous):
        c = await SmtpClient.connect(port)
        await c.starttls(context)
        assert (await c.cmd("NOOP")).code == 250
        await c.close()
    summaries = [r.getMessage().split(" TLS ")[0] for r in caplog.records
                 if r.name == "mailflow.tlsproxy" and " TLS connection established " in r.getMessage()]
    assert summaries == ["Trusted", "Anonymous"], summaries


async def test_plaintext_sent_after_starttls_is_discarded_in_the_dummy_engine(mailflow_server, pki, screen_log):
    """A command pipelined after STARTTLS in plaintext is thrown away, not run over TLS (Postfix's
    psc_starttls_finish: vstream_fpurge(..., VSTREAM_PURGE_BOTH)); the pipelining test still sees it."""
    _, cert, ctx = pki
    mf = await mailflow_server(smtpd={"tls_cert_file": cert, **screen(**DEEP, pipelining_action="ignore")})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test")).code == 250
    await c.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
    assert (await c.reply()).code == 220
    await c.writer.start_tls(ctx, server_hostname="localhost")
    assert await c.cmd("RCPT TO:<alice@local.test>") == status.NEED_MAIL  # (no MAIL ran)
    assert (await c.cmd("NOOP")).code == 250
    await c.close()
    assert any(re.fullmatch(rf"COMMAND PIPELINING from {WHERE} after STARTTLS: MAIL FROM:<injected@evil\.test>\\r\\n",
                            line) for line in screen_log()), screen_log()


async def test_a_failed_handshake_in_the_dummy_engine_is_a_hangup(mailflow_server, pki, caplog, screen_log):
    caplog.set_level(logging.INFO, logger="mailflow.tlsproxy")
    _, cert, _ = pki
    mf = await mailflow_server(smtpd={"tls_cert_file": cert, **screen(**DEEP)})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("STARTTLS")).text == "220 2.0.0 Ready to start TLS"
    await c.send(b"hello there\r\n")
    assert await c.closed()
    await eventually(lambda: screen_log()[-1].startswith("DISCONNECT"))
    assert re.fullmatch(rf"HANGUP after \S+ from {WHERE} in tests after SMTP handshake", screen_log()[-2])
    proxy = [r.getMessage() for r in caplog.records if r.name == "mailflow.tlsproxy"]
    assert re.fullmatch(rf"TLS handshake failed for service=smtpd peer={WHERE}", proxy[-2]), proxy
    assert proxy[-1].startswith("DISCONNECT") and proxy[0].startswith("CONNECT from"), proxy


async def test_encrypt_requires_starttls_in_the_dummy_engine(mailflow_server, pki):
    """postscreen_tls_security_level = encrypt: HELO, EHLO, STARTTLS, NOOP and QUIT only before TLS (Postfix 3.7.11:
    `530 5.7.0 Must issue a STARTTLS command first`)."""
    _, cert, ctx = pki
    mf = await mailflow_server(smtpd={"tls_cert_file": cert, **screen(**DEEP, tls_security_level="encrypt")})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("NOOP")).code == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>")).text == "530 5.7.0 Must issue a STARTTLS command first"
    assert (await c.cmd("RSET")).text == "530 5.7.0 Must issue a STARTTLS command first"
    assert (await c.cmd("XCLIENT x")).text == "502 5.5.2 Error: command not recognized"
    assert (await c.cmd("HELO client.test")).code == 250
    await c.starttls(ctx)
    assert (await c.cmd("MAIL FROM:<s@remote.test>")).code == 250
    await c.close()


def test_encrypt_without_a_certificate_is_a_config_error_naming_the_key(tmp_path):
    """As smtpd's own encrypt: the screen cannot be passed in plaintext, so no certificate is no start (Postfix's
    postscreen would answer every STARTTLS 454 and every MAIL 530)."""
    with pytest.raises(ConfigError, match=r"mailflow\.toml: smtpd: postscreen\.tls_security_level \"encrypt\" needs "
                                          r"tls_cert_file"):
        config_from_dict({**base_settings(tmp_path), "smtpd": screen(tls_security_level="encrypt")},
                         "mailflow.toml")


async def test_no_certificate_no_starttls_in_the_dummy_engine(mailflow_server):
    plain = await mailflow_server(smtpd=screen(**DEEP, tls_security_level="may"))
    c = await SmtpClient.connect(plain.smtp_addresses[0][1])
    assert "STARTTLS" not in (await c.cmd("EHLO client.test")).text
    assert (await c.cmd("STARTTLS")).text == "502 5.5.1 Error: command not implemented"
    assert (await c.cmd("MAIL FROM:<s@remote.test>")).code == 250
    await c.close()


def test_postscreens_own_footer_knows_only_postscreens_macros(tmp_path):
    bad = {**base_settings(tmp_path), "smtpd": screen(reject_footer="Call us about $helo_name")}
    with pytest.raises(ConfigError, match=r"smtpd\.postscreen\.reject_footer.*helo_name"):
        config_from_dict(bad)


async def test_smtpds_footer_goes_under_postscreens_refusals_its_other_macros_empty(mailflow_server, screen_log):
    """postscreen_reject_footer's default is $smtpd_reject_footer: under every 4xx and 5xx postscreen sends (the
    drop's 521 too), a macro postscreen does not know expanded to nothing (psc_expand_lookup)."""
    mf = await mailflow_server(smtpd={"reject_footer": "Ask $server_name about $client_address ($helo_name)",
                                      **screen(greet_wait=2, greet_action="drop")})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1], greet=False)
    assert await c.reader.readline() == b"220-mx.mailflow.test ESMTP mailflow\r\n"  # (a 2xx: none)
    await c.send(b"EHLO early.test\r\n")
    assert (await c.reply()).text == "521-5.5.1 Protocol error\n521 5.5.1 Ask mx.mailflow.test about 127.0.0.1 ()"
    assert await c.closed()
    assert 'unknown macro name "helo_name" in expansion request' in screen_log()  # (Postfix's warning)


async def test_only_the_macros_the_footer_expansion_looks_up_are_warned_of(mailflow_server, screen_log):
    """psc_expand_lookup warns of a macro it does not know when mac_expand looks it up: a conditional text that is
    not chosen is not expanded, so its macros get no warning."""
    footer = "Ask ${helo_name?x $sender} ${client_port:$recipient} ${client_address?$reverse_client_name}"
    mf = await mailflow_server(smtpd={"reject_footer": footer, **screen(greet_wait=2, greet_action="drop")})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1], greet=False)
    await c.reader.readline()
    await c.send(b"EHLO early.test\r\n")
    assert (await c.reply()).text == "521-5.5.1 Protocol error\n521 5.5.1 Ask   "
    assert [line for line in screen_log() if line.startswith("unknown macro")] == [
        'unknown macro name "helo_name" in expansion request',
        'unknown macro name "reverse_client_name" in expansion request']


def test_footer_maps_that_may_wait_are_refused_naming_the_key(tmp_path):
    """A reply is written on the event loop: postscreen_reject_footer_maps takes tables that answer at once."""
    bad = {**base_settings(tmp_path), "smtpd": screen(reject_footer_maps=[f"sqlite:{tmp_path}/f.db"])}
    with pytest.raises(ConfigError, match=r"mailflow\.toml: smtpd\.postscreen\.reject_footer_maps.*lookup may wait"):
        config_from_dict(bad, "mailflow.toml")


async def dropped_pregreeter(port: int) -> str:
    c = await SmtpClient.connect(port, greet=False)
    await c.reader.readline()
    await c.send(b"EHLO early.test\r\n")
    text = (await c.reply()).text
    await c.close()
    return text


async def test_a_footer_map_that_cannot_answer_gives_reject_footer(mailflow_server, screen_log):
    """Postfix's psc_send_reply: no footer from the maps (none has the reply, or one cannot answer) is
    postscreen_reject_footer; a failing table is told once, then once a minute with a count."""
    mf = await mailflow_server(smtpd=screen(greet_wait=2, greet_action="drop", reject_footer="plain $client_address",
                                            reject_footer_maps=["fail:footers"]))
    for _ in range(2):
        assert await dropped_pregreeter(mf.smtp_addresses[0][1]) == \
            "521-5.5.1 Protocol error\n521 5.5.1 plain 127.0.0.1"
    failed = [line for line in screen_log() if "postscreen_reject_footer_maps lookup failed" in line]
    assert len(failed) == 1, screen_log()


async def test_a_mapped_footer_that_cannot_go_under_a_reply_is_left_out(mailflow_server, screen_log, tmp_path):
    """A footer the map gives with a control character is never sent: left out, told once and then once a minute
    with a count (faults.FailureLog), as a failing table is. It was a warning at each reply: a client could make
    command_count_limit of them per connection."""
    (tmp_path / "footers").write_text("/^521 / bad \x01 footer\n")
    mf = await mailflow_server(smtpd=screen(greet_wait=2, greet_action="drop", reject_footer="plain",
                                            reject_footer_maps=[f"regexp:{tmp_path}/footers"]))
    for _ in range(2):
        assert await dropped_pregreeter(mf.smtp_addresses[0][1]) == "521 5.5.1 Protocol error"
    told = [line for line in screen_log() if "footer for '521 5.5.1 Protocol error' not used" in line]
    assert len(told) == 1 and "postscreen_reject_footer_maps footer failed: footer for '521 5.5.1 Protocol error' " \
        "not used: a control character" in told[0], screen_log()


async def test_a_table_that_cannot_answer_is_told_once_a_minute_not_per_client(mailflow_server, caplog, screen_log):
    """postscreen_command_filter and the EHLO discard maps failing: every client still gets its 421 (the filter; the
    maps, asked at EHLO, are not reached, as the filter comes first in Postfix too), but the failure is logged once
    with a count a minute later (faults.FailureLog), not once per client (the maps alone: the test below)."""
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")
    mf = await mailflow_server(smtpd=screen(**DEEP, command_filter=["fail:filter"],
                                            discard_ehlo_keyword_address_maps=["fail:maps"]))
    for _ in range(3):
        c = await SmtpClient.connect(mf.smtp_addresses[0][1])
        assert (await c.cmd("EHLO client.test")).text == "421 mx.mailflow.test Service unavailable - try again later"
        assert await c.closed()
    await eventually(lambda: sum(line.startswith("DISCONNECT") for line in screen_log()) == 3)
    failed = [r.getMessage() for r in caplog.records if r.name == "mailflow.postscreen" and "failed" in r.getMessage()]
    assert [line.split(": ")[0] for line in failed] == ["postscreen_command_filter fail:filter lookup failed"], failed


async def test_a_filter_table_not_asked_does_not_reset_its_failure_count(mailflow_server, caplog, screen_log,
                                                                          tmp_path):
    """command_filter = [A, B], B failing: a command A answers never reaches B, so B's failure log is not told it
    works again (which would log each client's next failure as a first one: two lines per client)."""
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")
    first = tmp_path / "filter.regexp"
    first.write_text("/^NOOP$/ NOOP\n")
    mf = await mailflow_server(smtpd=screen(**DEEP, command_filter=[f"regexp:{first}", "fail:second"]))
    for _ in range(3):
        c = await SmtpClient.connect(mf.smtp_addresses[0][1])
        assert (await c.cmd("NOOP")).code == 250
        assert (await c.cmd("EHLO client.test")).code == 421
        assert await c.closed()
    await eventually(lambda: sum(line.startswith("DISCONNECT") for line in screen_log()) == 3)
    told = [r.getMessage().split(": ")[0] for r in caplog.records if r.name == "mailflow.postscreen"
            and ("failed" in r.getMessage() or "works again" in r.getMessage())]
    assert told == ["postscreen_command_filter fail:second lookup failed"], told


async def test_a_discard_map_not_asked_does_not_reset_its_failure_count(mailflow_server, caplog, screen_log,
                                                                         tmp_path):
    """discard_ehlo_keyword_address_maps = [A, B], B failing: a client A lists never reaches B, so B's failure log
    is not told it works again (clients from alternating networks would each log two lines)."""
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")
    first = tmp_path / "discards.cidr"
    first.write_text("127.0.0.1/32 etrn\n")
    mf = await mailflow_server(smtpd=screen(**DEEP, discard_ehlo_keyword_address_maps=[f"cidr:{first}", "fail:maps"]))
    for source in ("127.0.0.2", "127.0.0.1", "127.0.0.2"):
        reader, writer = await asyncio.open_connection("127.0.0.1", mf.smtp_addresses[0][1], local_addr=(source, 0))
        c = SmtpClient(reader, writer)
        assert (await c.reply()).code == 220
        assert ("ETRN" in (await c.cmd("EHLO client.test")).text) == (source == "127.0.0.2")
        assert (await c.cmd("QUIT")).code == 221
        assert await c.closed()
    await eventually(lambda: sum(line.startswith("DISCONNECT") for line in screen_log()) == 3)
    told = [r.getMessage().split(": ")[0] for r in caplog.records if r.name == "mailflow.postscreen"
            and ("failed" in r.getMessage() or "works again" in r.getMessage())]
    assert told == ["postscreen_discard_ehlo_keyword_address_maps fail:maps lookup failed"], told


async def test_the_discard_maps_are_asked_at_ehlo_not_for_a_session_without_one(mailflow_server, caplog, screen_log):
    """psc_ehlo_cmd asks discard_ehlo_keyword_address_maps at each EHLO with a name: a HELO session, or an EHLO
    without one (501), never meets a map that cannot answer."""
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")
    mf = await mailflow_server(smtpd=screen(**DEEP, discard_ehlo_keyword_address_maps=["fail:maps"]))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("HELO client.test")).code == 250
    assert (await c.cmd("EHLO")).code == 501
    assert (await c.cmd("QUIT")).code == 221
    await eventually(lambda: any(line.startswith("DISCONNECT") for line in screen_log()))
    assert not [r for r in caplog.records if "maps fail:maps lookup" in r.getMessage()]
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test")).code == 250
    assert [r.getMessage().split(": ")[0] for r in caplog.records if "maps fail:maps lookup" in r.getMessage()] == [
        "postscreen_discard_ehlo_keyword_address_maps fail:maps lookup failed"]
    await c.close()


async def test_a_discarded_starttls_is_refused_only_after_ehlo(mailflow_server, pki):
    """Postfix 3.7.11's dummy engine applies its EHLO discard mask from the EHLO on (it starts as 0): STARTTLS
    discarded still works after HELO alone, and is 502 after EHLO."""
    _, cert, ctx = pki
    mf = await mailflow_server(smtpd={"tls_cert_file": cert, **screen(**DEEP, discard_ehlo_keywords=["starttls"])})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("HELO client.test")).code == 250
    await c.starttls(ctx)
    assert c.writer.get_extra_info("ssl_object") is not None and (await c.cmd("NOOP")).code == 250
    await c.close()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert "STARTTLS" not in (await c.cmd("EHLO client.test")).text
    assert (await c.cmd("STARTTLS")).text == "502 5.5.1 Error: command not implemented"
    await c.close()


async def test_a_reload_puts_a_new_cache_limit_in_force(mailflow_server):
    """The cache of passed clients is the server's, kept across reloads: a reload's cache_limit bounds it from
    then on (it kept the limit the server started with, without a word)."""
    mf = await mailflow_server(smtpd=screen(cache_limit=100))
    assert mf.smtpd.screened.limit == 100
    now = time.time()
    for n in range(10):  # (oldest first)
        mf.smtpd.screened.record(f"192.0.2.{n}", {"pregreet": now + 86400}, now)
    await mf.reload(config_from_dict(mf.config.model_dump() | {
        "smtpd": mf.config.smtpd.model_dump() | {"postscreen": mf.config.smtpd.postscreen.model_dump() | {
            "cache_limit": 7}}}))
    assert mf.smtpd.screened.limit == 7
    kept = [n for n in range(10) if mf.smtpd.screened.passed(f"192.0.2.{n}", ("pregreet",), now)]
    assert kept == list(range(3, 10))  # dropped at the reload, the least recently used first

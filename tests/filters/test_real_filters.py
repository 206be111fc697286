"""mailflow against the real filters Debian ships, each started privately once per module
(tests/support/filter_daemons.py): OpenDKIM as a milter (for smtpd and for pickup: non_smtpd_milters), SpamAssassin's
spamd, ClamAV's clamd with a signature the test writes."""
from __future__ import annotations

import os
import re
import shutil

import aiosmtplib
import pytest

from mailflow.maildrop import MaildropMessage, maildrop_names, write_maildrop
from tests.support import filter_daemons as daemons
from tests.support import eventually, free_port, maildir_messages, queue_becomes, send
from tests.support.deliverability import dkim_signed, make_key

pytestmark = pytest.mark.interop

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def maildir(tmp_path):
    return tmp_path / "mail" / "alice" / "Maildir"


async def outcome(port: int, content: bytes, sender: str = "s@example.test") -> tuple[int, str]:
    try:
        _, reply = await send(port, sender, ["alice@local.test"], content)
    except aiosmtplib.SMTPResponseException as e:
        return e.code, e.message
    return 250, reply


# ---------------------------------------------------------------------------------------------- OpenDKIM


@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory):
    return make_key(tmp_path_factory.mktemp("dkim"), "example.test", "sel1")


@pytest.fixture(scope="module")
def opendkim(tmp_path_factory, dkim_key):
    record = dkim_key.public_record().replace(" ", "")  # (OpenDKIM's TestDNSData takes no spaces)
    daemon = daemons.opendkim(tmp_path_factory.mktemp("opendkim"), [f"{dkim_key.record_name} {record}"]).start()
    yield daemon
    daemon.kill()


async def test_opendkim_adds_its_header_passes_good_signatures_and_its_rejection_is_honoured(
        mailflow_server, tmp_path, opendkim, dkim_key):
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "milters": [f"inet:127.0.0.1:{opendkim.port}"]})
    port = mf.smtp_addresses[0][1]
    message = b"From: <s@example.test>\r\nSubject: milter\r\n\r\nbody line\r\n"
    assert (await outcome(port, message))[0] == 250
    assert (await outcome(port, dkim_signed(dkim_key, message)))[0] == 250
    code, text = await outcome(port, dkim_signed(dkim_key, message).replace(b"body line", b"body LINE"))
    assert code == 550 and text.startswith("5.7."), (code, text)
    box = maildir(tmp_path)
    files = await eventually(lambda: len(maildir_messages(box)) == 2 and maildir_messages(box))
    results = sorted(f.split(b"Authentication-Results: ", 1)[1].split(b"\n", 1)[0] for f in files)
    assert results[0].startswith(b"mx.mailflow.test;") and b"dkim=none" in b"".join(results)
    assert any(b"dkim=pass" in f for f in files)
    assert await queue_becomes(mf.store, {}) == {}


async def test_a_milter_killed_mid_session_gets_the_default_action(mailflow_server, tmp_path, tmp_path_factory):
    victim = daemons.opendkim(tmp_path_factory.mktemp("opendkim-victim"), []).start()
    try:
        mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "milters": [f"inet:127.0.0.1:{victim.port}"]},
                                   milter={"command_timeout": "2s", "content_timeout": "2s"})
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=mf.smtp_addresses[0][1], timeout=10) as client:
            await client.ehlo()
            await client.mail("s@example.test")  # the milter is connected and has seen MAIL
            victim.kill()
            with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
                await client.rcpt("alice@local.test")  # the milter's next event finds it gone
            assert (refused.value.code, refused.value.message) == (451, "4.7.1 Service unavailable - try again later")
            with pytest.raises(aiosmtplib.SMTPResponseException) as refused:  # and so on for the session
                await client.rcpt("bob@local.test")
            assert refused.value.code == 451
        assert await mf.store.counts() == {}
        await mf.stop()
        # accept as the default action: the same failure lets mail through unfiltered
        mf2 = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "milters": [f"inet:127.0.0.1:{victim.port}"]},
                                    milter={"default_action": "accept"})
        assert (await outcome(mf2.smtp_addresses[0][1], b"From: <s@example.test>\r\n\r\nhi\r\n"))[0] == 250
    finally:
        victim.kill()


def drop(mf, content: bytes, sender: str = "alice@local.test") -> str:
    """A message as `mailflow sendmail` leaves it in the maildrop, for pickup."""
    message = MaildropMessage(sender=sender, recipients=("bob@local.test",), uid=os.getuid(), user="alice")
    return write_maildrop(mf.config.queue_path / "maildrop", message, [content])


async def test_non_smtpd_milters_filter_mail_from_sendmail(mailflow_server, tmp_path, opendkim, dkim_key):
    """OpenDKIM verifies what pickup takes in, as mail from localhost: a good signature passes, a message without
    one gets dkim=none, and the one whose body was changed is rejected: returned to its sender."""
    mf = await mailflow_server(milter={"non_smtpd_milters": [f"inet:127.0.0.1:{opendkim.port}"]})
    message = b"From: <alice@example.test>\r\nSubject: picked up\r\n\r\nbody line\r\n"
    drop(mf, message)
    drop(mf, dkim_signed(dkim_key, message))
    drop(mf, dkim_signed(dkim_key, message).replace(b"body line", b"body LINE"))
    mf.pickup.wake()
    bob, alice = tmp_path / "mail" / "bob" / "Maildir", tmp_path / "mail" / "alice" / "Maildir"
    received = await eventually(lambda: len(maildir_messages(bob)) == 2 and maildir_messages(bob))
    results = sorted(m.split(b"Authentication-Results: ", 1)[1].split(b";", 2)[1].split()[0] for m in received)
    assert results == [b"dkim=none", b"dkim=pass"], results
    [notice] = await eventually(lambda: maildir_messages(alice))
    assert b"Undelivered Mail Returned to Sender" in notice and b"Status: 5.7." in notice, notice.decode()
    await eventually(lambda: not maildrop_names(mf.config.queue_path / "maildrop"))
    assert len(maildir_messages(bob)) == 2


async def test_a_non_smtpd_milter_that_is_down_keeps_the_mail_in_the_maildrop(mailflow_server, caplog):
    mf = await mailflow_server(milter={"non_smtpd_milters": [f"inet:127.0.0.1:{free_port()}"]})
    name = drop(mf, b"Subject: waits\r\n\r\nfor the milter\r\n")
    mf.pickup.wake()
    await eventually(lambda: any(f"maildrop/{name}: not queued" in r.getMessage() for r in caplog.records))
    assert maildrop_names(mf.config.queue_path / "maildrop") == [name] and await mf.store.counts() == {}


# ---------------------------------------------------------------------------------------------- spamd


@pytest.fixture(scope="module")
def spamd():
    folder = daemons.world_readable_folder("mailflow-spamd-")
    daemon = daemons.spamd(folder).start()
    yield daemon
    daemon.stop()
    shutil.rmtree(folder, ignore_errors=True)


async def test_spamd_scores_gtube_as_spam_and_a_normal_message_as_ham(mailflow_server, tmp_path, spamd):
    mf = await mailflow_server(spamd={"address": f"127.0.0.1:{spamd.port}", "action": "reject"})
    port = mf.smtp_addresses[0][1]
    spam = b"From: <s@example.test>\r\nSubject: buy now\r\n\r\n" + GTUBE + b"\r\n"
    assert await outcome(port, spam) == (550, "5.7.1 Message rejected as spam")
    assert (await outcome(port, b"From: <s@example.test>\r\nSubject: lunch\r\n\r\nSee you at noon.\r\n"))[0] == 250
    data = (await eventually(lambda: maildir_messages(maildir(tmp_path))))[0]
    assert b"\nX-Spam-Status: No, score=" in data and b"X-Spam-Flag" not in data


async def test_spamd_tags_spam_when_asked_to(mailflow_server, tmp_path, spamd):
    mf = await mailflow_server(spamd={"address": f"127.0.0.1:{spamd.port}"})
    await send(mf.smtp_addresses[0][1], "s@example.test", ["alice@local.test"],
               b"From: <s@example.test>\r\n\r\n" + GTUBE + b"\r\n")
    data = (await eventually(lambda: maildir_messages(maildir(tmp_path))))[0]
    assert b"\nX-Spam-Status: Yes, score=100" in data and b"\nX-Spam-Flag: YES\n" in data, data.decode()
    assert b" tests=GTUBE," in data  # the rules that hit, as spamd's SYMBOLS gave them


async def test_a_spooled_message_streams_to_spamd(mailflow_server, spamd):
    mf = await mailflow_server(spamd={"address": f"127.0.0.1:{spamd.port}", "action": "reject",
                                      "size_limit": 1_000_000, "on_failure": "tempfail"})
    # past the in-memory limit (a spool file); GTUBE first, as spamd reads only the body's first 50 KB for it
    big = b"From: <s@example.test>\r\nSubject: big\r\n\r\n" + GTUBE + b"\r\n" + (b"y" * 500 + b"\r\n") * 600
    assert await outcome(mf.smtp_addresses[0][1], big) == (550, "5.7.1 Message rejected as spam")


# ---------------------------------------------------------------------------------------------- clamd


@pytest.fixture(scope="module")
def clamd(tmp_path_factory):
    daemon = daemons.clamd(tmp_path_factory.mktemp("clamd"), {"mailflow.ndb": daemons.marker_signature()}).start()
    yield daemon
    daemon.stop()


async def test_clamd_finds_the_test_signature_and_passes_clean_mail(mailflow_server, tmp_path, clamd):
    mf = await mailflow_server(clamd={"address": f"127.0.0.1:{clamd.port}"})
    port = mf.smtp_addresses[0][1]
    infected = b"From: <s@example.test>\r\n\r\nhello\r\n" + daemons.MARKER + b"\r\n"
    code, text = await outcome(port, infected)
    assert code == 554 and text.startswith("5.7.1 Message rejected: virus found (Mailflow.Test.Marker")
    assert (await outcome(port, b"From: <s@example.test>\r\n\r\nclean\r\n"))[0] == 250
    assert len(await eventually(lambda: maildir_messages(maildir(tmp_path)))) == 1


async def test_a_big_message_streams_to_clamd(mailflow_server, clamd):
    mf = await mailflow_server(clamd={"address": f"127.0.0.1:{clamd.port}"})
    big = b"From: <s@example.test>\r\n\r\n" + b"x" * 998 + b"\r\n"
    big = big + (b"y" * 500 + b"\r\n") * 1200 + daemons.MARKER + b"\r\n"  # past the in-memory limit
    code, _ = await outcome(mf.smtp_addresses[0][1], big)
    assert code == 554


async def test_clamd_down_fails_closed_by_default(mailflow_server, caplog):
    unused_port = free_port()
    mf = await mailflow_server(clamd={"address": f"127.0.0.1:{unused_port}"})
    assert await outcome(mf.smtp_addresses[0][1], b"From: <s@example.test>\r\n\r\nhi\r\n") == \
        (451, "4.7.1 Service unavailable - try again later")
    # the warning is keyed by the message's queue id, as every line about a message is
    warnings = [r.getMessage() for r in caplog.records if r.name == "mailflow.smtpd" and "on_failure" in r.message]
    assert len(warnings) == 1 and re.match(r"[0-9A-Za-z]{6,}: .*on_failure tempfail", warnings[0]), warnings

"""mailflow.testing.Sink: the real pipeline on the test's loop, capturing what an application sends.

Clients: aiosmtplib and the standard library's smtplib (threaded Sink); the inbound faults (reject, defer,
slow, drop, STARTTLS, AUTH) are checked from the client's side, as an application meets them.
"""
from __future__ import annotations

import asyncio
import re
import smtplib
import subprocess
import sys
import tempfile
import ssl
import threading
from email.message import EmailMessage

import aiosmtplib
import pytest

from mailflow.capture.mailbox import WaitTimeout
from mailflow.testing import Sink
from tests.support import LOOPBACK_CLIENT


def order_mail(to: str = "bob@example.com", subject: str = "Your order") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Shop <shop@shop.test>"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("Thanks! Track it at https://shop.test/track/42.\n")
    msg.add_alternative('<p>Thanks! <a href="https://shop.test/track/42?html=1">Track it</a></p>', subtype="html")
    msg.add_attachment(b"%PDF-1.4 invoice", maintype="application", subtype="pdf", filename="invoice.pdf")
    return msg


async def test_a_message_is_captured_with_its_envelope_content_and_transcript():
    async with Sink() as sink:
        assert sink.smtp_url == f"smtp://127.0.0.1:{sink.port}"
        async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:
            await client.send_message(order_mail(), sender="bounces@shop.test",
                                      recipients=["bob@example.com", "audit@shop.test"],
                                      mail_options=["RET=HDRS", "ENVID=order42"], rcpt_options=["NOTIFY=FAILURE"])
        [msg] = await sink.wait_for(to="audit@shop.test")
    assert (msg.sender, msg.recipients) == ("bounces@shop.test", ("bob@example.com", "audit@shop.test"))
    assert msg.envelope.notify == ("FAILURE", "FAILURE")
    assert (msg.envelope.envid, msg.envelope.ret) == ("order42", "HDRS")
    assert msg.subject == "Your order" and msg.message["To"] == "bob@example.com"
    assert msg.text.startswith("Thanks!") and "<a href" in msg.html
    assert [(a.filename, a.content_type, a.data) for a in msg.attachments] == [
        ("invoice.pdf", "application/pdf", b"%PDF-1.4 invoice")]
    assert msg.links == ["https://shop.test/track/42", "https://shop.test/track/42?html=1"]
    assert msg.raw.startswith(b"Received: from ") and msg.queue_id in msg.raw.decode()
    said = [text for _, text in msg.transcript.lines]
    assert said[0].startswith("220 ") and "EHLO" in said[1]
    assert any(line.startswith("MAIL FROM:<bounces@shop.test>") and "RET=HDRS ENVID=order42" in line for line in said)
    assert said[-1] == f"250 2.0.0 Ok: queued as {msg.queue_id}"
    assert msg.transcript.client == LOOPBACK_CLIENT and msg.transcript.tls == ""
    assert [e.event for e in msg.history][:3] == ["received", "message-id", "queued"]


async def test_wait_for_matches_by_sender_subject_and_callable_and_counts():
    async with Sink() as sink:
        async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:
            for n in range(3):
                await client.send_message(order_mail(subject=f"Order {n}"), sender=f"s{n}@shop.test")
        assert len(await sink.wait_for(subject="Order", count=3)) == 3
        [second] = await sink.wait_for(sender="s1@shop.test")
        assert second.subject == "Order 1"
        assert len(await sink.wait_for(subject=re.compile(r"Order [02]"), count=2)) == 2
        assert len(await sink.wait_for(match=lambda m: m.sender.startswith("s2"))) == 1
        assert len(await sink.wait_for(to="*@EXAMPLE.com", count=3)) == 3
        assert [m.subject for m in sink.search("subject:\"order 2\"")] == ["Order 2"]
        sink.clear()
        assert sink.messages == []


async def test_a_failing_wait_for_lists_what_arrived():
    async with Sink() as sink:
        async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:
            await client.send_message(order_mail(to="carol@example.com", subject="Welcome"), sender="shop@shop.test")
        await sink.wait_for(to="carol@example.com")
        with pytest.raises(WaitTimeout) as failure:
            await sink.wait_for(to="dave@example.com", subject="Welcome", timeout=0.2)
    text = str(failure.value)
    assert "waited 0.2s for 1 message (to='dave@example.com' subject='Welcome'): 0 matched; 1 arrived:" in text
    assert "1. <shop@shop.test> -> <carol@example.com>: 'Welcome'" in text


async def test_every_address_class_is_captured_once_per_message():
    async with Sink() as sink:
        async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:
            await client.sendmail("a@shop.test", ["postmaster", "x@localhost", "y@[127.0.0.1]", "z@far.test"],
                                  b"Subject: all\r\n\r\nhi\r\n")
        [msg] = await sink.wait_for(subject="all")
    assert msg.recipients == ("postmaster@localhost", "x@localhost", "y@[127.0.0.1]", "z@far.test")


async def test_the_application_own_configuration_decides():
    """Given settings (here: a restriction and a recipient limit) are the application's rules, enforced by the
    real smtpd."""
    settings = {"smtpd": {"recipient_restrictions": ["check_recipient_access inline:{blocked@example.com=REJECT}"],
                          "recipient_limit": 2}}
    async with Sink(**settings) as sink:
        async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
                await client.sendmail("a@shop.test", ["blocked@example.com"], b"Subject: x\r\n\r\nx\r\n")
            assert refused.value.recipients[0].code == 554
            problems, _ = await client.sendmail("a@shop.test", ["1@x.test", "2@x.test", "3@x.test"],
                                                b"Subject: three\r\n\r\nx\r\n")
            assert problems["3@x.test"][0] == 452
        [msg] = await sink.wait_for(subject="three")
        assert msg.recipients == ("1@x.test", "2@x.test")


async def test_reject_and_defer_at_mail_rcpt_and_data_then_accept():
    async with Sink() as sink:
        sink.defer(rcpt="*@later.test", times=2)
        sink.reject(sender="spam@*", at="mail", code=553, text="5.7.1 Not you")
        sink.reject(rcpt="bounce@example.com", at="data", code=554, times=1)
        async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:
            for _ in range(2):
                with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as deferred:
                    await client.sendmail("a@shop.test", ["x@later.test"], b"Subject: later\r\n\r\nx\r\n")
                assert deferred.value.recipients[0].code == 451
                assert "Recipient address rejected: Try again later" in deferred.value.recipients[0].message
            await client.sendmail("a@shop.test", ["x@later.test"], b"Subject: later\r\n\r\nx\r\n")
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await client.sendmail("spam@shop.test", ["x@example.com"], b"Subject: no\r\n\r\nx\r\n")
            assert (refused.value.code, refused.value.message) == (
                553, "5.7.1 <spam@shop.test>: Sender address rejected: Not you")
            with pytest.raises(aiosmtplib.SMTPDataError) as at_data:
                await client.sendmail("a@shop.test", ["ok@example.com", "bounce@example.com"],
                                      b"Subject: data\r\n\r\nx\r\n")
            assert at_data.value.code == 554
            await client.sendmail("a@shop.test", ["bounce@example.com"], b"Subject: data\r\n\r\nx\r\n")
        assert [m.subject for m in await sink.wait_for(subject="", count=2)] == ["later", "data"]


async def test_slow_replies():
    async with Sink() as sink:
        sink.slow(0.3)
        loop = asyncio.get_running_loop()
        async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:
            await client.ehlo()
            started = loop.time()
            await client.mail("a@shop.test")
            assert loop.time() - started >= 0.3
            with pytest.raises(aiosmtplib.SMTPTimeoutError):
                await client.rcpt("b@example.com", timeout=0.1)


async def test_drop_mid_data_loses_nothing_queued():
    async with Sink() as sink:
        sink.drop()
        reader, writer = await asyncio.open_connection(sink.host, sink.port)
        await reader.readline()
        writer.write(b"EHLO client.test\r\n")
        for _ in range(20):  # EHLO's reply, to its last line
            if (await asyncio.wait_for(reader.readline(), 5)).startswith(b"250 "):
                break
        writer.write(b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")  # PIPELINING
        said = await asyncio.wait_for(reader.read(), 5)  # until the server hangs up
        writer.close()
        assert said.endswith(b"250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")  # its 354 first
        sink.drop()
        with pytest.raises(aiosmtplib.SMTPException):
            async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:
                await client.sendmail("a@shop.test", ["b@example.com"], b"Subject: cut\r\n\r\n" + b"x" * 100_000)
        async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:  # the next one goes through
            await client.sendmail("a@shop.test", ["b@example.com"], b"Subject: whole\r\n\r\nx\r\n")
        assert [m.subject for m in await sink.wait_for(to="b@example.com")] == ["whole"]


async def test_required_starttls_with_the_sinks_ca_and_auth_users():
    async with Sink(tls="encrypt", users={"app": "s3cret"}) as sink:
        context = ssl.create_default_context(cadata=sink.ca_pem.decode())
        async with aiosmtplib.SMTP(hostname="localhost", port=sink.port, start_tls=False) as plain:
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await plain.sendmail("a@shop.test", ["b@example.com"], b"x")
            assert refused.value.code == 530
        async with aiosmtplib.SMTP(hostname="localhost", port=sink.port, tls_context=context) as client:
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await client.login("app", "wrong")
            await client.login("app", "s3cret")
            await client.sendmail("a@shop.test", ["b@example.com"], b"Subject: secure\r\n\r\nx\r\n")
        [msg] = await sink.wait_for(subject="secure")
    assert msg.transcript.login == "app" and msg.transcript.tls.startswith("TLSv1.")
    assert any(text == "AUTH PLAIN ****" for who, text in msg.transcript.lines)
    assert "s3cret" not in repr(msg.transcript)


async def test_auth_without_tls_on_loopback():
    async with Sink(users={"app": "pw"}) as sink:
        async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port, start_tls=False) as client:
            with pytest.raises(aiosmtplib.SMTPSenderRefused):
                await client.sendmail("a@shop.test", ["b@example.com"], b"x")
            await client.login("app", "pw")
            await client.sendmail("a@shop.test", ["b@example.com"], b"Subject: in\r\n\r\nx\r\n")
        assert (await sink.wait_for(subject="in"))[0].transcript.login == "app"


async def test_stop_removes_the_queue_directory_and_the_listener():
    sink = Sink()
    await sink.start()
    directory, port = sink.directory, sink.port
    assert (directory / "queue" / "queue.db").exists()
    await sink.stop()
    assert not directory.exists()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_starting_a_running_sink_is_refused_and_a_stopped_one_starts_again():
    """A second start() used to start a second server over the first: the first was never stopped (its port
    open, its store's threads keeping the interpreter from exiting)."""
    sink = Sink()
    await sink.start()
    first = sink.port
    with pytest.raises(RuntimeError, match="running already"):
        await sink.start()
    assert sink.port == first
    await sink.stop()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", first)
    async with sink:
        await aiosmtplib.send(b"Subject: again\r\n\r\nx\r\n", sender="a@shop.test", recipients=["b@example.com"],
                              hostname=sink.host, port=sink.port)
        [msg] = await sink.wait_for(subject="again")
    threaded = Sink.threaded()
    with threaded:
        with pytest.raises(RuntimeError, match="running already"):
            threaded.start()
    assert "mailflow-sink" not in [t.name for t in threading.enumerate()]


async def test_after_stop_the_messages_stay_and_a_wait_ends_at_once():
    """A wait_for still waiting at stop (or called after it) used to wait out its whole timeout for mail that
    could no longer come, and then blame the mail."""
    sink = Sink()
    await sink.start()
    await aiosmtplib.send(b"Subject: kept\r\n\r\nx\r\n", sender="a@shop.test", recipients=["b@example.com"],
                          hostname=sink.host, port=sink.port)
    await sink.wait_for(subject="kept")
    waiting = asyncio.create_task(sink.wait_for(subject="never", timeout=30))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(sink.stop(), 5)
    with pytest.raises(RuntimeError, match=r"the server stopped: .*waited for 1 message .*1 arrived"):
        await asyncio.wait_for(waiting, 1)
    assert [m.subject for m in sink.messages] == ["kept"] == [m.subject for m in sink.search("subject:kept")]
    assert len(await sink.wait_for(subject="kept")) == 1
    with pytest.raises(RuntimeError, match="the server stopped"):
        await asyncio.wait_for(sink.wait_for(subject="never", timeout=30), 1)


def test_a_stopped_threaded_sink_keeps_its_messages_and_says_it_is_not_running():
    """It used to say 'Event loop is closed' (and warn of a coroutine never awaited) for every call."""
    sink = Sink.threaded()
    with sink:
        with smtplib.SMTP(sink.host, sink.port) as client:
            client.sendmail("a@shop.test", ["b@example.com"], "Subject: kept\r\n\r\nx\r\n")
        sink.wait_for(subject="kept")
    assert [m.subject for m in sink.messages] == ["kept"]
    with pytest.raises(RuntimeError, match="the Sink is not running"):
        sink.wait_for(subject="kept")


def test_threaded_sink_for_synchronous_code():
    with Sink.threaded() as sink:
        with smtplib.SMTP(sink.host, sink.port) as client:  # the port accepts as soon as start() returns
            client.send_message(order_mail(subject="from smtplib"))
        [msg] = sink.wait_for(subject="from smtplib")
        assert msg.recipients == ("bob@example.com",)
        sink.defer(rcpt="bob@example.com", times=1)
        with smtplib.SMTP(sink.host, sink.port) as client:
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                client.send_message(order_mail(subject="again"))
        with pytest.raises(WaitTimeout, match="1 arrived"):
            sink.wait_for(subject="again", timeout=0.2)
        sink.reset()
        assert sink.messages == []


async def test_a_blocking_wait_on_a_running_loop_says_that_loop_was_blocked():
    # an async test's application sends from a task on the test's loop; the threaded Sink's blocking wait_for held
    # that loop, so nothing was sent: "0 matched; 0 arrived", and the author looked for a bug in the application
    with Sink.threaded() as sink:
        sending = asyncio.ensure_future(aiosmtplib.send(order_mail(subject="from a task"), hostname=sink.host,
                                                        port=sink.port))
        with pytest.raises(WaitTimeout, match=r"0 arrived:\n  \(none\)\nthis thread's event loop was blocked .*"
                                              r"`await sink.wait_for_async\(\.\.\.\)`"):
            sink.wait_for(subject="from a task", timeout=0.2)
        await sending
        assert len(await sink.wait_for_async(subject="from a task")) == 1
        with pytest.raises(WaitTimeout) as failure:
            await sink.wait_for_async(subject="never", timeout=0.1)
        assert "blocked" not in str(failure.value)  # (awaited: no loop was blocked)


async def test_a_config_file_brings_the_applications_own_routing(tmp_path):
    """The application's config.toml: its local domain, users and aliases; the Sink only moves the queue and the
    listener (the file's own queue_directory and listen address are not used)."""
    (tmp_path / "aliases").write_text("sales: alice\n")
    config = tmp_path / "config.toml"
    config.write_text('mydestination = ["shop.test"]\nlocal_recipient_maps = ["inline:{alice=ok}"]\n'
                      'alias_maps = ["texthash:aliases"]\nqueue_directory = "/nonexistent/queue"\n'
                      'local_transport = "capture:"\n[smtpd]\nlisten = ["192.0.2.1:25"]\n')
    async with Sink(config=config) as sink:
        async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as unknown:
                await client.sendmail("a@remote.test", ["nobody@shop.test"], b"Subject: x\r\n\r\nx\r\n")
            assert unknown.value.recipients[0].code == 550
            await client.sendmail("a@remote.test", ["sales@shop.test"], b"Subject: lead\r\n\r\nx\r\n")
        [msg] = await sink.wait_for(subject="lead")
    assert msg.recipients == ("sales@shop.test",)
    assert str(sink.config.queue_path).startswith(("/dev/shm/mailflow-sink-", tempfile.gettempdir()))


def test_a_bad_setting_fails_the_start_naming_it():
    from mailflow.errors import ConfigError

    with pytest.raises(ConfigError, match="no_such_setting: unknown setting"):
        with Sink.threaded(no_such_setting=1):
            pass
    with pytest.raises(ValueError, match="tls="):
        Sink(tls="always")


def test_a_sink_never_stopped_does_not_hang_the_interpreter_at_exit():
    """A test that forgets to stop its Sink must not leave the Python process unable to exit (the store's
    reader thread kept it alive)."""
    script = ("import asyncio\nfrom mailflow.testing import Sink\n"
              "kept = []\nasync def main():\n    kept.append(await Sink().start())\n"
              "asyncio.run(main())\nprint('exiting', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "exiting\n"


async def test_sender_checks_in_a_sink_find_nothing_in_its_name_service_and_accept():
    """The Sink's name service knows its fake destinations and nothing else: SPF, DKIM and DMARC find no record
    (every one of these checks asked it for TXT records it could not answer: each message was 451 4.3.0) and a
    client's address has no name (PTR), so the message goes through with `none` verdicts."""
    checks = {"verify": ["spf", "dkim", "dmarc"]}
    async with Sink(sender_auth=checks, smtpd={"end_of_data_restrictions": ["reject_dmarc_policy"]}) as sink:
        await aiosmtplib.send("From: <a@shop.test>\r\nSubject: checked\r\n\r\nhi\r\n", hostname=sink.host,
                              port=sink.port, sender="a@shop.test", recipients=["r@dest.test"])
        [message] = await sink.wait_for(subject="checked")
    results = message.message["Authentication-Results"]
    assert "spf=none" in results and "dmarc=none" in results, results


@pytest.mark.parametrize("start", ["Sink.threaded(temporary_root=ROOT).start()",
                                   "asyncio.run(Sink(temporary_root=ROOT).start())"])
def test_a_sink_never_stopped_leaves_no_directory_behind(start, tmp_path):
    # each left its queue in /dev/shm/mailflow-sink-*: 40 of them on a machine after a morning of test runs
    script = f"import asyncio\nfrom mailflow.testing import Sink\nROOT = {str(tmp_path)!r}\nkept = {start}\n" \
             "import os\nprint(len(os.listdir(ROOT)), flush=True)\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "1\n"), done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_forked_child_exiting_leaves_the_parents_running_sink_its_directory(tmp_path):
    """A child forked from a process with a running Sink (a pre-fork server under test) runs the parent's atexit
    list when it ends with sys.exit: the Sink's directory removal there took the parent's queue away."""
    script = ("import os, sys, smtplib\nfrom mailflow.testing import Sink\n"
              f"sink = Sink.threaded(temporary_root={str(tmp_path)!r}).start()\n"
              "pid = os.fork()\nif pid == 0:\n    sys.exit(0)\nos.waitpid(pid, 0)\n"
              "print(sink.sink.directory.exists(), flush=True)\n"
              "smtplib.SMTP(sink.host, sink.port).sendmail('a@x.test', ['b@x.test'], 'Subject: s\\r\\n\\r\\nx')\n"
              "print(len(sink.wait_for(to='b@x.test', timeout=5)), flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "True\n1\n"), done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_threaded_sink_left_running_is_stopped_before_its_directory_goes(tmp_path):
    """At exit the removal ran while the Sink still served (its queue gone under it: "cannot read the queue's free
    space"), and its stop came after the interpreter had shut the executors its server uses down ("cannot
    schedule new futures after shutdown" tracebacks); it is stopped first, then its directory goes."""
    script = ("import shutil, socket\nfrom mailflow.testing import Sink\nremove = shutil.rmtree\n"
              "def observed(path, **kw):\n"
              "    try:\n        socket.create_connection((sink.host, sink.port), timeout=5).close()\n"
              "        print('accepting at the removal', flush=True)\n"
              "    except ConnectionRefusedError:\n        print('stopped at the removal', flush=True)\n"
              "    remove(path, **kw)\n"
              f"shutil.rmtree = observed\nsink = Sink.threaded(temporary_root={str(tmp_path)!r}).start()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "stopped at the removal\n"), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []

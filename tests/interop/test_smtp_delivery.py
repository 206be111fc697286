"""The smtp delivery agent against real peers: Postfix's smtp-sink as the remote MX (found through the in-process
DNS server), swaks and smtp-source as the clients on the way in, aiosmtpd with trustme certificates where TLS is
needed (smtp-sink has none).

MX records carry no ports: every peer of a test listens on one port number (`smtp.port` in mailflow's config),
each on its own loopback address; an MX whose address has nothing listening refuses the connection.
"""
from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import os
import re
import shutil
import ssl
import tempfile
from pathlib import Path

import pytest
import trustme

from tests.support import (accepts, eventually, free_port, postfix_instance, queue_becomes, require_tool,
                           run_tool, send)

pytestmark = pytest.mark.interop


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1:port, dumping every message (-D) and counting sessions (-c) and, with -v,
    showing the conversation on stdout. As root it runs as nobody, so its dump folder is world-writable."""

    def __init__(self, port: int, *options: str):
        self.port = port
        self.options = options
        self.folder = Path(tempfile.mkdtemp(prefix="mailflow-sink-", dir="/tmp"))
        os.chmod(self.folder, 0o777)
        self.dump = self.folder / "dump.txt"
        self.output = bytearray()
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None

    async def start(self) -> "SmtpSink":
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self._proc = await asyncio.create_subprocess_exec(
            require_tool("smtp-sink"), *user, "-c", "-v", "-h", "sink.test", "-D", str(self.dump), *self.options,
            f"127.0.0.1:{self.port}", "64", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        self._reader = asyncio.create_task(self._collect())
        await eventually(lambda: accepts(self.port))
        await eventually(lambda: self._counts()["sess"] == 1)  # the probe's session has ended
        return self

    async def stop(self) -> None:
        if self._proc and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        if self._reader:
            await asyncio.gather(self._reader, return_exceptions=True)

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def counters(self) -> dict[str, int]:
        """Sessions ended, QUITs and messages received, not counting the probe that saw the sink listening."""
        counts = self._counts()
        return {**counts, "sess": max(0, counts["sess"] - 1)}

    def _counts(self) -> dict[str, int]:
        """smtp-sink's last `sess=N quit=N mesg=N` line."""
        found = re.findall(rb"sess=(\d+) quit=(\d+) mesg=(\d+)", bytes(self.output))
        sess, quit_, mesg = map(int, found[-1]) if found else (0, 0, 0)
        return {"sess": sess, "quit": quit_, "mesg": mesg}

    def dumped(self) -> bytes:
        return self.dump.read_bytes() if self.dump.exists() else b""

    async def _collect(self) -> None:
        while chunk := await self._proc.stdout.read(4096):
            self.output += chunk


@pytest.fixture
async def sink():
    started: list[SmtpSink] = []

    async def start(port: int, *options: str) -> SmtpSink:
        s = await SmtpSink(port, *options).start()
        started.append(s)
        return s

    yield start
    for s in started:
        await s.stop()
        s.cleanup()




async def swaks(port: int, sender: str, rcpt: str, *extra: str) -> str:
    rc, out = await run_tool(require_tool("swaks"), "--server", "127.0.0.1", "--port", str(port),
                             "--ehlo", "client.test", "--from", sender, "--to", rcpt, "--header", "Subject: interop",
                             "--timeout", "10", *extra)
    assert rc == 0, out
    return out


def zone(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def relaying(dns_server: str, port: int, **smtp) -> dict:
    """mailflow settings: relay for loopback clients, MX lookups at `dns_server`, peers on `port`."""
    return {"mynetworks": ["127.0.0.0/8"], "dns": {"nameservers": [dns_server]},
            "smtp": {"port": port, "tls_security_level": "none", **smtp}}


async def pending_reasons(store) -> list[str]:
    reasons = []
    for message in await store.due(2e9, 100):
        reasons += [reason for _, status, _, reason in await store.recipients(message.queue_id) if status == "pending"]
    return reasons


# ---------------------------------------------------------------------------------------------------- MX and smtp-sink


async def test_first_mx_refuses_the_connection_the_second_smtp_sink_takes_the_mail(mailflow_server, dns_zone, sink):
    port = free_port()
    remote = await sink(port)
    dns = dns_zone(zone(
        "dest.test. 300 IN MX 10 mx1.dest.test.",
        "dest.test. 300 IN MX 20 mx2.dest.test.",
        "mx1.dest.test. 300 IN A 127.0.0.2",  # nothing listens there
        "mx2.dest.test. 300 IN A 127.0.0.1",
    ))
    mf = await mailflow_server(**relaying(dns, port))
    out = await swaks(mf.smtp_addresses[0][1], "someone@remote.test", "user@dest.test", "--body", "via MX 20")
    assert "<-  250 2.0.0 Ok: queued as" in out

    await queue_becomes(mf.store, {}, timeout=10)
    dumped = await eventually(lambda: b"via MX 20" in remote.dumped() and remote.dumped())
    assert b"X-Rcpt-Args: <user@dest.test>" in dumped
    assert b"X-Helo-Args: mx.mailflow.test" in dumped
    assert b"X-Mail-Args: <someone@remote.test>" in dumped


async def test_one_connection_carries_several_messages_to_smtp_sink(mailflow_server, dns_zone, sink):
    port, count = free_port(), 5
    remote = await sink(port)
    dns = dns_zone(zone("dest.test. 300 IN MX 10 mx.dest.test.", "mx.dest.test. 300 IN A 127.0.0.1"))
    mf = await mailflow_server(**relaying(dns, port), queue={"initial_destination_concurrency": 1,
                                                             "default_destination_concurrency_limit": 1})
    rc, out = await run_tool(require_tool("smtp-source"), "-m", str(count), "-s", "1", "-f", "from@source.test",
                        "-t", "to@dest.test", f"127.0.0.1:{mf.smtp_addresses[0][1]}")
    assert rc == 0, out
    await queue_becomes(mf.store, {}, timeout=15)
    await eventually(lambda: remote.counters["mesg"] == count)
    assert remote.counters["sess"] == 0  # the session is still open, cached for the next message
    await mf.stop()  # close() QUITs the cached session
    await eventually(lambda: remote.counters["sess"] == 1), remote.counters
    assert remote.counters == {"sess": 1, "quit": 1, "mesg": count}


async def test_4xx_defers_and_the_retry_delivers(mailflow_server, dns_zone, sink):
    port = free_port()
    greylisting = await sink(port, "-r", "RCPT")  # every RCPT: 450 4.3.0 Error: command failed
    dns = dns_zone(zone("dest.test. 300 IN MX 10 mx.dest.test.", "mx.dest.test. 300 IN A 127.0.0.1"))
    mf = await mailflow_server(**relaying(dns, port))
    await swaks(mf.smtp_addresses[0][1], "someone@remote.test", "user@dest.test", "--body", "second time lucky")

    await queue_becomes(mf.store, {"deferred": 1}, timeout=10)
    assert await pending_reasons(mf.store) == [
        "host mx.dest.test[127.0.0.1] said: 450 4.3.0 Error: command failed (in reply to RCPT TO command)"]
    await greylisting.stop()  # the cached session dies with it; the retry notices and connects afresh
    accepting = await sink(port)
    await queue_becomes(mf.store, {}, timeout=15)
    assert b"second time lucky" in await eventually(accepting.dumped)


async def test_5xx_bounces_and_the_notice_reaches_the_sender(mailflow_server, dns_zone, sink, smtp_peer):
    port = free_port()
    await sink(port, "-f", "RCPT")  # every RCPT: 500 5.3.0 Error: command failed
    sender_mx = await smtp_peer("127.0.0.3", port)
    dns = dns_zone(zone(
        "dest.test. 300 IN MX 10 mx.dest.test.", "mx.dest.test. 300 IN A 127.0.0.1",
        "sender.test. 300 IN MX 10 mx.sender.test.", "mx.sender.test. 300 IN A 127.0.0.3",
    ))
    mf = await mailflow_server(**relaying(dns, port))
    await swaks(mf.smtp_addresses[0][1], "alice@sender.test", "nobody@dest.test")

    [bounce] = await eventually(lambda: sender_mx.messages, timeout=10)
    assert (bounce.mail_from, bounce.rcpt_tos) == ("<>", ["alice@sender.test"])
    notice = email.message_from_bytes(bounce.content, policy=email.policy.default)
    status = next(p for p in notice.walk() if p.get_content_type() == "message/delivery-status").get_payload()[1]
    assert (status["Action"], status["Status"]) == ("failed", "5.3.0")
    assert status["Final-Recipient"] == "rfc822; nobody@dest.test"
    assert "500 5.3.0 Error: command failed" in status["Diagnostic-Code"]
    await queue_becomes(mf.store, {}, timeout=10)


async def test_8bitmime_is_converted_for_a_sink_without_8bitmime(mailflow_server, dns_zone, sink):
    port = free_port()
    remote = await sink(port, "-8")  # no 8BITMIME
    dns = dns_zone(zone("dest.test. 300 IN MX 10 mx.dest.test.", "mx.dest.test. 300 IN A 127.0.0.1"))
    mf = await mailflow_server(**relaying(dns, port))
    content = (b"Subject: eight\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n")
    await send(mf.smtp_addresses[0][1], "someone@remote.test", ["user@dest.test"], content,
               mail_options=["BODY=8BITMIME"])
    await queue_becomes(mf.store, {}, timeout=10)
    dumped = await eventually(remote.dumped)
    assert b"Content-Transfer-Encoding: quoted-printable\n" in dumped  # smtp-sink's dump has LF line ends
    assert dumped.endswith(b"\n\nGr=C3=BC=C3=9Fe\n\n")  # and an empty line after each message
    assert b"BODY=8BITMIME" not in dumped


QP_PROBE = ("x" * 71 + "\u00e9" + "tail",  # a triplet across Postfix's soft-break point, at each offset
            "x" * 70 + "\u00e9" + "tail", "x" * 72 + "\u00e9" + "tail", "x" * 69 + "=" + "y" * 10,
            "x" * 73, "x" * 74, "y" * 72 + " ", "y" * 73 + " ", "z" * 80 + "\t", "\u00e9" * 200,
            "a = b \t mixed\u00e8 " * 40, "w" * 3000, "", "last \u00fc")


async def test_8bit_conversion_writes_quoted_printable_as_a_real_postfix_does(mailflow_server, sink):
    """Soft line breaks where Postfix's mime_state puts them (after 73 characters, a triplet kept whole, a
    long line's pieces joined), trailing blanks encoded: the same bytes from both, to smtp-sinks without
    8BITMIME."""
    body = "\r\n".join(QP_PROBE).encode() + b"\r\n"
    content = (b"Subject: qp\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body)
    dumps = []
    for relay in ("postfix", "mailflow"):
        remote = await sink(port := free_port(), "-8")
        if relay == "postfix":
            async with postfix_instance({"relayhost": f"[127.0.0.1]:{port}", "mynetworks": "127.0.0.0/8"}) as pf:
                await send(pf.port, "someone@remote.test", ["user@dest.test"], content, mail_options=["BODY=8BITMIME"])
                dumps.append(await eventually(remote.dumped, timeout=20))
        else:
            mf = await mailflow_server(mynetworks=["127.0.0.0/8"], relayhost=f"[127.0.0.1]:{port}",
                                       smtp={"tls_security_level": "none"})
            await send(mf.smtp_addresses[0][1], "someone@remote.test", ["user@dest.test"], content,
                       mail_options=["BODY=8BITMIME"])
            dumps.append(await eventually(remote.dumped, timeout=20))
    postfix, mailflow = (dump.split(b"\n\n", 1)[1] for dump in dumps)
    assert mailflow == postfix
    assert b"x" * 71 + b"=C3=\n=A9tail" in postfix and b"y" * 72 + b"=20\n" in postfix  # what both did


async def test_auth_to_smtp_sink_as_a_relay(mailflow_server, sink):
    port = free_port()
    remote = await sink(port)  # announces AUTH PLAIN LOGIN and accepts any credentials
    relay = f"[127.0.0.1]:{port}"
    mf = await mailflow_server(relayhost=relay, mynetworks=["127.0.0.0/8"],
                               smtp={"tls_security_level": "none", "sasl_tls_required": False,
                                     "sasl_password_maps": [f"inline:{{ {{{relay} = relayuser:pa55}} }}"]})
    await swaks(mf.smtp_addresses[0][1], "someone@remote.test", "user@far.test")
    try:
        await queue_becomes(mf.store, {}, timeout=10)
    except AssertionError as e:
        raise AssertionError(f"{e}: {await pending_reasons(mf.store)}") from None
    assert b"AUTH PLAIN AHJlbGF5dXNlcgBwYTU1" in bytes(remote.output)  # base64("\0relayuser\0pa55")


# ---------------------------------------------------------------------------------------------------- TLS verify


def tls_peer_context(ca: trustme.CA, name: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


async def test_verify_delivers_to_the_right_certificate_and_defers_the_wrong_one(
        mailflow_server, dns_zone, smtp_peer, tmp_path):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    good = await smtp_peer("127.0.0.1", free_port(), tls_context=tls_peer_context(ca, "mx.good.test"))
    wrong = await smtp_peer("127.0.0.4", good.port, tls_context=tls_peer_context(ca, "someone-else.test"))
    dns = dns_zone(zone(
        "good.test. 300 IN MX 10 mx.good.test.", "mx.good.test. 300 IN A 127.0.0.1",
        "wrong.test. 300 IN MX 10 mx.wrong.test.", "mx.wrong.test. 300 IN A 127.0.0.4",
    ))
    mf = await mailflow_server(**relaying(dns, good.port, tls_security_level="verify",
                                          tls_ca_file=str(tmp_path / "ca.pem")))
    port = mf.smtp_addresses[0][1]
    await swaks(port, "someone@remote.test", "user@good.test")
    await swaks(port, "someone@remote.test", "user@wrong.test")

    await queue_becomes(mf.store, {"deferred": 1}, timeout=10)
    assert [(m.rcpt_tos, m.tls) for m in good.messages] == [(["user@good.test"], True)]
    assert wrong.messages == []
    assert await pending_reasons(mf.store) == ["Server certificate not verified"]  # (Postfix's words)


def tls_established(lines) -> list[str]:
    """The client's `… TLS connection established to …` lines, up to the cipher's bits (Postfix then names the key
    exchange and signature, which Python's ssl module does not tell)."""
    return [re.sub(r"(bits\)).*", r"\1", line) for line in lines if " TLS connection established to " in line]


async def test_the_tls_line_of_a_delivery_is_postfix_s(mailflow_server, smtp_peer, caplog):
    """tls_misc.c's `Untrusted TLS connection established to host[ip]:port: TLSv1.3 with cipher … (256/256 bits)`,
    no queue id (a connection may serve several messages), for a level may delivery to a peer with STARTTLS, from
    smtp_tls_loglevel 1 on (mailflow's smtp.tls_loglevel; at 0, the default of both, there is no such line:
    tests/interop/test_client_log_vs_postfix.py)."""
    caplog.set_level(logging.INFO, logger="mailflow.smtp")
    peer = await smtp_peer("127.0.0.1", tls_context=tls_peer_context(trustme.CA(), "localhost"))
    relay = f"[127.0.0.1]:{peer.port}"
    async with postfix_instance({"relayhost": relay, "mynetworks": "127.0.0.0/8",
                                 "smtp_tls_security_level": "may", "smtp_tls_loglevel": "1"}) as pf:
        await send(pf.port, "someone@remote.test", ["user@dest.test"], b"Subject: tls\r\n\r\nhello\r\n")
        await eventually(lambda: len(peer.messages) == 1, timeout=20)
        await eventually(lambda: tls_established(pf.maillog.splitlines()), what="Postfix's TLS line")
        postfix = [line.split("]: ", 1)[1] for line in tls_established(pf.maillog.splitlines())]
    mf = await mailflow_server(mynetworks=["127.0.0.0/8"], relayhost=relay,
                               smtp={"tls_security_level": "may", "tls_loglevel": 1})
    await send(mf.smtp_addresses[0][1], "someone@remote.test", ["user@dest.test"], b"Subject: tls\r\n\r\nhello\r\n")
    await eventually(lambda: len(peer.messages) == 2, timeout=20)
    assert tls_established(r.getMessage() for r in caplog.records if r.name == "mailflow.smtp") == postfix
    assert [m.tls for m in peer.messages] == [True, True]
    assert re.fullmatch(rf"Untrusted TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:{peer.port}: "
                        r"TLSv1\.3 with cipher \S+ \(\d+/\d+ bits\)", postfix[0])

"""Clients no one here wrote, against the sink: swaks and Django's SMTP email backend sending through it, and
the PyPI Mailpit client (`mailpit-api-client`, unmodified) reading the capture API, of the embedded Sink and
of `mailflow serve --sink`."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from mailflow.testing import Sink
from tests.support import require_tool
from tests.support import accepts, eventually, free_port
from tests.support import run_tool as run

pytestmark = pytest.mark.interop


async def test_swaks_through_required_starttls_and_auth(tmp_path):
    async with Sink(tls="encrypt", users={"app": "s3cret"}) as sink:
        rc, out = await run(require_tool("swaks"), "--server", sink.host, "--port", str(sink.port),
                            "--from", "app@shop.test", "--to", "bob@example.com", "--tls", "--tls-verify",
                            "--tls-ca-path", sink.ca_file, "--tls-sni", "localhost", "--auth", "PLAIN",
                            "--auth-user", "app", "--auth-password", "s3cret", "--header", "Subject: from swaks",
                            "--body", "hello from swaks", "--timeout", "10")
        assert rc == 0, out
        [msg] = await sink.wait_for(subject="from swaks")
    assert msg.text.strip() == "hello from swaks" and msg.recipients == ("bob@example.com",)
    assert msg.transcript.login == "app" and msg.transcript.tls
    assert [text for who, text in msg.transcript.lines if text.startswith("AUTH")] == ["AUTH PLAIN ****"]


def test_django_smtp_backend():
    from django.conf import settings

    if not settings.configured:
        settings.configure()
    from django.core.mail import EmailMultiAlternatives, get_connection

    with Sink.threaded(users={"django": "pw"}) as sink:
        connection = get_connection("django.core.mail.backends.smtp.EmailBackend", host=sink.host, port=sink.port,
                                    username="django", password="pw", timeout=10)
        email = EmailMultiAlternatives("Welcome", "Hello from Django", "site@shop.test", ["new@example.com"],
                                       bcc=["archive@shop.test"], connection=connection)
        email.attach_alternative("<p>Hello from <b>Django</b></p>", "text/html")
        email.attach("terms.txt", "Be nice.", "text/plain")
        assert email.send() == 1
        [msg] = sink.wait_for(to="archive@shop.test")
    assert msg.recipients == ("new@example.com", "archive@shop.test") and "Bcc" not in msg.message
    assert (msg.subject, msg.text.strip()) == ("Welcome", "Hello from Django")
    assert msg.html == "<p>Hello from <b>Django</b></p>"
    assert [(a.filename, a.data) for a in msg.attachments] == [("terms.txt", b"Be nice.")]
    assert msg.transcript.login == "django"


def send_with_smtplib(port: int, subject: str, to: str = "bob@example.com") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("app@shop.test", [to], f"From: App <app@shop.test>\r\nTo: {to}\r\nSubject: {subject}\r\n"
                                               f"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\n\r\nHello.\r\n")


def exercise_mailpit_client(base_url: str, smtp_port: int) -> None:
    """What a test written against Mailpit does with the PyPI client, unchanged."""
    from mailpit.client.api import API

    api = API(base_url, timeout=10)
    send_with_smtplib(smtp_port, "First")
    send_with_smtplib(smtp_port, "Second", to="carol@example.com")
    listing = api.get_messages()
    assert (listing.total, listing.count) == (2, 2)
    newest, oldest = listing.messages
    assert (newest.subject, oldest.subject) == ("Second", "First")
    assert newest.to[0].address == "carol@example.com" and newest.from_.name == "App"
    message = api.get_message(newest.id)
    assert (message.subject, message.text.strip(), message.size > 0) == ("Second", "Hello.", True)
    assert message.date.year == 2026
    api.put_messages([oldest.id], "Read", True)
    assert api.get_messages().unread == 0  # the one opened above and the one marked
    api.delete_messages([oldest.id])
    assert [m.subject for m in api.get_messages().messages] == ["Second"]
    api.delete_messages([])  # every message
    assert api.get_messages().total == 0


def test_mailpit_client_against_the_embedded_sink():
    pytest.importorskip("mailpit.client.api")
    with Sink.threaded(http_api=True) as sink:
        exercise_mailpit_client(sink.http_url, sink.port)


async def test_mailpit_client_against_serve_sink(tmp_path):
    pytest.importorskip("mailpit.client.api")
    smtp_port, http_port = free_port(), free_port()
    config = tmp_path / "config.toml"
    config.write_text(f'[smtpd]\nlisten = ["127.0.0.1:{smtp_port}"]\n[http]\nlisten = ["127.0.0.1:{http_port}"]\n')
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mailflow", "serve", "--sink", "-c", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        assert await eventually(lambda: accepts(http_port) and accepts(smtp_port), timeout=20), \
            (tmp_path / "serve.log").read_text()
        await asyncio.to_thread(exercise_mailpit_client, f"http://127.0.0.1:{http_port}", smtp_port)
        body = await asyncio.to_thread(_get, f"http://127.0.0.1:{http_port}/api/v1/info")
        assert json.loads(body)["RuntimeStats"]["SMTPAccepted"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        await eventually(lambda: proc.poll() is not None, timeout=15)
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()
    assert not (tmp_path / "var").exists()  # the capture server's queue was a temporary directory




def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()

"""Speaking SMTP to a server under test: one raw dialogue client, and three small helpers built on it or on
aiosmtplib (a real client library, for tests where the dialogue is not the point).

- `SmtpClient.connect(port, greet=True, tls=None, first=b"", sock=None)`: a byte-exact client on 127.0.0.1.
  `send(bytes)`, `reply()`, `cmd(line)` (a line without CRLF, str or bytes), `envelope()` (EHLO, MAIL, RCPT, each
  asserted 250), `send_message(content)` (MAIL to the end of DATA; the final reply), `starttls(ctx)`,
  `peer_names()`, `closed()` (EOF within the timeout), `rest()` (whatever the server still sends, up to EOF),
  `close()`. With `greet` the greeting is read (and must be 220) and kept as `greeting`. `async with await
  SmtpClient.connect(port) as client:` closes it however the block ends (a client a failed assertion leaves open
  holds a private Postfix's session for smtpd_timeout, and every later `sessions_ended` of its instance fails).
- `Reply(code, text)`: one reply as received. `code` is None when the server closed the connection instead;
  `text` is every line of it as sent, code included ("250-mx…\\n250 SIZE …"). A Reply equals the tuple
  (code, text), and equals a `mailflow.status.Reply` whose one line it is: tests compare with the catalogue
  (`assert await c.cmd("VRFY x") == status.VRFY_DISABLED`) wherever the wording is not the point.
- `rcpt_reply(port, rcpt)`: the reply to RCPT TO:<rcpt> in a fresh session (EHLO, MAIL FROM:<s@remote.test>).
  `rcpt_until(port, rcpt, code)`: the same, again and again until the reply has `code` (a changed table file is
  re-read in a worker thread, at most once a second: this waits until the server has seen the change).
- `end_of_data_replies(port, contents)`: each content's reply at the end of DATA, one fresh session each
  (s@remote.test to plain@relay.test; the differential tests of header and body checks).
- `send_probe(port, sender, rcpts, content)`: one message in a fresh raw session, every RCPT asserted 250; the reply
  code to its content (the differential tests' probes: the same bytes to both servers).
- `send(port, sender, rcpts, content)`: one message with aiosmtplib; returns (refused recipients, final reply
  text without its code), as aiosmtplib's sendmail does.
- `client_hello()`: a real TLS client's first flight (its ClientHello); `half_client_hello()`: its first half (a
  handshake begun, then stalled).
- `implicit_tls_talking_first(port, first, ctx, command)`: a 465 client that sends `first` in clear (a PROXY header,
  or nothing), does the handshake and sends `command` in the same write as its last handshake message (before it
  has seen the greeting); what the server sent over TLS until its second reply line's end or the close. Blocking:
  run it with asyncio.to_thread.

Every read is bounded (`TIMEOUT`, or the `timeout` argument); nothing waits for ever. TIMEOUT only bounds a
failure: a pass never waits it out, so it is generous. A reply may come only after the server's own wait (a policy
service, milter or DNS timeout of 2 s; smtpd_timeout), and on a loaded machine (CI: 2 vCPUs, `-n 2`) that wait
runs late: Postfix's RCPT behind a dead policy service with timeout=2s once took over 5 s. 20 s stays below every
Postfix default timer (30 s milter, 100 s policy, 300 s smtpd): a server that ignores a configured timer for its
default does not meet it. Still, a reply that follows a server timer is timed by its test and bounded by that
timer (or by Postfix's wait in the same run), not by TIMEOUT. A test that means "no reply within N s" says so
with its own `timeout`.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import NamedTuple

import aiosmtplib

from mailflow import status
from tests.support.waiting import eventually

TIMEOUT = 20.0
MESSAGE = b"Subject: t\r\n\r\nbody\r\n"


class Reply(NamedTuple):
    """One SMTP reply as received: the code (None at EOF) and its lines as sent, joined by newlines."""

    code: int | None
    text: str

    def __eq__(self, other: object) -> bool:
        if isinstance(other, status.Reply):
            return self.code == other.code and self.text == str(other)
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = tuple.__hash__

    @property
    def lines(self) -> list[str]:
        """The text of each line after its code and separator (EHLO keywords, AUTH challenges)."""
        return [line[4:] for line in self.text.splitlines()]


class SmtpClient:
    """A raw SMTP client: what is sent is exactly the bytes given, and each reply is seen exactly as sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.greeting: Reply | None = None

    @classmethod
    async def connect(cls, port: int, *, greet: bool = True, tls: ssl.SSLContext | None = None,
                      first: bytes = b"", sock: socket.socket | None = None,
                      timeout: float = TIMEOUT) -> "SmtpClient":
        """Connect to 127.0.0.1:`port` (or over `sock`), with implicit `tls` if given; send `first` at once (a
        PROXY header); with `greet`, read the greeting, which must be 220."""
        where = {"sock": sock} if sock is not None else {"host": "127.0.0.1", "port": port}
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(**where, ssl=tls, server_hostname="localhost" if tls else None), timeout)
        client = cls(reader, writer)
        if first:
            await client.send(first)
        if greet:
            client.greeting = await client.reply(timeout)
            assert client.greeting.code == 220, client.greeting
        return client

    async def __aenter__(self) -> "SmtpClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout: float = TIMEOUT) -> Reply:
        """The next (multi-line) reply; Reply(None, lines so far) when the server closes the connection."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                return Reply(None, "\n".join(lines))
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                return Reply(int(line[:3]), "\n".join(lines))

    async def cmd(self, line: str | bytes, timeout: float = TIMEOUT) -> Reply:
        await self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply(timeout)

    async def envelope(self, rcpt: str = "alice@local.test", mail_params: str = "", rcpt_params: str = "",
                       sender: str = "s@remote.test", ehlo: bool = True) -> None:
        if ehlo:
            assert (await self.cmd("EHLO client.test")).code == 250
        assert (await self.cmd(f"MAIL FROM:<{sender}>{mail_params}")).code == 250
        assert (await self.cmd(f"RCPT TO:<{rcpt}>{rcpt_params}")).code == 250

    async def send_message(self, content: bytes = MESSAGE, rcpt: str = "alice@local.test",
                           ehlo: bool = True) -> Reply:
        """A whole transaction (EHLO first unless `ehlo` is false); `content` is sent as it is (CRLF lines, not
        dot-stuffed), then the terminator. Returns the reply to the end of DATA."""
        await self.envelope(rcpt, ehlo=ehlo)
        assert (await self.cmd("DATA")).code == 354
        await self.send(content + b".\r\n")
        return await self.reply()

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        assert (await self.cmd("STARTTLS")).code == 220
        await self.writer.start_tls(ctx, server_hostname="localhost")

    def peer_names(self) -> list[str]:
        """The DNS names of the server's certificate."""
        cert = self.writer.get_extra_info("peercert")
        return [v for k, v in cert["subjectAltName"] if k == "DNS"]

    async def rest(self, timeout: float = TIMEOUT) -> bytes:
        """Everything the server still sends until it closes the connection (TimeoutError if it does not)."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    async def closed(self, timeout: float = TIMEOUT) -> bool:
        """True when the server closes the connection within `timeout` (whatever it sent before)."""
        try:
            await self.rest(timeout)
            return True
        except (ConnectionResetError, asyncio.TimeoutError):
            return False

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


async def rcpt_reply(port: int, rcpt: str, sender: str = "s@remote.test") -> Reply:
    """The server's reply to RCPT TO:<rcpt> in a fresh session."""
    client = await SmtpClient.connect(port)
    try:
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd(f"MAIL FROM:<{sender}>")).code == 250
        return await client.cmd(f"RCPT TO:<{rcpt}>")
    finally:
        await client.close()


async def end_of_data_replies(port: int, contents: dict[str, bytes], mail: str = "MAIL FROM:<s@remote.test>"
                       ) -> dict[str, Reply]:
    """Each content (without its final `.` line, which this sends) in a fresh session of its own, `mail` then RCPT
    TO:<plain@relay.test> (their replies not asserted): the reply at the end of DATA, by the content's name."""
    got = {}
    for name, content in contents.items():
        async with await SmtpClient.connect(port) as client:
            for command in ("EHLO client.test", mail, "RCPT TO:<plain@relay.test>", "DATA"):
                await client.cmd(command)
            got[name] = await client.cmd(content + b".")
    return got


async def rcpt_until(port: int, rcpt: str, code: int, timeout: float = 20.0) -> Reply:
    """RCPT in fresh sessions until the reply has `code` (fails after `timeout`); returns that reply."""
    async def answered() -> Reply | None:
        reply = await rcpt_reply(port, rcpt)
        return reply if reply.code == code else None

    return await eventually(answered, timeout=timeout, step=0.1, what=f"RCPT TO:<{rcpt}> answered {code}")


async def send_probe(port: int, sender: str, rcpts: list[str], content: str) -> int | None:
    """See the module doc: `content` is the message without its final `.` line."""
    client = await SmtpClient.connect(port)
    try:
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd(f"MAIL FROM:<{sender}>")).code == 250, sender
        for rcpt in rcpts:
            assert (await client.cmd(f"RCPT TO:<{rcpt}>")).code == 250, rcpt
        assert (await client.cmd("DATA")).code == 354
        return (await client.cmd(f"{content}\r\n.")).code
    finally:
        await client.close()


async def send(port: int, sender: str, rcpts: list[str], content: bytes, **kwargs):
    """One message over a fresh session with aiosmtplib; returns (refused recipients, final reply text)."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=TIMEOUT) as client:
        return await client.sendmail(sender, rcpts, content, **kwargs)


def client_hello() -> bytes:
    """See the module doc."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    hello = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), hello)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return hello.read()


def half_client_hello() -> bytes:
    """See the module doc."""
    data = client_hello()
    return data[:len(data) // 2]


def implicit_tls_talking_first(port: int, first: bytes, ctx: ssl.SSLContext, command: bytes) -> bytes:
    """See the module doc. With TLS 1.3 (what a default context and OpenSSL 3 agree on) the client's last handshake
    message (its Finished) and `command` go in one write after the server's flight, as a client that pipelines at
    once sends them."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(first)
        for _ in range(100):  # a handshake is a few round trips
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                if not data:
                    return got
                incoming.write(data)
        tls.write(command)
        sock.sendall(outgoing.read())
        while got.count(b"\r\n") < 2:
            try:
                got += tls.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    break
                incoming.write(data)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
    return got

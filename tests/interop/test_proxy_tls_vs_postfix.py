"""The PROXY header in front of implicit TLS, mailflow beside a private Postfix 3.7 with smtpd_tls_wrappermode = yes
and smtpd_upstream_proxy_protocol = haproxy (mailcow's 10465): the same dialogues, the same bytes back.

- a v1 header, then the handshake, then the greeting over TLS: EHLO and QUIT answered, the session logged with
  the client the header names;
- a ClientHello and no header, a malformed header: `421 4.3.0 <myhostname> Server local error` in clear, at once,
  then the close (Postfix answers it before its wrapper-mode handshake; its close is a reset, the input left
  unread; mailflow's is not);
- a header, then no handshake: closed without a word at the handshake's time limit (smtpd_starttls_timeout);
- EHLO sent with the client's last handshake message, before the greeting: the greeting, then EHLO answered
  (Postfix's early-talk check "MUST NOT apply to TLS wrappermode connections", smtpd.c).
"""
from __future__ import annotations

import asyncio
import re
import ssl

import pytest

from tests.support import SmtpClient, client_hello, implicit_tls_talking_first, postfix_instance
from tests.support.postfix import readable_pki

pytestmark = pytest.mark.interop

HOST = "pf.test"
HEADER = b"PROXY TCP4 192.0.2.10 203.0.113.1 40000 465\r\n"


@pytest.fixture
def pki():
    """A certificate for localhost in a folder Postfix can read, and a client context that trusts it."""
    with readable_pki() as pair:
        yield pair


async def until_closed(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    """What the server sent before it closed, and how it closed ("closed", or "reset": it left input unread)."""
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            data += chunk
    except ConnectionResetError:
        return data, "reset"
    return data, "closed"


async def dialogues(port: int, ctx: ssl.SSLContext) -> dict[str, object]:
    """What the server answers to each dialogue (raw bytes for those refused in clear)."""
    out: dict[str, object] = {}
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEADER)
    await asyncio.wait_for(writer.start_tls(ctx, server_hostname="localhost"), 10)
    c = SmtpClient(reader, writer)
    out["tls"] = [(await c.reply()).code, (await c.cmd("EHLO client.test")).code, (await c.cmd("QUIT")).code]
    await c.close()
    # EHLO in the same write as the client's last handshake message, before the greeting: a client talking first
    # is the rule with implicit TLS, so the early-talk check does not apply (smtpd.c)
    early = await asyncio.to_thread(implicit_tls_talking_first, port, HEADER, ctx, b"EHLO client.test\r\n")
    out["early"] = [line[:4] for line in early.split(b"\r\n")[:2]]
    for name, first in (("clienthello", client_hello()), ("malformed", b"PROXY TCP4 192.0.2.10 x 1 2\r\n")):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(first)
        started = asyncio.get_running_loop().time()
        out[name] = await until_closed(reader)
        out[name + " at once"] = asyncio.get_running_loop().time() - started < 1
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEADER)
    out["silent"] = await until_closed(reader)
    writer.close()
    return out


async def test_proxy_then_implicit_tls_matches_postfix(mailflow_server, pki):
    root, ctx = pki
    async with postfix_instance({
        "myhostname": HOST, "smtpd_tls_wrappermode": "yes", "smtpd_upstream_proxy_protocol": "haproxy",
        "smtpd_upstream_proxy_timeout": "3s", "smtpd_starttls_timeout": "1s",
        "smtpd_tls_cert_file": str(root / "cert.pem"), "smtpd_tls_key_file": str(root / "key.pem"),
    }) as pf:
        postfix = await dialogues(pf.port, ctx)
        await pf.sessions_ended()
        log = pf.maillog
    mf = await mailflow_server(myhostname=HOST, smtpd={
        "tls_cert_file": str(root / "cert.pem"), "tls_key_file": str(root / "key.pem"),
        "listeners": [{"address": "127.0.0.1:0", "role": "submissions",
                       "overrides": {"upstream_proxy_protocol": "haproxy", "upstream_proxy_timeout": 3,
                                     "starttls_timeout": 1, "sasl_auth_enable": False,
                                     "sasl_auth_required": False}}]})
    mailflow = await dialogues(mf.smtpd.address_of("submissions")[1], ctx)
    assert postfix["tls"] == [220, 250, 221]
    assert postfix["early"] == [b"220 ", b"250-"]
    refusal = b"421 4.3.0 pf.test Server local error\r\n"
    assert postfix["clienthello"][0] == postfix["malformed"][0] == refusal
    assert postfix["silent"] == (b"", "closed")
    # the same bytes; how the connection ends may differ: Postfix leaves the rest of the input unread (its close
    # is a reset), mailflow had read it
    assert {k: v[0] if isinstance(v, tuple) else v for k, v in mailflow.items()} == \
        {k: v[0] if isinstance(v, tuple) else v for k, v in postfix.items()}
    assert re.search(r"connect from unknown\[192\.0\.2\.10\]", log), log[-2000:]

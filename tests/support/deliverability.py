"""Helpers for the deliverability tests (DKIM, ARC, SRS, MTA-STS, DANE, the DNS checks): keys and OpenDKIM tables
written under tmp_path, a zone server that sets the DNSSEC AD bit (as a validating resolver would), verifiers that
are not mailflow's (dkimpy reading the in-process DNS through dnspython, OpenDKIM in test mode), and a loopback
HTTPS server for MTA-STS policies.

- `make_key(directory, domain, selector, algorithm)` -> SigningKey (its PEM file written 0600 beside)
- `dkim_signed(key, message)` -> the message signed by dkimpy (a sender's MTA that is not mailflow)
- `dkim_settings(directory, keys, sign_forwarded=False)` -> the `[dkim]` settings (refile SigningTable by From
  domain, KeyTable) for those keys
- `key_zone(keys)` -> zone text with each key's TXT record
- `start_zone(zone_text, ad=True)` -> (nameserver "127.0.0.1:port", stop); `ZoneFixture` for a fixture
- `dnspython_txt(nameserver)` -> a dkimpy dnsfunc that asks that server (not mailflow's resolver)
- `opendkim_verdict(message, records, directory)` -> OpenDKIM's Authentication-Results text for the message;
  `opendkim_result(verdict, domain)` -> "pass", "fail"… for the signature of that domain (None: none found)
- `PolicyServer(ca, host, body, content_type)`: an HTTPS server on 127.0.0.1 (trustme certificate for `host`)
  answering every GET with the body; `.port`, `.requests`; `await start()`, `close()`
"""
from __future__ import annotations

import asyncio
import os
import re
import ssl
import subprocess
import threading
from pathlib import Path

import dkim
import dns.message
import dns.query
import dns.rdatatype
from dnslib import RCODE
from dnslib.server import DNSLogger, DNSServer

from mailflow.signing import keygen
from mailflow.signing.keytables import SigningKey, load_private_key
from tests.support import ZoneAuthority, require_tool


def make_key(directory: Path, domain: str, selector: str, algorithm: str = "rsa") -> SigningKey:
    pem = keygen.generate(algorithm)
    path = directory / f"{selector}.{domain}.private"
    keygen.write_key(str(path), pem)
    name = f"{selector}-{domain}"
    return SigningKey(name, domain, selector, *load_private_key(pem))


def dkim_signed(key: SigningKey, message: bytes, headers: tuple[bytes, ...] = (b"from", b"subject")) -> bytes:
    """`message` with dkimpy's DKIM-Signature (not mailflow's signer) by `key`, over those header fields."""
    return dkim.sign(message, key.selector.encode(), key.domain.encode(), key.private,
                     include_headers=list(headers)) + message


def dkim_settings(directory: Path, keys: list[SigningKey], sign_forwarded: bool = False) -> dict:
    key_table = directory / "KeyTable"
    signing_table = directory / "SigningTable"
    key_table.write_text("".join(f"{k.name} {k.domain}:{k.selector}:{directory}/{k.selector}.{k.domain}.private\n"
                                 for k in keys))
    signing_table.write_text("# From domain -> key\n" + "".join(f"*@{k.domain} {k.name}\n" for k in keys))
    return {"signing_table": f"refile:{signing_table}", "key_table": str(key_table),
            "sign_forwarded": sign_forwarded}


def key_zone(keys: list[SigningKey]) -> str:
    return "\n".join(keygen.txt_record(k, 300) for k in keys) + "\n"


class SecureZoneAuthority(ZoneAuthority):
    """ZoneAuthority that sets AD on every answer (a validating resolver vouching for the zone), or clears it (dnslib's
    reply() copies the query's flags, and a client asks with AD set)."""

    def __init__(self, zone_text: str, ad: bool):
        super().__init__(zone_text)
        self.ad = ad

    def resolve(self, request, handler):
        reply = super().resolve(request, handler)
        reply.header.ad = int(self.ad and reply.header.rcode == RCODE.NOERROR)
        return reply


def start_zone(zone_text: str, ad: bool = True):
    quiet = DNSLogger("-request,-reply,-truncated,-recv,-send,-error,-data", False)
    server = DNSServer(SecureZoneAuthority(zone_text, ad), port=0, address="127.0.0.1", logger=quiet)
    threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def stop() -> None:
        server.server.shutdown()
        server.server.server_close()

    return f"127.0.0.1:{server.server.server_address[1]}", stop


def dnspython_txt(nameserver: str):
    host, port = nameserver.split(":")

    def lookup(name, timeout=5):
        qname = name.decode() if isinstance(name, bytes) else name
        reply = dns.query.udp(dns.message.make_query(qname, "TXT"), host, port=int(port), timeout=timeout)
        return b"".join(b"".join(rd.strings) for rrset in reply.answer for rd in rrset
                        if rrset.rdtype == dns.rdatatype.TXT)

    return lookup


def opendkim_verdict(message: bytes, records: dict[str, str], directory: Path) -> str:
    """Run OpenDKIM (`opendkim -t`, verify mode) on the message with the key records given (TestDNSData); returns
    the Authentication-Results it would add (empty when it adds none)."""
    opendkim = require_tool("opendkim")
    directory.mkdir(exist_ok=True)
    (directory / "dns.txt").write_text("".join(f"{name} {value.replace(' ', '')}\n" for name, value in records.items()))
    conf = directory / "opendkim.conf"
    conf.write_text(f"Mode v\nTestDNSData file:{directory}/dns.txt\nRequireSafeKeys false\nSyslog no\n"
                    f"AuthservID verifier.test\nAlwaysAddARHeader yes\n")
    msg = directory / "message.eml"
    msg.write_bytes(message)
    out = subprocess.run([opendkim, "-t", str(msg), "-x", str(conf), "-vv"], capture_output=True, timeout=30,
                         env={**os.environ, "TMPDIR": str(directory)})
    text = (out.stdout + out.stderr).decode("utf-8", "replace")
    start = text.find("hname='Authentication-Results'")
    return text[start:] if start >= 0 else text


def opendkim_result(verdict: str, domain: str) -> str | None:
    found = re.search(rf"dkim=(\w+)(?: reason=\"[^\"]*\")?(?: \([^)]*\))? header\.d={re.escape(domain)}\b", verdict)
    return found.group(1) if found else None


class PolicyServer:
    """See the module docstring."""

    def __init__(self, ca, host: str, body: str, content_type: str = "text/plain"):
        self._cert = ca.issue_cert(host)
        self.body = body
        self.content_type = content_type
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> "PolicyServer":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(context)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            self.requests.append(request)
            body = self.body.encode()
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: {self.content_type}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

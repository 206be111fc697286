"""Differential test of the SMTP and LMTP clients' own log lines, those beside each recipient's result line: a
private Postfix and mailflow, configured alike (smtp_tls_loglevel and mailflow's smtp.tls_loglevel at their
default, 0), each relay one message per destination to the same peers on loopback, and must write the same lines
and end each recipient alike (status, enhanced code, text). Each line is compared with the service the log names
(Postfix's smtp(8) or lmtp(8)).

Compared: a refused connection (smtp and lmtp: `connect to h[ip]:port: Connection refused`, alone, no queue id), a
refused LMTP greeting (no line but the result), certificates that a `verify` policy refuses (an unknown CA, a
certificate without the IP address or host name asked for, a chain longer than OpenSSL's depth limit: tls_verify.c's
`certificate verification failed for …` lines, the mail deferred `Server certificate not verified`), sessions that went
well at levels verify and may (no line at log level 0), and an LMTP server that offers SMTPUTF8 without 8BITMIME and
sends a line that is no reply (lines of the client core that an LMTP session writes, named `lmtp` as Postfix's: `host
h[ip] offers SMTPUTF8 support, but not 8BITMIME`, `warning: QID: non-LMTP response from h[ip]:port: …`; Postfix's next
line, `warning: to prevent loss of mail, turn off command pipelining for 127.0.0.1 with the
lmtp_discard_lhlo_keyword_address_maps parameter`, names a setting mailflow does not have and is left out). Postfix
names the issuer that it did not trust; mailflow cannot (Python's ssl module gives no certificate of a failed handshake)
and writes `<unknown>`, Postfix's word for an issuer it cannot name.
"""
from __future__ import annotations

import asyncio
import logging
import re
import ssl

import pytest
import trustme

from mailflow.dns import StaticResolver
from mailflow.logs import service_of
from tests.support import eventually, postfix_instance, send
from tests.support.peers import garbling_lmtp
from tests.support.ports import free_port

pytestmark = pytest.mark.interop

RESULT = re.compile(r"to=<([^>]*)>, (?:orig_to=<[^>]*>, )?relay=([^,]*), .*?dsn=([0-9.]+), status=(\w+) \((.*)\)$")
QUEUE_ID = re.compile(r"^((?:smtp|lmtp): (?:warning: )?)[0-9A-Za-z]+: ")
ISSUER = re.compile(r"(: untrusted issuer ).*")
HELPFUL_WARNING = re.compile(r"^lmtp: warning: to prevent loss of mail, turn off command pipelining for ")
CLIENT_LOGGERS = ("mailflow.smtp", "mailflow.lmtp")


# OpenSSL's default verification depth (intermediate CAs at most), which Python's ssl leaves as it is; Postfix sets
# smtp_tls_scert_verifydepth + 1, so its 99 is the same limit, and it names it `limit(100)` when a chain is longer
VERIFY_DEPTH = 100


def chained(root: trustme.CA, intermediates: int) -> trustme.CA:
    """The last of `intermediates` CAs, each issued by the one before, the first by `root`."""
    ca = root
    for _ in range(intermediates):
        ca = ca.create_child_ca()
    return ca


def tls_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


async def refuse_to_talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"421 4.3.2 busy\r\n")
    await writer.drain()
    writer.close()


def results(lines: list[str]) -> dict[str, tuple[str, str, str, str]]:
    """(relay, dsn, status, text) by recipient (the peer's own queue ids, which count its messages, as X)."""
    return {m.group(1): (*m.group(2, 3, 4), re.sub(r"queued as \w+", "queued as X", m.group(5)))
            for line in lines if (m := RESULT.search(line))}


def client_lines(lines: list[str]) -> list[str]:
    """The lines that are not results, queue ids as QID, sorted."""
    return sorted(QUEUE_ID.sub(r"\1QID: ", line) for line in lines if not RESULT.search(line))


def postfix_client_lines(maillog: str) -> list[str]:
    """Postfix's smtp(8) and lmtp(8) lines as `service: text` (`lmtp: warning: …`), without the helpful warning
    mailflow has no setting for."""
    lines = [f"{m.group(1)}: {m.group(2)}" for line in maillog.splitlines()
             if (m := re.search(r"/(smtp|lmtp)\[\d+\]: (.*)", line))]
    return [line for line in lines if not HELPFUL_WARNING.match(line)]


async def test_the_clients_lines_are_postfix_s(mailflow_server, smtp_peer, tmp_path, caplog):
    ca = trustme.CA()
    deep = trustme.CA(path_length=VERIFY_DEPTH + 1)  # (trusted too: the root of a chain past the limit)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes() + deep.cert_pem.bytes())
    ca_file.chmod(0o644)  # (read by Postfix's smtp too)
    good = await smtp_peer(tls_context=tls_context(ca, "127.0.0.1"))
    unknown_ca = await smtp_peer(tls_context=tls_context(trustme.CA(), "127.0.0.1"))
    other_name = await smtp_peer(tls_context=tls_context(ca, "other.test"))
    opportunistic = await smtp_peer(tls_context=tls_context(trustme.CA(), "peer.test"))
    long_chain = await smtp_peer(tls_context=tls_context(chained(deep, VERIFY_DEPTH + 1), "127.0.0.1"))
    refusing = await asyncio.start_server(refuse_to_talk, "127.0.0.1", 0)
    garbling = await asyncio.start_server(garbling_lmtp, "127.0.0.1", 0)
    garbled = f"127.0.0.1[127.0.0.1]:{garbling.sockets[0].getsockname()[1]}"
    closed = free_port()
    routes = {  # destination -> (transport, next hop, TLS policy)
        "refused": ("smtp", f"[127.0.0.1]:{closed}", ""),
        "lmtp-refused": ("lmtp", f"[127.0.0.1]:{closed}", ""),
        "lmtp-421": ("lmtp", f"[127.0.0.1]:{refusing.sockets[0].getsockname()[1]}", ""),
        "lmtp-garbled": ("lmtp", f"[127.0.0.1]:{garbled.rpartition(':')[2]}", ""),
        "verified": ("smtp", f"[127.0.0.1]:{good.port}", "verify"),
        "unknown-ca": ("smtp", f"[127.0.0.1]:{unknown_ca.port}", "verify"),
        "ip-mismatch": ("smtp", f"[127.0.0.1]:{other_name.port}", "verify"),
        "name-mismatch": ("smtp", f"[localhost]:{other_name.port}", "verify"),
        "may": ("smtp", f"[127.0.0.1]:{opportunistic.port}", "may"),
        "long-chain": ("smtp", f"[127.0.0.1]:{long_chain.port}", "verify"),
    }
    try:
        postfix = await relay_with_postfix(routes, str(ca_file))
        mailflow = await relay_with_mailflow(mailflow_server, routes, str(ca_file), caplog)
    finally:
        refusing.close()
        garbling.close()
    assert results(mailflow) == results(postfix)
    assert client_lines(mailflow) == client_lines([ISSUER.sub(r"\1<unknown>", line) for line in postfix])
    # Postfix's own, so that a change on both sides cannot pass unnoticed
    refused = f"connect to 127.0.0.1[127.0.0.1]:{closed}: Connection refused"
    assert {rcpt: got[1:] for rcpt, got in results(postfix).items() if got[2] != "sent"} == {
        "a@refused.test": ("4.4.1", "deferred", refused),
        "a@lmtp-refused.test": ("4.4.1", "deferred", refused),
        "a@lmtp-421.test": ("4.3.2", "deferred", "host 127.0.0.1[127.0.0.1] refused to talk to me: 421 4.3.2 busy"),
        "a@unknown-ca.test": ("4.7.5", "deferred", "Server certificate not verified"),
        "a@ip-mismatch.test": ("4.7.5", "deferred", "Server certificate not verified"),
        "a@name-mismatch.test": ("4.7.5", "deferred", "Server certificate not verified"),
        "a@long-chain.test": ("4.7.5", "deferred", "Server certificate not verified")}
    untrusted = (f"smtp: certificate verification failed for 127.0.0.1[127.0.0.1]:{unknown_ca.port}: "
                 "untrusted issuer ")
    [issuer] = [line.removeprefix(untrusted) for line in postfix if line.startswith(untrusted)]
    assert issuer.startswith("/O=trustme")  # (X509_NAME_oneline)
    assert client_lines(postfix) == sorted([
        f"smtp: {refused}", f"lmtp: {refused}", untrusted + issuer,
        f"smtp: server certificate verification failed for 127.0.0.1[127.0.0.1]:{other_name.port}: "
        f"num=64:IP address mismatch",
        f"smtp: server certificate verification failed for localhost[127.0.0.1]:{other_name.port}: "
        f"num=62:hostname mismatch",
        f"smtp: certificate verification failed for 127.0.0.1[127.0.0.1]:{long_chain.port}: "
        f"certificate chain longer than limit({VERIFY_DEPTH})",
        "lmtp: host 127.0.0.1[127.0.0.1] offers SMTPUTF8 support, but not 8BITMIME",
        f"lmtp: warning: QID: non-LMTP response from {garbled}: hello, this is not LMTP"])


Routes = dict[str, tuple[str, str, str]]
MESSAGE = b"Subject: client lines\r\n\r\nhello\r\n"


def recipients(routes: Routes) -> set[str]:
    return {f"a@{name}.test" for name in routes}


def tls_policies(routes: Routes) -> str:
    return "inline:{" + ", ".join(f"{hop}={level}" for _, hop, level in routes.values() if level) + "}"


def transport_map(routes: Routes, lmtp_prefix: str) -> str:
    """`transport_maps` for the routes, Postfix's lmtp next hops with `inet:`."""
    return "inline:{" + ", ".join(f"{name}.test={kind}:{lmtp_prefix if kind == 'lmtp' else ''}{hop}"
                                  for name, (kind, hop, _) in routes.items()) + "}"


async def relay_with_postfix(routes: Routes, ca_file: str) -> list[str]:
    """One message to each destination through a private Postfix: its smtp and lmtp lines once each recipient
    has its result."""
    async with postfix_instance({"myhostname": "pf.test", "mydestination": "", "delay_warning_time": "0",
                                 "smtp_tls_CAfile": ca_file, "smtp_tls_policy_maps": tls_policies(routes),
                                 "smtp_tls_scert_verifydepth": str(VERIFY_DEPTH - 1),
                                 "transport_maps": transport_map(routes, "inet:")}) as pf:
        for rcpt in sorted(recipients(routes)):
            await send(pf.port, "someone@sender.test", [rcpt], MESSAGE)
        await eventually(lambda: set(results(postfix_client_lines(pf.maillog))) >= recipients(routes) or None,
                         timeout=20, what="Postfix ended every recipient")
        return postfix_client_lines(pf.maillog)


async def relay_with_mailflow(mailflow_server, routes: Routes, ca_file: str, caplog) -> list[str]:
    """The same through mailflow: its smtp and lmtp lines."""
    for logger in ("mailflow.mail", *CLIENT_LOGGERS):
        caplog.set_level(logging.INFO, logger=logger)
    mf = await mailflow_server(
        mynetworks=["127.0.0.0/8"], transport_maps=[transport_map(routes, "")],
        smtp={"tls_security_level": "none", "tls_ca_file": ca_file, "tls_policy_maps": [tls_policies(routes)]},
        resolver=StaticResolver(addresses={"localhost": ["127.0.0.1"]}))
    for rcpt in sorted(recipients(routes)):
        await send(mf.smtp_addresses[0][1], "someone@sender.test", [rcpt], MESSAGE)
    await eventually(lambda: set(results(mailflow_lines(caplog))) >= recipients(routes) or None, timeout=20,
                     what="mailflow ended every recipient")
    return mailflow_lines(caplog)


def mailflow_lines(caplog) -> list[str]:
    """The lines the log attributes to smtp and lmtp, as Postfix's to smtp(8) and lmtp(8): `service: text`."""
    return [f"{service_of(r)}: {'warning: ' * (r.levelno == logging.WARNING)}{r.getMessage()}"
            for r in caplog.records if service_of(r) in ("smtp", "lmtp")]

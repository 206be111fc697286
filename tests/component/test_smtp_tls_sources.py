"""The receiver's own TLS policy, with real peers on loopback: MTA-STS (the `_mta-sts` record in the in-process DNS,
the policy over HTTPS from a trustme-certified server; enforce verifies or defers 4.7.5, testing logs and delivers)
and DANE (TLSA records with the AD bit; `dane` and `dane-only`; a matching record delivers, a wrong one defers)."""
from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import ssl
import sys
import tracemalloc
import warnings

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mailflow.config import SmtpConfig
from mailflow.content import Content
from mailflow.dns import AiodnsResolver, Tlsa
from mailflow.errors import LookupRetry
from mailflow.logs import service_of
from mailflow.model import DeliveryRequest, Outcome, Recipient
from mailflow.transports import RELAY_PROGRAM
from mailflow.transports.smtp import SmtpTransport, dane
from mailflow.transports.smtp.mtasts import FetchError, HttpsPolicyFetcher, MtaSts
from tests.support.deliverability import PolicyServer, start_zone

MESSAGE = b"From: a@remote.test\r\nTo: b@dest.test\r\nSubject: tls\r\n\r\nhello\r\n"


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def zones():
    stops = []

    def start(text: str, ad: bool = True) -> AiodnsResolver:
        nameserver, stop = start_zone(text, ad=ad)
        stops.append(stop)
        return AiodnsResolver(nameservers=(nameserver,), timeout=2.0, tries=1)

    yield start
    for stop in stops:
        stop()


def server_tls(ca: trustme.CA, name: str) -> tuple[ssl.SSLContext, bytes]:
    """A server context with a certificate for `name`, and that certificate's SubjectPublicKeyInfo (DER)."""
    leaf = ca.issue_cert(name)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    certificate = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    return context, spki


def transport(resolver, port: int, ca_path: str = "", tls: str = "may", mta_sts=None,
              program: str = "smtp") -> SmtpTransport:
    config = SmtpConfig(port=port, connect_timeout=2, helo_timeout=2, command_timeout=2, data_timeout=2,
                        tls_security_level=tls, tls_ca_file=ca_path)
    return SmtpTransport(config, resolver=resolver, helo_name="client.mailflow.test", mta_sts=mta_sts,
                         program=program)


async def deliver(t: SmtpTransport, nexthop: str = "dest.test"):
    request = DeliveryRequest("Q1", "a@remote.test", (Recipient(0, "b@dest.test", "b@dest.test"),), nexthop,
                              Content.of(MESSAGE))
    try:
        report = await asyncio.wait_for(t.deliver(request), 10)
    finally:
        await t.close()
    return report.results[0]


def ca_path(ca: trustme.CA, tmp_path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------------- MTA-STS


STS_ZONE = """
dest.test. 300 IN MX 10 mx.dest.test.
mx.dest.test. 300 IN A 127.0.0.1
_mta-sts.dest.test. 300 IN TXT "v=STSv1; id=20240101"
mta-sts.dest.test. 300 IN A 127.0.0.1
"""


def sts_policy(mode: str, mx: str = "mx.dest.test") -> str:
    return f"version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: 86400\n"


async def sts_setup(zones, smtp_peer, ca, tmp_path, *, mode: str, certificate_name: str = "mx.dest.test",
                    mx: str = "mx.dest.test", peer_ca: trustme.CA | None = None):
    resolver = zones(STS_ZONE, ad=False)
    policy_server = await PolicyServer(ca, "mta-sts.dest.test", sts_policy(mode, mx)).start()
    context, _ = server_tls(peer_ca or ca, certificate_name)
    peer = await smtp_peer(tls_context=context)
    fetcher = HttpsPolicyFetcher(resolver, ca_file=ca_path(ca, tmp_path), timeout=5, port=policy_server.port)
    sts = MtaSts(resolver, fetcher)
    return transport(resolver, peer.port, ca_path(ca, tmp_path), mta_sts=sts), peer, policy_server


async def test_enforce_with_a_good_certificate_delivers_over_verified_tls(zones, smtp_peer, ca, tmp_path):
    t, peer, policy_server = await sts_setup(zones, smtp_peer, ca, tmp_path, mode="enforce")
    result = await deliver(t)
    assert result.outcome is Outcome.SENT, result.text
    assert peer.messages[0].tls
    assert policy_server.requests[0].startswith(b"GET /.well-known/mta-sts.txt HTTP/1.1\r\n")
    assert b"host: mta-sts.dest.test" in policy_server.requests[0].lower()
    policy_server.close()


@pytest.mark.parametrize(("certificate_name", "untrusted", "why"), [
    ("other.test", False, "server certificate verification failed for mx.dest.test[127.0.0.1]:{port}: "
                          "num=62:hostname mismatch"),
    ("mx.dest.test", True, "certificate verification failed for mx.dest.test[127.0.0.1]:{port}: "
                           "untrusted issuer <unknown>"),
])
async def test_enforce_with_a_bad_certificate_defers_4_7_5(zones, smtp_peer, ca, tmp_path, certificate_name,
                                                           untrusted, why, caplog):
    """As Postfix with a `secure` policy: "Server certificate not verified", the reason on a line of its own."""
    t, peer, policy_server = await sts_setup(zones, smtp_peer, ca, tmp_path, mode="enforce",
                                             certificate_name=certificate_name,
                                             peer_ca=trustme.CA() if untrusted else None)
    with caplog.at_level(logging.INFO, logger="mailflow.smtp"):
        result = await deliver(t)
    assert (result.outcome, result.dsn, result.text) == (Outcome.DEFERRED, "4.7.5", "Server certificate not verified")
    assert why.format(port=peer.port) in caplog.messages
    assert not peer.messages
    policy_server.close()


async def test_enforce_skips_an_mx_host_the_policy_does_not_list(zones, smtp_peer, ca, tmp_path):
    t, peer, policy_server = await sts_setup(zones, smtp_peer, ca, tmp_path, mode="enforce", mx="*.elsewhere.test")
    result = await deliver(t)
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.7.5")
    assert "does not match the MTA-STS policy" in result.text and not peer.messages
    policy_server.close()


async def test_testing_mode_logs_and_delivers(zones, smtp_peer, ca, tmp_path, caplog):
    t, peer, policy_server = await sts_setup(zones, smtp_peer, ca, tmp_path, mode="testing",
                                             certificate_name="other.test")
    with caplog.at_level(logging.INFO, logger="mailflow.smtp"):
        result = await deliver(t)
    assert result.outcome is Outcome.SENT and peer.messages[0].tls
    assert any("MTA-STS testing: enforce would defer" in r.getMessage() and "does not name mx.dest.test"
               in r.getMessage() for r in caplog.records)
    policy_server.close()


async def endless_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n")
    while True:
        writer.write(b"X-Pad: " + b"a" * 1000 + b"\r\n")
        await writer.drain()


async def endless_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
    while True:
        writer.write(b"mx: " + b"a" * 100_000)
        await writer.drain()


async def dripping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    policy = sts_policy("enforce").encode()
    response = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(policy), policy)
    for byte in response:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(("serve", "why"), [
    (endless_headers, "mta-sts.dest.test: Receive buffer too long"),  # (h11: 16 KB of header section at most)
    (endless_body, "mta-sts.dest.test: policy larger than 65536 bytes"),
    (dripping, "mta-sts.dest.test: timed out after 1s"),  # (each byte within any read timeout: the fetch's bounds all)
])
async def test_a_hostile_policy_server_costs_one_failed_fetch_in_bounded_time_and_memory(zones, ca, tmp_path, serve,
                                                                                       why):
    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    context, _ = server_tls(ca, "mta-sts.dest.test")
    server = await asyncio.start_server(session, "127.0.0.1", 0, ssl=context)
    fetcher = HttpsPolicyFetcher(zones(STS_ZONE, ad=False), ca_file=ca_path(ca, tmp_path), timeout=1,
                                 port=server.sockets[0].getsockname()[1])
    loop = asyncio.get_running_loop()
    tracemalloc.start()
    started = loop.time()
    try:
        with pytest.raises(FetchError) as failed:
            await fetcher.fetch("dest.test")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        server.close()
    assert str(failed.value) == why
    assert loop.time() - started < 3 and peak < 5_000_000, (loop.time() - started, peak)


async def test_the_policy_is_cached_while_the_record_id_stays(zones, smtp_peer, ca, tmp_path):
    resolver = zones(STS_ZONE, ad=False)
    policy_server = await PolicyServer(ca, "mta-sts.dest.test", sts_policy("enforce")).start()
    context, _ = server_tls(ca, "mx.dest.test")
    peer = await smtp_peer(tls_context=context)
    sts = MtaSts(resolver, HttpsPolicyFetcher(resolver, ca_file=ca_path(ca, tmp_path), port=policy_server.port))
    for _ in range(3):
        result = await deliver(transport(resolver, peer.port, ca_path(ca, tmp_path), mta_sts=sts))
        assert result.outcome is Outcome.SENT
    assert len(policy_server.requests) == 1
    policy_server.close()


async def test_a_policy_that_cannot_be_fetched_is_no_policy(zones, smtp_peer, ca, tmp_path):
    resolver = zones(STS_ZONE, ad=False)
    policy_server = await PolicyServer(ca, "mta-sts.dest.test", sts_policy("enforce"), content_type="text/html").start()
    context, _ = server_tls(trustme.CA(), "mx.dest.test")  # would fail enforce
    peer = await smtp_peer(tls_context=context)
    sts = MtaSts(resolver, HttpsPolicyFetcher(resolver, ca_file=ca_path(ca, tmp_path), port=policy_server.port))
    result = await deliver(transport(resolver, peer.port, ca_path(ca, tmp_path), mta_sts=sts))
    assert result.outcome is Outcome.SENT  # as without MTA-STS (RFC 8461 5.1: no valid policy)
    policy_server.close()


async def test_the_mta_sts_lines_are_the_asking_clients_own(zones, smtp_peer, ca, tmp_path, caplog):
    """One MtaSts serves every SMTP client: a policy the relay client could not use is logged as `relay/smtp`'s,
    as each other line of its deliveries, not as smtp's."""
    resolver = zones(STS_ZONE, ad=False)
    policy_server = await PolicyServer(ca, "mta-sts.dest.test", sts_policy("enforce"), content_type="text/html").start()
    peer = await smtp_peer(tls_context=server_tls(ca, "mx.dest.test")[0])
    sts = MtaSts(resolver, HttpsPolicyFetcher(resolver, ca_file=ca_path(ca, tmp_path), port=policy_server.port))
    with caplog.at_level(logging.INFO, logger="mailflow"):
        result = await deliver(transport(resolver, peer.port, ca_path(ca, tmp_path), mta_sts=sts,
                                         program=RELAY_PROGRAM))
    assert result.outcome is Outcome.SENT
    lines = [(service_of(r), r.getMessage()) for r in caplog.records if "MTA-STS" in r.getMessage()]
    assert lines == [("relay/smtp", "MTA-STS: policy of dest.test (id 20240101) not usable: mta-sts.dest.test: "
                                    "content type 'text/html', not text/plain")]
    policy_server.close()


# ---------------------------------------------------------------------------------------------------- DANE


def dane_zone(port: int, tlsa: str) -> str:
    return ("dane.test. 300 IN MX 10 mx.dane.test.\nmx.dane.test. 300 IN A 127.0.0.1\n"
            + (f"_{port}._tcp.mx.dane.test. 300 IN TLSA {tlsa}\n" if tlsa else ""))


async def dane_peer(smtp_peer, ca):
    context, spki = server_tls(ca, "mx.dane.test")
    return await smtp_peer(tls_context=context), hashlib.sha256(spki).hexdigest()


@pytest.mark.parametrize("level", ["dane", "dane-only"])
async def test_a_matching_tlsa_record_delivers(zones, smtp_peer, ca, level):
    peer, digest = await dane_peer(smtp_peer, ca)  # a CA the client does not trust: DANE-EE does not ask
    resolver = zones(dane_zone(peer.port, f"3 1 1 {digest}"))
    result = await deliver(transport(resolver, peer.port, tls=level), "dane.test")
    assert result.outcome is Outcome.SENT, result.text
    assert peer.messages[0].tls


async def test_a_wrong_tlsa_record_defers(zones, smtp_peer, ca, caplog):
    """Postfix's status text and OpenSSL's error for it (X509_V_ERR_DANE_NO_MATCH), as tls_verify.c logs it."""
    peer, digest = await dane_peer(smtp_peer, ca)
    resolver = zones(dane_zone(peer.port, f"3 1 1 {'00' * 32}"))
    with caplog.at_level(logging.INFO, logger="mailflow.smtp"):
        result = await deliver(transport(resolver, peer.port, tls="dane"), "dane.test")
    assert (result.outcome, result.dsn, result.text) == (Outcome.DEFERRED, "4.7.5", "Server certificate not verified")
    assert (f"server certificate verification failed for mx.dane.test[127.0.0.1]:{peer.port}: "
            f"num=65:No matching DANE TLSA records") in caplog.messages
    assert not peer.messages


async def test_a_bracketed_next_hop_uses_the_hosts_tlsa_records(zones, smtp_peer, ca):
    peer, digest = await dane_peer(smtp_peer, ca)
    resolver = zones(dane_zone(peer.port, f"3 0 1 {'ab' * 32}"))
    result = await deliver(transport(resolver, peer.port, tls="dane"), f"[mx.dane.test]:{peer.port}")
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.7.5")


async def test_dane_only_without_tlsa_records_defers(zones, smtp_peer, ca):
    peer, _ = await dane_peer(smtp_peer, ca)
    resolver = zones(dane_zone(peer.port, ""))
    result = await deliver(transport(resolver, peer.port, tls="dane-only"), "dane.test")
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.7.5")
    assert "DANE is required" in result.text and not peer.messages


async def test_records_without_dnssec_are_not_used(zones, smtp_peer, ca):
    """An insecure zone (no AD bit): the wrong record is ignored, `dane` falls back to may and delivers."""
    peer, _ = await dane_peer(smtp_peer, ca)
    resolver = zones(dane_zone(peer.port, f"3 1 1 {'00' * 32}"), ad=False)
    result = await deliver(transport(resolver, peer.port, tls="dane"), "dane.test")
    assert result.outcome is Outcome.SENT


async def test_an_mx_dnssec_status_that_cannot_be_asked_defers_instead_of_leaving_dane(zones, smtp_peer, ca):
    """The MX records came (c-ares), but the question for their DNSSEC status (dnspython, the AD bit) failed: the
    destination is deferred as for a failed MX lookup, as Postfix, whose one MX lookup carries the status (RFC
    7672 2.1.1: a lookup error is no "insecure"). It counted as insecure: `dane` went on with opportunistic TLS,
    and a wrong TLSA record no longer kept the mail from a peer that does not match it."""
    peer, _ = await dane_peer(smtp_peer, ca)
    resolver = zones(dane_zone(peer.port, f"3 1 1 {'00' * 32}"))

    async def failing(name: str, qtype: str) -> bool:
        raise LookupRetry(f"Name service error for name={name} type={qtype}: timed out")

    resolver.validated = failing  # type: ignore[method-assign]
    result = await deliver(transport(resolver, peer.port, tls="dane"), "dane.test")
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.4.3"), result.text
    assert "type=MX" in result.text and not peer.messages, result.text


@pytest.mark.parametrize("tlsa", [
    "1 1 1 {digest}",  # PKIX-EE: unusable for SMTP
    "3 1 0 {digest}",  # a "full" public key that is no SubjectPublicKeyInfo
    "3 0 0 {digest}",  # a "full" certificate that is no certificate
])
async def test_unusable_records_still_require_tls(zones, smtp_peer, ca, tlsa):
    """Records SMTP cannot use: TLS is required, unverified (RFC 7672 2.2), as Postfix, whose OpenSSL drops a
    malformed record (full data that does not parse) as unusable. A malformed DANE-EE record was taken as usable,
    matched nothing and deferred the mail 4.7.5."""
    peer, digest = await dane_peer(smtp_peer, ca)
    resolver = zones(dane_zone(peer.port, tlsa.format(digest=digest)))
    result = await deliver(transport(resolver, peer.port, tls="dane"), "dane.test")
    assert result.outcome is Outcome.SENT and peer.messages[0].tls


# ---------------------------------------------------------------------------------------------------- shown


async def test_the_policy_a_destination_gets_is_described(zones, ca, tmp_path):
    resolver = zones(STS_ZONE, ad=False)
    policy_server = await PolicyServer(ca, "mta-sts.dest.test", sts_policy("enforce")).start()
    sts = MtaSts(resolver, HttpsPolicyFetcher(resolver, ca_file=ca_path(ca, tmp_path), port=policy_server.port))
    try:
        described = (await transport(resolver, 25, mta_sts=sts).tls_policy("dest.test")).policy.describe()
        bracketed = (await transport(resolver, 25, mta_sts=sts).tls_policy("[mx.dest.test]")).policy.describe()
    finally:
        policy_server.close()
    assert described == "verify match=hostname mx=mx.dest.test (MTA-STS enforce, policy id 20240101)"
    assert bracketed == "may (smtp.tls_security_level)"  # no MX lookup: no MTA-STS


def test_mailflow_address_shows_the_tls_policy_of_each_smtp_next_hop(tmp_path):
    from typer.testing import CliRunner

    from mailflow.cli import app as cli

    config = tmp_path / "m.toml"
    config.write_text('relay_domains = ["relay.test", "plain.test"]\n'
                      'transport_maps = ["inline:{relay.test=smtp:relay.test, plain.test=smtp:[192.0.2.1]}"]\n'
                      '[smtp]\ntls_security_level = "dane"\n'
                      'tls_policy_maps = ["inline:{[192.0.2.1]=encrypt}"]\n')
    result = CliRunner().invoke(cli, ["address", "-c", str(config), "a@relay.test", "b@plain.test"])
    assert result.exit_code == 0, result.output
    shown = [line.split(":", 1)[1].strip() for line in result.output.splitlines() if line.strip().startswith("tls:")]
    assert shown == ["dane (smtp.tls_security_level); per MX host: its TLSA records, else may (dane: no TLSA records)",
                     "encrypt (tls_policy_maps: [192.0.2.1])"], result.output


# a 3072-bit prime (openssl prime -generate), no well-known group's: loading a DH key of it tests it for a second
STRANGE_PRIME = int(
    "dabedce521df340ac588c98a9c6cc8cc051a024f8ff6f35145163caf0ffbdced8dc6cbcf9e581542ccead9bc1a450b41"
    "6df8b3040bf79c509db3da8efd9ebc731ab24bcde6e18804d066d55ba82897a476783ff80ac8f286979cf7231bf8c4d8"
    "ad4666a835ee9478a121bd6c9a760b3c9828434ea684dca92496d74d3cab8924e1fbed4bf55d9d5b0e122afc7b456839"
    "c715caf85e0fbf441808d9f8b8240aa425b5113295c3d9f5c01c7b9de859671753ef4521d404d3bca97636bfb98c322a"
    "b27ad5e45581ac1628c282c0cec722befc11e19ecc2971bded4b44df316101a7ef3d9f9c42b3ece230d1d91ca1a191b4"
    "7033a7552a37e82d47c5cb12c7618c079db24e708bb5c1b8974505f8fb1000c60b941dd5b2b8527213d4cd8f950c1775"
    "14c08ab4bee7c896e4e59c4ecca4801b42479f14f208988fcfda1abd5ed08a9449a56d054653d6784b4259e1fad70383"
    "11bda8c775b1342cba314f3593b342db049c121e12a2231af32318286a8985be7aafc324bb2cb8a1361d1f74b2e64a4b", 16)


def der(tag: int, contents: bytes) -> bytes:
    size = len(contents).to_bytes((len(contents).bit_length() + 7) // 8, "big")
    return bytes([tag]) + (size if len(contents) < 0x80 else bytes([0x80 | len(size)]) + size) + contents


def der_integer(value: int) -> bytes:
    return der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def dh_spki(prime: int) -> bytes:
    """An X9.42 Diffie-Hellman SubjectPublicKeyInfo (dhpublicnumber: p, g, q) over `prime`."""
    parameters = der(0x30, der_integer(prime) + der_integer(2) + der_integer(2 ** 255 + 1))
    algorithm = der(0x30, der(0x06, bytes.fromhex("2a8648ce3e0201")) + parameters)
    return der(0x30, algorithm + der(0x03, b"\0" + der_integer(3 ** 1900)))


async def test_a_diffie_hellman_tlsa_key_is_parsed_not_tested(zones, smtp_peer, ca):
    """A full-data DANE-EE record of a DH key is usable as OpenSSL's d2i_PUBKEY (Postfix's) counts it, parsed only:
    the peer's key does not match it, 4.7.5. cryptography's loader tested the stranger's prime, a second of the
    event loop per record (seconds for 4096 bits; an answer holds dozens), and then took the record for unusable."""
    peer, _ = await dane_peer(smtp_peer, ca)
    resolver = zones(dane_zone(peer.port, f"3 1 0 {dh_spki(STRANGE_PRIME).hex()}"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await deliver(transport(resolver, peer.port, tls="dane"), "dane.test")
    assert (result.outcome, result.dsn, result.text) == (Outcome.DEFERRED, "4.7.5", "Server certificate not verified")
    assert loop.time() - started < 0.5 and not peer.messages


def spki(oid: str, parameters: bytes, key: bytes) -> bytes:
    return der(0x30, der(0x30, der(0x06, bytes.fromhex(oid)) + parameters) + der(0x03, key))


DSA, DH_X942, DH_PKCS3, X25519, X448 = "2a8648ce380401", "2a8648ce3e0201", "2a864886f70d010301", "2b656e", "2b656f"
PQG = der(0x30, der_integer(2 ** 127 - 1) + der_integer(5) + der_integer(3))
KEY = b"\0" + der_integer(7)


@pytest.mark.parametrize(("data", "usable"), [
    pytest.param(spki(X25519, b"", b"\0" + b"\1" * 32), True, id="x25519"),
    pytest.param(spki(X448, b"", b"\0" + b"\1" * 56), True, id="x448"),
    pytest.param(spki(DSA, PQG, KEY), True, id="dsa"),
    pytest.param(spki(DH_X942, PQG, KEY), True, id="dh-x9.42"),
    pytest.param(spki(DH_PKCS3, der(0x30, der_integer(2 ** 127 - 1) + der_integer(5)), KEY), True, id="dh-pkcs3"),
    pytest.param(spki("2a0304", b"", b"\0" + b"\1" * 32), False, id="unknown-oid-1.2.3.4"),
    pytest.param(spki(DSA, der(0x05, b""), KEY), False, id="dsa-null-parameters"),
    pytest.param(spki(DSA, der(0x30, der_integer(2 ** 127 - 1) + der_integer(5)), KEY), False, id="dsa-two-integers"),
    pytest.param(spki(DH_X942, b"", KEY), False, id="dh-without-parameters"),
    pytest.param(spki(DH_PKCS3, PQG + der(0x05, b""), KEY), False, id="junk-in-the-algorithm-sequence"),
    pytest.param(spki(DH_PKCS3, PQG, b"\0" + der(0x04, b"\7")), False, id="dh-key-not-an-integer"),
    pytest.param(spki(X25519, b"", b"\0abc"), False, id="x25519-3-byte-key"),
    pytest.param(spki(X25519, b"", b""), False, id="x25519-empty-bit-string"),
    pytest.param(spki(DSA, PQG, b""), False, id="dsa-empty-bit-string"),
    pytest.param(bytes.fromhex("3007" "3002" "0603" "030100"), False, id="oid-runs-into-the-bit-string"),
])
def test_a_full_data_spki_record_is_usable_as_openssl_counts_it(data, usable):
    """What OpenSSL 3.0's d2i_PUBKEY (Postfix's) takes, measured with the review's probe (p_der.py). The DER walk
    took any OID, DSA with NULL parameters, DH without any, a 3-byte X25519 key, junk in the algorithm SEQUENCE
    and an empty BIT STRING: records OpenSSL refuses were counted usable, so a peer needed to match them."""
    assert (dane.usable((Tlsa(3, 1, 0, data),)) != ()) is usable


CHILD_CHECKS_RECORDS = """
import sys
from mailflow.dns import Tlsa
from mailflow.transports.smtp import dane
negative, dsa = (bytes.fromhex(line) for line in sys.stdin.read().split())
print(dane.usable((Tlsa(3, 0, 0, negative), Tlsa(3, 1, 0, dsa))) == (Tlsa(3, 0, 0, negative), Tlsa(3, 1, 0, dsa)),
      dane.matches(negative, (Tlsa(3, 0, 0, negative),)))
"""


def negative_serial_certificate(ca) -> bytes:
    certificate = ca.issue_cert("mx.dane.test").cert_chain_pems[0].bytes()
    original = x509.load_pem_x509_certificate(certificate).public_bytes(serialization.Encoding.DER)
    serial = x509.load_der_x509_certificate(original).serial_number.to_bytes(20, "big").lstrip(b"\0")
    field = der_integer(int.from_bytes(serial, "big"))
    assert len(field) == len(serial) + 2 and original.count(field) == 1  # (a positive serial without a leading 0)
    return original.replace(field, bytes([0x02, len(serial)]) + bytes([serial[0] | 0x80]) + serial[1:])


async def test_a_strangers_negative_serial_number_or_dsa_key_warns_nothing(ca):
    """A peer's certificate with a negative serial number (RFC 5280 forbids it, some are about) and a DSA key in a
    TLSA record are a stranger's data, not this program's use of a deprecated feature: cryptography warned of
    each, once per delivery, into the log. The certificate still counts; the DSA key is parsed, as OpenSSL does.
    (In a process of its own, with Python's default warning filters: pytest sets aside the filter dane adds when
    it is imported.)"""
    dsa = der(0x30, der(0x30, der(0x06, bytes.fromhex("2a8648ce380401")) + der(0x30, der_integer(STRANGE_PRIME)
                                                                                + der_integer(2 ** 255 + 1)
                                                                                + der_integer(3 ** 1900)))
              + der(0x03, b"\0" + der_integer(5 ** 1300)))
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD_CHECKS_RECORDS,
                                                 stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(child.communicate(f"{negative_serial_certificate(ca).hex()} {dsa.hex()}"
                                                        .encode()), 30)
    assert (out, err) == (b"True True\n", b"")


def test_loading_a_certificate_leaves_the_warnings_already_shown_alone(ca):
    """dane filtered cryptography's warning with a catch_warnings() per certificate, whose end resets what every
    module has recorded of the warnings it showed: a warning shown once (the default) came again after each
    delivery over DANE."""
    certificate = negative_serial_certificate(ca)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        for _ in range(3):
            warnings.warn("shown once", UserWarning)
            dane.matches(certificate, (Tlsa(3, 0, 0, certificate),))
    assert [str(warning.message) for warning in shown if warning.category is UserWarning] == ["shown once"]


def _self_signed_der(key) -> bytes:
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "mx.dest.test")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(7).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=900))
                   .sign(key, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.DER)


def test_a_peer_certificate_is_matched_on_its_own_bytes_even_with_a_key_cryptography_cannot_load():
    """A 3 1 x record matches the SubjectPublicKeyInfo as the peer's certificate carries it (OpenSSL hashes those
    bytes). The key was loaded and re-encoded: a peer whose key algorithm cryptography does not know made the match
    raise UnsupportedAlgorithm out of the delivery, where OpenSSL (Postfix) matches the record."""
    der = _self_signed_der(ec.generate_private_key(ec.SECP256R1()))
    spki = x509.load_der_x509_certificate(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert dane.matches(der, (Tlsa(3, 1, 1, hashlib.sha256(spki).digest()),))
    assert dane.matches(der, (Tlsa(3, 0, 1, hashlib.sha256(der).digest()),))
    assert not dane.matches(der, (Tlsa(3, 1, 1, hashlib.sha256(spki + b"x").digest()),))
    odd = der.replace(bytes.fromhex("2a8648ce3d0201"), bytes.fromhex("2a8648ce3d027f"), 1)  # an unknown algorithm
    odd_spki = spki.replace(bytes.fromhex("2a8648ce3d0201"), bytes.fromhex("2a8648ce3d027f"), 1)
    assert odd != der and odd_spki != spki
    assert dane.matches(odd, (Tlsa(3, 1, 1, hashlib.sha256(odd_spki).digest()),))
    assert not dane.matches(odd, (Tlsa(3, 1, 1, hashlib.sha256(spki).digest()),))

"""TLS client certificates in smtpd (docs/security.md, "Client certificates"): tls_ask_ccert asks for one,
tls_ca_file verifies it, and permit_tls_clientcerts (relay_clientcerts: certificate or public-key fingerprints),
permit_tls_all_clientcerts and check_ccert_access decide by it; the TLS line of the log says `Trusted`, policy
requests carry the ccert_* attributes. Real sockets on 127.0.0.1, trustme certificates, swaks and aiosmtplib as
the clients. Postfix's own replies and lines for the same set-up: tests/interop/test_client_certs_vs_postfix.py.
"""
from __future__ import annotations

import logging
import ssl

import aiosmtplib
import pytest
import trustme
from cryptography import x509
from cryptography.x509.oid import NameOID

from mailflow.config import config_from_dict
from mailflow.dsn_parameters import xtext_decode, xtext_encode
from mailflow.errors import ConfigError
from mailflow.stages.smtpd.tls import _issuer_name, _subject_name
from tests.support import (LOOPBACK_CLIENT, SmtpClient, base_settings, eventually, maildir_messages, merged,
                           require_tool, run_tool)
from tests.support.client_certs import COMPRESSED_EC, ClientPki, colon_hex
from tests.support.milters import scripted_milter
from tests.support.policy import RecordingPolicy

ELSEWHERE = "x@elsewhere.test"  # a recipient that only a permit lets relay


@pytest.fixture
def pki(tmp_path):
    folder = tmp_path / "pki"
    folder.mkdir()
    return ClientPki(folder)


def ccert_settings(pki: ClientPki, tmp_path, **smtpd) -> dict:
    return {"tls_cert_file": pki.server_cert, "tls_ask_ccert": True, "tls_ca_file": pki.ca_file,
            "tls_loglevel": 1, **smtpd}


def table(tmp_path, name: str, lines: list[str]) -> str:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return f"texthash:{path}"


async def rcpt_over_tls(port: int, ctx: ssl.SSLContext, *recipients: str) -> list[str]:
    """EHLO, STARTTLS with `ctx`, EHLO, MAIL, then each RCPT: the RCPT replies' text."""
    client = await SmtpClient.connect(port)
    try:
        assert (await client.cmd("EHLO client.test")).code == 250
        await client.starttls(ctx)
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
        return [(await client.cmd(f"RCPT TO:<{rcpt}>")).text for rcpt in recipients]
    finally:
        await client.close()


def anonymous_context(pki: ClientPki) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    pki.ca.configure_trust(ctx)
    return ctx


async def test_permit_tls_clientcerts_relays_for_a_listed_certificate_or_public_key(mailflow_server, pki, tmp_path,
                                                                                      caplog):
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    by_cert, by_key, unlisted = pki.client("a.test"), pki.client("b.test"), pki.client("c.test")
    relay = table(tmp_path, "relay_clientcerts", [f"{by_cert.fingerprint} a.test", f"{by_key.pkey_fingerprint} b"])
    mf = await mailflow_server(smtpd=ccert_settings(pki, tmp_path, relay_clientcerts=[relay], relay_restrictions=[
        "permit_tls_clientcerts", "reject_unauth_destination"]))
    port = mf.smtp_addresses[0][1]
    denied = f"554 5.7.1 <{ELSEWHERE}>: Relay access denied"
    assert await rcpt_over_tls(port, by_cert.context(pki), ELSEWHERE) == ["250 2.1.5 Ok"]
    assert await rcpt_over_tls(port, by_key.context(pki), ELSEWHERE) == ["250 2.1.5 Ok"]
    assert await rcpt_over_tls(port, unlisted.context(pki), ELSEWHERE) == [denied]
    assert await rcpt_over_tls(port, anonymous_context(pki), ELSEWHERE) == [denied]
    summaries = [r.getMessage().split(": TLSv")[0] for r in caplog.records if "TLS connection established" in
                 r.getMessage()]
    assert summaries == [f"Trusted TLS connection established from {LOOPBACK_CLIENT}"] * 3 + [
        f"Anonymous TLS connection established from {LOOPBACK_CLIENT}"]


async def test_permit_tls_all_clientcerts_relays_for_any_verified_certificate(mailflow_server, pki, tmp_path):
    mf = await mailflow_server(smtpd=ccert_settings(pki, tmp_path, relay_restrictions=[
        "permit_tls_all_clientcerts", "reject_unauth_destination"]))
    port = mf.smtp_addresses[0][1]
    assert await rcpt_over_tls(port, pki.client("any.test").context(pki), ELSEWHERE) == ["250 2.1.5 Ok"]
    assert await rcpt_over_tls(port, anonymous_context(pki), ELSEWHERE) == [
        f"554 5.7.1 <{ELSEWHERE}>: Relay access denied"]


async def test_check_ccert_access_asks_the_certificate_then_its_public_key(mailflow_server, pki, tmp_path):
    refused, pinned_key, neither = pki.client("refused.test"), pki.client("key.test"), pki.client("n.test")
    access = table(tmp_path, "ccert_access", [
        f"{refused.fingerprint} REJECT not you", f"{pinned_key.fingerprint} DUNNO",
        f"{pinned_key.pkey_fingerprint} 550 5.7.1 pinned key refused"])
    mf = await mailflow_server(smtpd=ccert_settings(pki, tmp_path, recipient_restrictions=[
        f"check_ccert_access {access}"]))
    port = mf.smtp_addresses[0][1]
    assert await rcpt_over_tls(port, refused.context(pki), "alice@local.test") == [
        "554 5.7.1 <refused.test>: Client certificate rejected: not you"]
    assert await rcpt_over_tls(port, pinned_key.context(pki), "alice@local.test") == [
        "550 5.7.1 <key.test>: Client certificate rejected: pinned key refused"]
    assert await rcpt_over_tls(port, neither.context(pki), "alice@local.test") == ["250 2.1.5 Ok"]
    assert await rcpt_over_tls(port, anonymous_context(pki), "alice@local.test") == ["250 2.1.5 Ok"]


async def test_policy_requests_carry_the_certificate(mailflow_server, pki, tmp_path):
    card = pki.client("policy.test")
    async with RecordingPolicy() as policy:
        mf = await mailflow_server(smtpd=ccert_settings(pki, tmp_path, recipient_restrictions=[
            f"check_policy_service {policy.spec}"]))
        port = mf.smtp_addresses[0][1]
        await rcpt_over_tls(port, card.context(pki), "alice@local.test")
        await rcpt_over_tls(port, anonymous_context(pki), "alice@local.test")
    with_cert, without = ({k: v for k, v in r.items() if k.startswith("ccert_")} for r in policy.requests)
    assert with_cert == {"ccert_subject": "policy.test", "ccert_issuer": "trustme+20v" + trustme.__version__,
                         "ccert_fingerprint": card.fingerprint, "ccert_pubkey_fingerprint": card.pkey_fingerprint}
    assert without == dict.fromkeys(with_cert, "")


async def test_aiosmtplib_relays_with_its_client_certificate(mailflow_server, pki, tmp_path):
    card = pki.client("app.test")
    mf = await mailflow_server(smtpd=ccert_settings(pki, tmp_path, relay_restrictions=[
        "permit_tls_clientcerts", "reject_unauth_destination"],
        relay_clientcerts=[table(tmp_path, "relay", [f"{card.fingerprint} app"])]))
    port = mf.smtp_addresses[0][1]
    message = "From: app@remote.test\r\nTo: x@elsewhere.test\r\nSubject: relayed\r\n\r\nhi\r\n"
    async with aiosmtplib.SMTP(hostname="localhost", port=port, start_tls=True,
                               tls_context=card.context(pki)) as client:
        errors, reply = await client.sendmail("app@remote.test", [ELSEWHERE], message)
    assert errors == {} and reply.startswith("2.0.0 Ok: queued as")
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        async with aiosmtplib.SMTP(hostname="localhost", port=port, start_tls=True,
                                   tls_context=anonymous_context(pki)) as client:
            await client.sendmail("app@remote.test", [ELSEWHERE], message)


async def test_swaks_relays_with_tls_cert_and_key(mailflow_server, pki, tmp_path):
    card = pki.client("swaks.test")
    mf = await mailflow_server(smtpd=ccert_settings(pki, tmp_path, relay_restrictions=[
        "permit_tls_clientcerts", "reject_unauth_destination"],
        relay_clientcerts=[table(tmp_path, "relay", [f"{card.pkey_fingerprint} swaks"])]))
    port = str(mf.smtp_addresses[0][1])
    swaks = [require_tool("swaks"), "--server", "127.0.0.1", "--port", port, "--ehlo", "client.test", "--from",
             "app@remote.test", "--to", ELSEWHERE, "--tls", "--tls-ca-path", pki.ca_file, "--tls-sni", "localhost",
             "--timeout", "10"]
    code, out = await run_tool(*swaks, "--tls-cert", card.cert_file, "--tls-key", card.key_file)
    assert code == 0 and "250 2.0.0 Ok: queued as" in out, out
    code, out = await run_tool(*swaks)
    assert code != 0 and f"554 5.7.1 <{ELSEWHERE}>: Relay access denied" in out, out


async def test_a_certificate_the_ca_file_does_not_vouch_for_fails_the_handshake_unless_listed_there(
        mailflow_server, pki, tmp_path, caplog):
    """The documented difference from Postfix (which goes on, untrusted): Python's ssl ends the handshake. Listing
    the certificate itself in tls_ca_file (a self-signed one, or one from another CA) pins it."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    stranger, self_signed = pki.client("stranger.test", issuer=trustme.CA()), pki.client("self.test", issuer=None)
    relay = table(tmp_path, "relay", [f"{self_signed.fingerprint} self", f"{stranger.fingerprint} stranger"])
    settings = {"relay_restrictions": ["permit_tls_clientcerts", "reject_unauth_destination"],
                "relay_clientcerts": [relay]}
    mf = await mailflow_server(smtpd=ccert_settings(pki, tmp_path, **settings))
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await client.cmd("EHLO client.test")).code == 250
    try:
        await client.starttls(stranger.context(pki))
        ended = (await client.cmd("EHLO client.test")).code is None  # (TLS 1.3: the alert follows the Finished)
    except (ssl.SSLError, ConnectionError):
        ended = True
    await client.close()
    assert ended
    await eventually(lambda: any(r.getMessage().startswith(f"SSL_accept error from {LOOPBACK_CLIENT}")
                                 for r in caplog.records))

    listed = tmp_path / "pinned.pem"  # the CA and the two certificates themselves
    listed.write_text("".join(open(f).read() for f in (pki.ca_file, stranger.cert_file, self_signed.cert_file)))
    pinned = await mailflow_server(queue_directory=str(tmp_path / "pinned-queue"),
                                   smtpd=ccert_settings(pki, tmp_path, tls_ca_file=str(listed), **settings))
    for card in (stranger, self_signed):
        assert await rcpt_over_tls(pinned.smtp_addresses[0][1], card.context(pki), ELSEWHERE) == ["250 2.1.5 Ok"]


def test_configuration_errors_name_the_key_and_the_reason(tmp_path, pki):
    def error(**smtpd) -> ConfigError:
        with pytest.raises(ConfigError) as info:
            config_from_dict(merged(base_settings(tmp_path), {"smtpd": smtpd}), "m.toml")
        return info.value

    bad_digest = error(tls_fingerprint_digest="sha3-257")
    assert (bad_digest.file, bad_digest.key) == ("m.toml", "smtpd.tls_fingerprint_digest")
    assert "'sha3-257' is not a digest name (md5, sha1, sha224, sha256, sha384, sha512)" in bad_digest.reason
    without_ca = error(tls_cert_file=pki.server_cert, tls_ask_ccert=True)
    assert "tls_ask_ccert needs tls_ca_file" in str(without_ca)
    assert "permit_tls_clientcerts" in str(config_from_dict(merged(base_settings(tmp_path), {"smtpd": {
        "relay_restrictions": ["permit_tls_clientcerts", "reject_unauth_destination"]}})).smtpd.relay_restrictions)


async def test_a_ca_file_that_does_not_exist_stops_the_start(mailflow_server, pki, tmp_path):
    with pytest.raises(ConfigError) as info:
        await mailflow_server(smtpd=ccert_settings(pki, tmp_path, tls_ca_file=str(tmp_path / "missing.pem")))
    assert (info.value.key, info.value.reason) == ("smtpd.tls_ca_file", f"{tmp_path}/missing.pem: no such CA file")


async def test_the_fingerprint_digest_is_the_configured_one(mailflow_server, pki, tmp_path):
    card = pki.client("sha1.test")
    mf = await mailflow_server(smtpd=ccert_settings(pki, tmp_path, tls_fingerprint_digest="SHA1", relay_restrictions=[
        "permit_tls_clientcerts", "reject_unauth_destination"],
        relay_clientcerts=[table(tmp_path, "relay", [f"{colon_hex(card.der, 'sha1')} sha1"])]))
    assert await rcpt_over_tls(mf.smtp_addresses[0][1], card.context(pki), ELSEWHERE) == ["250 2.1.5 Ok"]


async def test_a_certificate_restriction_without_tls_ask_ccert_has_no_opinion_and_says_why(mailflow_server, pki,
                                                                                         tmp_path, caplog):
    """As Postfix's `warning: permit_tls_clientcerts is requested, but "smtpd_tls_ask_ccert = no"`, naming
    mailflow's setting; only in a TLS session (without TLS there is nothing to ask)."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    mf = await mailflow_server(smtpd={"tls_cert_file": pki.server_cert, "relay_restrictions": [
        "permit_tls_clientcerts", "reject_unauth_destination"]})
    port = mf.smtp_addresses[0][1]
    assert await rcpt_over_tls(port, pki.client("unasked.test").context(pki), ELSEWHERE) == [
        f"554 5.7.1 <{ELSEWHERE}>: Relay access denied"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ['permit_tls_clientcerts is requested, but "tls_ask_ccert = false"']


def test_policy_names_are_xtext_as_postfix_quotes_them():
    """global/xtext.c's xtext_quote(buf, CN, ""): `+` and bytes outside 33..126 only (`=` kept); compared with
    Postfix's policy requests in tests/interop/test_client_certs_vs_postfix.py."""
    assert xtext_encode("Acme CA+1=2 é") == "Acme+20CA+2B1=2+20+C3+A9"
    assert xtext_decode(xtext_encode("Acme CA+1=2 é")) == "Acme CA+1=2 é"


async def test_milters_get_the_certificate_names_at_helo(mailflow_server, pki, tmp_path):
    """Postfix's milter_helo_macros default: {tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}; the
    names of a trusted certificate only (smtpd_milter.c), so none for a pinned one."""
    pinned = pki.client("pinned.test", issuer=trustme.CA())
    listed = tmp_path / "listed.pem"
    listed.write_bytes(open(pki.ca_file, "rb").read() + open(pinned.cert_file, "rb").read())
    async with scripted_milter({}) as milter:
        mf = await mailflow_server(smtpd=ccert_settings(pki, tmp_path, tls_ca_file=str(listed), milters=[milter.spec]))
        await rcpt_over_tls(mf.smtp_addresses[0][1], pki.client("milter.test").context(pki), "alice@local.test")
        await rcpt_over_tls(mf.smtp_addresses[0][1], anonymous_context(pki), "alice@local.test")
        await rcpt_over_tls(mf.smtp_addresses[0][1], pinned.context(pki), "alice@local.test")
        after_tls = [macros for macros in milter.macros(b"H") if "{cipher}" in macros]
    assert [(m.get("{cert_subject}"), m.get("{cert_issuer}")) for m in after_tls] == [
        ("milter.test", "trustme v" + trustme.__version__), (None, None), (None, None)]


async def test_a_reload_reads_the_ca_file_again_and_refuses_one_that_is_gone(mailflow_server, pki, tmp_path):
    card = pki.client("late.test")
    mf = await mailflow_server(smtpd=ccert_settings(pki, tmp_path, relay_restrictions=[
        "permit_tls_all_clientcerts", "reject_unauth_destination"]))
    port = mf.smtp_addresses[0][1]
    assert await rcpt_over_tls(port, card.context(pki), ELSEWHERE) == ["250 2.1.5 Ok"]
    other_ca = trustme.CA()  # the clients' CA changes: new sessions are verified against the new file
    newcomer = pki.client("newcomer.test", issuer=other_ca)
    other_ca.cert_pem.write_to_path(pki.ca_file)
    await mf.reload(mf.config)
    assert await rcpt_over_tls(port, newcomer.context(pki), ELSEWHERE) == ["250 2.1.5 Ok"]
    assert await handshake_ends(port, card.context(pki))  # the old CA's client: the new file does not vouch
    gone = mf.config.model_copy(update={"smtpd": mf.config.smtpd.model_copy(
        update={"tls_ca_file": str(tmp_path / "gone.pem")})})
    with pytest.raises(ConfigError) as info:
        await mf.reload(gone)
    assert (info.value.key, info.value.reason) == ("smtpd.tls_ca_file", f"{tmp_path}/gone.pem: no such CA file")
    assert await rcpt_over_tls(port, newcomer.context(pki), ELSEWHERE) == ["250 2.1.5 Ok"]  # the one in force


def tls_summaries(caplog) -> list[str]:
    return [r.getMessage().split(": TLSv")[0] for r in caplog.records if "TLS connection established" in
            r.getMessage()]


async def test_trust_is_a_chain_to_a_self_signed_certificate_of_the_ca_file(mailflow_server, pki, tmp_path, caplog):
    """As Postfix's OpenSSL verifies (no partial chains): a client of an intermediate CA that sends its chain is
    trusted with the root in the CA file; with only the intermediate there it is `Untrusted` and
    permit_tls_all_clientcerts refuses it, though its fingerprint still counts (a pinned certificate likewise)."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    intermediate = pki.ca.create_child_ca()
    chained = pki.client("chained.test", issuer=intermediate)
    (tmp_path / "chain.pem").write_bytes(open(chained.cert_file, "rb").read() + intermediate.cert_pem.bytes())
    sends_chain = anonymous_context(pki)
    sends_chain.load_cert_chain(str(tmp_path / "chain.pem"), chained.key_file)
    pinned = pki.client("pinned.test", issuer=trustme.CA())
    access = table(tmp_path, "ccert", [f"{pinned.fingerprint} REJECT pinned but refused"])
    settings = {"relay_restrictions": ["permit_tls_all_clientcerts", "reject_unauth_destination"],
                "recipient_restrictions": [f"check_ccert_access {access}"]}
    rooted = await mailflow_server(smtpd=ccert_settings(pki, tmp_path, **settings))
    assert await rcpt_over_tls(rooted.smtp_addresses[0][1], sends_chain, ELSEWHERE) == ["250 2.1.5 Ok"]
    listed = tmp_path / "intermediate-and-pinned.pem"
    listed.write_bytes(intermediate.cert_pem.bytes() + open(pinned.cert_file, "rb").read())
    no_root = await mailflow_server(queue_directory=str(tmp_path / "q2"), smtpd=ccert_settings(
        pki, tmp_path, tls_ca_file=str(listed), **settings))
    denied = f"554 5.7.1 <{ELSEWHERE}>: Relay access denied"
    assert await rcpt_over_tls(no_root.smtp_addresses[0][1], sends_chain, ELSEWHERE) == [denied]
    assert await rcpt_over_tls(no_root.smtp_addresses[0][1], pinned.context(pki), "alice@local.test") == [
        "554 5.7.1 <pinned.test>: Client certificate rejected: pinned but refused"]
    assert tls_summaries(caplog) == [f"{trust} TLS connection established from {LOOPBACK_CLIENT}"
                                     for trust in ("Trusted", "Untrusted", "Untrusted")]


async def test_the_public_key_fingerprint_is_of_the_certificates_own_key_encoding(mailflow_server, pki, tmp_path):
    """Postfix hashes the certificate's SubjectPublicKeyInfo as it is written (a compressed EC point stays so), as
    docs/security.md's openssl commands do (the oracle: tests/support/client_certs.py); a re-encoded key would
    miss the listed fingerprint, and a check_ccert_access refusal by it would fail open."""
    compressed = pki.openssl_client("compressed.test", COMPRESSED_EC)
    access = table(tmp_path, "ccert", [f"{compressed.pkey_fingerprint} REJECT key refused"])
    mf = await mailflow_server(smtpd=ccert_settings(pki, tmp_path, recipient_restrictions=[
        f"check_ccert_access {access}"]))
    assert await rcpt_over_tls(mf.smtp_addresses[0][1], compressed.context(pki), "alice@local.test") == [
        "554 5.7.1 <compressed.test>: Client certificate rejected: key refused"]


@pytest.mark.filterwarnings("ignore:Attribute's length must be")  # (longer than X.509's upper bound, on purpose)
def test_a_certificate_name_of_256_bytes_or_more_is_dropped_as_postfix_drops_it(caplog):
    """tls_verify.c's tls_text_name: `peer subject CN too long: 300` (CCERT_BUFSIZ 256); the issuer's organisation
    stands in for an issuer CN dropped so."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    long_cn = x509.NameAttribute(NameOID.COMMON_NAME, "a" * 300, _validate=False)
    assert _subject_name(x509.Name([long_cn]), "h[192.0.2.1]") == ""
    assert _issuer_name(x509.Name([long_cn, x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Org")]), "h[192.0.2.1]") \
        == "Org"
    assert _subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "b" * 255, _validate=False)]), "") \
        == "b" * 255
    assert [r.getMessage() for r in caplog.records] == [
        "tls_text_name: h[192.0.2.1]: peer subject CN too long: 300",
        "tls_text_name: h[192.0.2.1]: peer issuer CN too long: 300"]


async def handshake_ends(port: int, ctx: ssl.SSLContext) -> bool:
    """Whether the server ends the STARTTLS handshake of a client with `ctx` (TLS 1.3: the alert follows the
    client's Finished, so it shows at the next command)."""
    client = await SmtpClient.connect(port)
    assert (await client.cmd("EHLO client.test")).code == 250
    try:
        await client.starttls(ctx)
        ended = (await client.cmd("EHLO client.test")).code is None
    except (ssl.SSLError, ConnectionError):
        ended = True
    await client.close()
    return ended


async def test_a_submissions_listener_asks_for_the_certificate_in_its_implicit_tls(mailflow_server, pki, tmp_path,
                                                                                   users, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    card = pki.client("roaming.test")
    mf = await mailflow_server(smtpd=ccert_settings(pki, tmp_path, relay_restrictions=[
        "permit_tls_clientcerts", "reject_unauth_destination"],
        relay_clientcerts=[table(tmp_path, "relay", [f"{card.fingerprint} roaming"])],
        sasl_user_maps=[users], listeners=[{"address": "127.0.0.1:0", "role": "submissions",
                                            "overrides": {"sasl_auth_required": False}}]))  # (by certificate)
    port = mf.smtpd.address_of("submissions")[1]

    async def relay_over_implicit_tls(ctx: ssl.SSLContext) -> str:
        client = await SmtpClient.connect(port, tls=ctx)
        try:
            assert (await client.cmd("EHLO client.test")).code == 250
            assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
            return (await client.cmd(f"RCPT TO:<{ELSEWHERE}>")).text
        finally:
            await client.close()

    assert await relay_over_implicit_tls(card.context(pki)) == "250 2.1.5 Ok"
    assert await relay_over_implicit_tls(anonymous_context(pki)) == f"554 5.7.1 <{ELSEWHERE}>: Relay access denied"
    assert [m for m in tls_summaries(caplog)] == [f"{trust} TLS connection established from {LOOPBACK_CLIENT}"
                                                  for trust in ("Trusted", "Anonymous")]


async def test_local_header_rewrite_clients_takes_the_certificate_rules(mailflow_server, pki, tmp_path):
    """Postfix 3.7's smtpd_check_rewrite asks permit_tls_clientcerts and permit_tls_all_clientcerts too: a listed
    certificate's mail gets the Message-ID, Date and From it lacks; another's is passed on as it came."""
    listed, unlisted = pki.client("listed.test"), pki.client("unlisted.test")
    mf = await mailflow_server(local_header_rewrite_clients=["permit_tls_clientcerts"], smtpd=ccert_settings(
        pki, tmp_path, relay_clientcerts=[table(tmp_path, "relay", [f"{listed.fingerprint} listed"])]))
    for card in (listed, unlisted):
        client = await SmtpClient.connect(mf.smtp_addresses[0][1])
        assert (await client.cmd("EHLO client.test")).code == 250
        await client.starttls(card.context(pki))
        assert (await client.send_message(f"Subject: {card.name}\r\n\r\nbody\r\n".encode())).code == 250
        await client.close()
    mail = await eventually(lambda: len(found := maildir_messages(tmp_path / "mail" / "alice" / "Maildir")) == 2
                            and found)
    heads = {next(line for line in m.split(b"\n") if line.startswith(b"Subject: ")): m.split(b"\n\n")[0]
             for m in mail}
    assert b"\nMessage-ID: <" in heads[b"Subject: listed.test"]
    assert b"\nMessage-ID: <" not in heads[b"Subject: unlisted.test"]


async def test_a_relay_clientcerts_that_cannot_answer_names_what_the_list_is_about(mailflow_server, pki, tmp_path,
                                                                                  caplog):
    """Postfix 3.7's permit_tls_clientcerts returns the table's error and generic_checks calls reject_dict_retry
    with the list's reply name: the client host in the client list (not the recipient), logged as Postfix's."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    card = pki.client("a.test")
    mf = await mailflow_server(smtpd=ccert_settings(pki, tmp_path, relay_clientcerts=["fail:down"],
                                                    client_restrictions=["permit_tls_clientcerts"]))
    assert await rcpt_over_tls(mf.smtp_addresses[0][1], card.context(pki), ELSEWHERE) == [
        f"451 4.3.0 <{LOOPBACK_CLIENT}>: Temporary lookup failure"]
    assert f"relay_clientcerts: lookup error for fingerprint '{card.fingerprint}', pkey fingerprint " \
           f"{card.pkey_fingerprint}" in [r.getMessage() for r in caplog.records]

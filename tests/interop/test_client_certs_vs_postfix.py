"""Differential test of TLS client certificates: a private Postfix and mailflow set up alike (smtpd_tls_ask_ccert,
smtpd_tls_CAfile, relay_clientcerts, permit_tls_clientcerts, permit_tls_all_clientcerts in a restriction class,
check_ccert_access, a policy service), the same sessions with the same client certificates (and one with none);
compared: every RCPT reply, every smtpd log line of each session (tls_loglevel 1; the TLS summary cut after its
bits, as tests/interop/test_smtpd_tls_log_vs_postfix.py says why), and the ccert_* attributes of the policy
requests. Also so compared: a CA file with an intermediate CA and no root (nothing trusted), CommonNames with
controls or a NUL (no name) or `=` and `+` (xtext), a serverAuth-only certificate pinned in the TRUSTED CERTIFICATE
form, and chains of 9 to 11 intermediate CAs (the verify depth); a compressed-EC key's fingerprint.

Not compared, because mailflow differs on purpose (docs/security.md, "Client certificates"): a certificate that
smtpd_tls_CAfile does not vouch for (Postfix goes on, `Untrusted`, and matches its fingerprint; Python's ssl ends
the handshake: tests/component/test_client_certificates.py).
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import ssl
import tempfile
from pathlib import Path

import pytest
import trustme

from tests.support import SmtpClient, postfix_instance, sessions_over
from tests.support.client_certs import COMPRESSED_EC, ClientCard, ClientPki
from tests.support.policy import RecordingPolicy

pytestmark = pytest.mark.interop

RECIPIENTS = ("x@elsewhere.test", "anycert@elsewhere.test", "alice@local.test")
CARDS = ("listed.test", "key-listed.test", "unlisted.test", "refused.test", "pinned-key.test")
SUMMARY_TAIL = re.compile(r"(bits\)).*")
QUEUE_FILE_OPENED = re.compile(r"[0-9A-F]+: client=")


@pytest.fixture(scope="module")
def pki():
    folder = Path(tempfile.mkdtemp(prefix="mailflow-ccert-", dir="/tmp"))  # (the postfix user reads it)
    pki = ClientPki(folder)
    cards = {name: pki.client(name) for name in CARDS}
    cards["compressed-key.test"] = pki.openssl_client("compressed-key.test", COMPRESSED_EC)  # (its key's own DER)
    stranger = pki.client("stranger.test", issuer=trustme.CA())  # (only in test_the_documented_difference)
    relay = folder / "relay"
    relay.write_text(f"{cards['listed.test'].fingerprint} listed\n{cards['key-listed.test'].pkey_fingerprint} key\n"
                     f"{cards['compressed-key.test'].pkey_fingerprint} compressed\n"
                     f"{stranger.fingerprint} stranger\n")
    access = folder / "ccert"
    access.write_text(f"{cards['refused.test'].fingerprint} REJECT not you\n"
                      f"{cards['pinned-key.test'].fingerprint} DUNNO\n"
                      f"{cards['pinned-key.test'].pkey_fingerprint} 550 5.7.1 pinned key refused\n")
    (folder / "rcpt").write_text("anycert@elsewhere.test allcerts\n")
    yield pki, cards, stranger
    shutil.rmtree(folder, ignore_errors=True)


def restrictions(folder: Path, policy: str) -> dict[str, list[str]]:
    return {"relay": ["permit_tls_clientcerts", f"check_recipient_access texthash:{folder}/rcpt",
                      "reject_unauth_destination"],
            "recipient": [f"check_policy_service {policy}", f"check_ccert_access texthash:{folder}/ccert"]}


async def session(port: int, ctx: ssl.SSLContext) -> list[str]:
    client = await SmtpClient.connect(port)
    try:
        assert (await client.cmd("EHLO client.test")).code == 250
        await client.starttls(ctx)
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
        replies = [(await client.cmd(f"RCPT TO:<{rcpt}>")).text for rcpt in RECIPIENTS]
        assert (await client.cmd("QUIT")).code == 221
        return replies
    finally:
        await client.close()


def contexts(pki: ClientPki, cards: dict[str, ClientCard]) -> dict[str, ssl.SSLContext]:
    anonymous = ssl.create_default_context()
    pki.ca.configure_trust(anonymous)
    return {**{name: card.context(pki) for name, card in cards.items()}, "no certificate": anonymous}


def ccert_attributes(request: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in request.items() if k.startswith("ccert_")}


def postfix_settings(pki: ClientPki, policy: str) -> dict[str, str]:
    lists = restrictions(pki.folder, policy)
    return {
        "myhostname": "pf.test", "mydestination": "local.test", "mynetworks": "192.0.2.0/24",
        "local_recipient_maps": "inline:{alice=ok}", "relayhost": "[127.0.0.1]:9",
        "smtpd_tls_cert_file": pki.server_cert, "smtpd_tls_key_file": pki.server_cert,
        "smtpd_tls_security_level": "may", "smtpd_tls_ask_ccert": "yes", "smtpd_tls_CAfile": pki.ca_file,
        "smtpd_tls_loglevel": "1", "smtpd_tls_fingerprint_digest": "sha256",
        "relay_clientcerts": f"texthash:{pki.folder}/relay",
        "smtpd_restriction_classes": "allcerts", "allcerts": "permit_tls_all_clientcerts",
        "smtpd_relay_restrictions": ", ".join(lists["relay"]),
        "smtpd_recipient_restrictions": ", ".join(lists["recipient"])}


async def postfix_run(pki: ClientPki, cards) -> tuple[dict, dict, list]:
    async with RecordingPolicy() as policy:
        async with postfix_instance(postfix_settings(pki, policy.spec)) as pf:
            replies, lines = {}, {}
            for name, ctx in contexts(pki, cards).items():
                start = await pf.sessions_ended()
                replies[name] = await session(pf.port, ctx)
                text = await pf.logged("disconnect from", since=start)
                lines[name] = [line.split("]: ", 1)[1] for line in text.splitlines() if "/smtpd[" in line]
        return replies, lines, [ccert_attributes(r) for r in policy.requests]


async def mailflow_run(mailflow_server, pki: ClientPki, cards, caplog) -> tuple[dict, dict, list]:
    folder = pki.folder
    async with RecordingPolicy() as policy:
        lists = restrictions(folder, policy.spec)
        mf = await mailflow_server(
            myhostname="mf.test", mydestination=["local.test"], local_recipient_maps=["inline:{alice=ok}"],
            relayhost="[127.0.0.1]:9", smtpd={
                "tls_cert_file": pki.server_cert, "tls_ask_ccert": True, "tls_ca_file": pki.ca_file,
                "tls_loglevel": 1, "relay_clientcerts": [f"texthash:{folder}/relay"],
                "restriction_classes": {"allcerts": ["permit_tls_all_clientcerts"]},
                "relay_restrictions": lists["relay"], "recipient_restrictions": lists["recipient"]})
        port = mf.smtp_addresses[0][1]
        replies, lines = {}, {}
        for name, ctx in contexts(pki, cards).items():
            start = len(caplog.records)
            replies[name] = await session(port, ctx)
            await sessions_over(mf)
            lines[name] = [("warning: " if r.levelno == logging.WARNING else "") + r.getMessage()
                           for r in caplog.records[start:] if r.name == "mailflow.smtpd"]
        return replies, lines, [ccert_attributes(r) for r in policy.requests]


def compared_lines(lines: dict[str, list[str]]) -> dict[str, list[str]]:
    """The TLS summary cut after its bits; without Postfix's `QID: client=` line, which it writes at the first
    accepted RCPT (it opens its queue file there) and mailflow at the end of DATA (docs/architecture.md)."""
    return {name: [SUMMARY_TAIL.sub(r"\1", line) for line in session if not QUEUE_FILE_OPENED.match(line)]
            for name, session in lines.items()}


async def test_client_certificates_are_judged_and_logged_as_postfix_does(mailflow_server, pki, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    ca, cards, _ = pki
    theirs = await postfix_run(ca, cards)
    ours = await mailflow_run(mailflow_server, ca, cards, caplog)
    assert ours[0] == theirs[0]
    assert compared_lines(ours[1]) == compared_lines(theirs[1])
    assert ours[2] == theirs[2]
    # Postfix's own, so that a change on both sides cannot pass unnoticed
    relayed, denied = "250 2.1.5 Ok", "554 5.7.1 <x@elsewhere.test>: Relay access denied"
    assert theirs[0] == {
        "listed.test": [relayed] * 3, "key-listed.test": [relayed] * 3, "compressed-key.test": [relayed] * 3,
        "unlisted.test": [denied, relayed, relayed],
        "refused.test": [denied] + ["554 5.7.1 <refused.test>: Client certificate rejected: not you"] * 2,
        "pinned-key.test": [denied] + ["550 5.7.1 <pinned-key.test>: Client certificate rejected: pinned key "
                                       "refused"] * 2,
        "no certificate": [denied, "554 5.7.1 <anycert@elsewhere.test>: Relay access denied", relayed]}
    assert [line for line in theirs[1]["listed.test"] if "TLS connection established" in line][0].startswith(
        "Trusted TLS connection established from localhost[127.0.0.1]: TLSv1.3 with cipher ")
    card = cards["listed.test"]
    assert {"ccert_subject": "listed.test", "ccert_fingerprint": card.fingerprint,
            "ccert_pubkey_fingerprint": card.pkey_fingerprint}.items() <= theirs[2][0].items()


async def test_the_documented_difference_a_certificate_the_ca_file_does_not_vouch_for(mailflow_server, pki):
    """Postfix takes it, `Untrusted`, and relays by its listed fingerprint; mailflow's handshake fails (Python's
    ssl has no verify callback to let it through), unless the certificate is listed in tls_ca_file too."""
    ca, _, stranger = pki
    async with RecordingPolicy() as policy:
        async with postfix_instance(postfix_settings(ca, policy.spec)) as pf:
            start = await pf.sessions_ended()
            assert await session(pf.port, stranger.context(ca)) == ["250 2.1.5 Ok"] * 3
            text = await pf.logged("disconnect from", since=start)
    assert "Untrusted TLS connection established from localhost[127.0.0.1]" in text
    mf = await mailflow_server(smtpd={"tls_cert_file": ca.server_cert, "tls_ask_ccert": True,
                                      "tls_ca_file": ca.ca_file})
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await client.cmd("EHLO client.test")).code == 250
    try:
        await client.starttls(stranger.context(ca))
        ended = (await client.cmd("EHLO client.test")).code is None
    except (ssl.SSLError, ConnectionError):
        ended = True
    await client.close()
    assert ended


@pytest.fixture
def intermediate_pki():
    """A CA file that holds a partner's full chain, its certificate and the public intermediate CA that issued it
    (no root): `partner.test` (listed in relay_clientcerts) and `anyone.test` come from that intermediate."""
    folder = Path(tempfile.mkdtemp(prefix="mailflow-ccert-", dir="/tmp"))
    pki = ClientPki(folder)
    intermediate = trustme.CA().create_child_ca()
    cards = {name: pki.client(name, issuer=intermediate) for name in ("partner.test", "anyone.test")}
    pki.ca_file = pki._write("partner-chain.pem", Path(cards["partner.test"].cert_file).read_bytes()
                             + intermediate.cert_pem.bytes())
    pki._write("relay", f"{cards['partner.test'].fingerprint} partner\n".encode())
    pki._write("ccert", b"")
    pki._write("rcpt", b"anycert@elsewhere.test allcerts\n")
    yield pki, cards
    shutil.rmtree(folder, ignore_errors=True)


async def test_an_intermediate_ca_in_the_ca_file_vouches_for_nothing_as_postfix(mailflow_server, intermediate_pki,
                                                                               caplog):
    """Postfix's OpenSSL verifies up to a self-signed certificate of smtpd_tls_CAfile: with none there every
    certificate is `Untrusted` (permit_tls_all_clientcerts refuses it, policy requests carry no names), though
    its fingerprint still counts. mailflow's handshake takes any listed certificate as an anchor (to pin one),
    but trusts as Postfix does."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    pki, cards = intermediate_pki
    theirs = await postfix_run(pki, cards)
    ours = await mailflow_run(mailflow_server, pki, cards, caplog)
    assert ours[0] == theirs[0]
    assert compared_lines(ours[1]) == compared_lines(theirs[1])
    assert ours[2] == theirs[2]
    relayed, denied = "250 2.1.5 Ok", "554 5.7.1 <{}>: Relay access denied"
    assert theirs[0] == {"partner.test": [relayed] * 3,
                         "anyone.test": [denied.format(RECIPIENTS[0]), denied.format(RECIPIENTS[1]), relayed],
                         "no certificate": [denied.format(RECIPIENTS[0]), denied.format(RECIPIENTS[1]), relayed]}
    assert [line for line in theirs[1]["anyone.test"] if "TLS connection established" in line][0].startswith(
        "Untrusted TLS connection established from localhost[127.0.0.1]: TLSv1.3 with cipher ")
    assert theirs[2][0]["ccert_subject"] == "" and theirs[2][0]["ccert_fingerprint"] == cards[
        "partner.test"].fingerprint


@pytest.fixture
def odd_names_pki():
    """Certificates whose CommonName would break a reply line (CR LF) or hide a NUL, each refused by
    check_ccert_access, which names the CommonName in its reply."""
    folder = Path(tempfile.mkdtemp(prefix="mailflow-ccert-", dir="/tmp"))
    pki = ClientPki(folder)
    cards = {"crlf.test": pki.client("crlf.test", common_name="evil>\r\n250 2.1.5 Ok\r\n<x"),
             "nul.test": pki.client("nul.test", common_name="nul\0.test"),
             "xtext.test": pki.client("xtext.test", common_name="a=b+c d.test")}  # (named: xtext in policy)
    pki._write("relay", b"")
    pki._write("ccert", "".join(f"{card.fingerprint} REJECT\n" for card in cards.values()).encode())
    pki._write("rcpt", b"anycert@elsewhere.test allcerts\n")
    yield pki, cards
    shutil.rmtree(folder, ignore_errors=True)


async def test_a_certificate_name_with_controls_is_dropped_as_postfix_drops_it(mailflow_server, odd_names_pki,
                                                                              caplog):
    """Postfix's tls_text_name: a CommonName with a non-printable ASCII character or a NUL is no name (a warning
    says why), so a refusal names `<>` and no reply line is injected; the policy request has no subject. A name
    with `=`, `+` and a space is xtext in the policy request as Postfix's xtext_quote writes it."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    pki, cards = odd_names_pki
    theirs = await postfix_run(pki, cards)
    ours = await mailflow_run(mailflow_server, pki, cards, caplog)
    assert ours[0] == theirs[0]
    assert compared_lines(ours[1]) == compared_lines(theirs[1])
    assert ours[2] == theirs[2]
    refused = "554 5.7.1 <>: Client certificate rejected: Access denied"
    assert theirs[0]["crlf.test"] == ["554 5.7.1 <x@elsewhere.test>: Relay access denied", refused, refused]
    assert ("warning: tls_text_name: localhost[127.0.0.1]: non-printable content in peer subject CN"
            in theirs[1]["crlf.test"])
    assert "warning: tls_text_name: localhost[127.0.0.1]: NULL character in peer subject CN" in theirs[1]["nul.test"]
    assert [r["ccert_subject"] for r in theirs[2]][-3] == "a=b+2Bc+20d.test"


@pytest.fixture
def server_auth_pki():
    """A partner MTA that presents its server certificate (extendedKeyUsage serverAuth only, as public CAs issue
    them) as its client certificate, pinned in the CA file as docs/security.md says: `openssl x509 -addtrust
    clientAuth` (a TRUSTED CERTIFICATE block) next to the own clients' CA, its public CA not there; listed in
    relay_clientcerts by its fingerprint."""
    folder = Path(tempfile.mkdtemp(prefix="mailflow-ccert-", dir="/tmp"))
    pki = ClientPki(folder)
    (folder / "public").mkdir()  # the partner's CA, a public one: not in the CA file (it would vouch for all)
    card = ClientPki(folder / "public").openssl_client("mx.partner.test", extensions="extendedKeyUsage=serverAuth")
    pinned = subprocess.run(["openssl", "x509", "-in", card.cert_file, "-addtrust", "clientAuth"], check=True,
                            capture_output=True).stdout
    assert pinned.startswith(b"-----BEGIN TRUSTED CERTIFICATE-----")
    pki.ca_file = pki._write("pinned.pem", pki.ca.cert_pem.bytes() + pinned)
    pki._write("relay", f"{card.fingerprint} partner\n".encode())
    pki._write("ccert", b"")
    pki._write("rcpt", b"anycert@elsewhere.test allcerts\n")
    yield pki, {"mx.partner.test": card}
    shutil.rmtree(folder, ignore_errors=True)


async def test_a_server_auth_only_certificate_pinned_with_addtrust_relays_untrusted_as_postfix(
        mailflow_server, server_auth_pki, caplog):
    """Postfix verifies a client certificate for the purpose sslclient: one for serverAuth only is `Untrusted`
    (permit_tls_all_clientcerts refuses it) and relays by its fingerprint. mailflow's handshake would end for it;
    the TRUSTED CERTIFICATE form lets it through, and it is then judged as in Postfix."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    pki, cards = server_auth_pki
    theirs = await postfix_run(pki, cards)
    ours = await mailflow_run(mailflow_server, pki, cards, caplog)
    assert ours[0] == theirs[0]
    assert compared_lines(ours[1]) == compared_lines(theirs[1])
    assert ours[2] == theirs[2]
    assert theirs[0]["mx.partner.test"] == ["250 2.1.5 Ok"] * 3
    assert [line for line in theirs[1]["mx.partner.test"] if "TLS connection established" in line][0].startswith(
        "Untrusted TLS connection established from localhost[127.0.0.1]")


@pytest.fixture
def deep_pki():
    """Clients whose certificates are 9, 10 and 11 intermediate CAs below the listed root (each sends its chain).
    trustme's own CA allows 9 below it: this root is made for more."""
    folder = Path(tempfile.mkdtemp(prefix="mailflow-ccert-", dir="/tmp"))
    pki = ClientPki(folder)
    cards, ca = {}, trustme.CA(path_length=12)
    pki.ca_file = pki._write("deep-root.pem", ca.cert_pem.bytes())
    for depth in range(1, 12):
        ca = ca.create_child_ca()
        if depth >= 9:
            leaf = ca.issue_cert(f"depth{depth}.test", common_name=f"depth{depth}.test")
            chain = pki._write(f"depth{depth}.pem", b"".join(p.bytes() for p in leaf.cert_chain_pems))
            key = pki._write(f"depth{depth}.key", leaf.private_key_pem.bytes())
            der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
            cards[f"depth{depth}.test"] = ClientCard(f"depth{depth}.test", chain, key, der, b"")
    for name in ("relay", "ccert", "rcpt"):
        pki._write(name, b"anycert@elsewhere.test allcerts\n" if name == "rcpt" else b"")
    yield pki, cards
    shutil.rmtree(folder, ignore_errors=True)


async def test_trust_stops_at_postfixs_verify_depth(mailflow_server, deep_pki, caplog):
    """smtpd_tls_ccert_verifydepth 9, which Postfix gives OpenSSL as 10: ten intermediate CAs are trusted, eleven
    not (Python's ssl cannot set the depth: mailflow limits trust, not the handshake)."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    pki, cards = deep_pki
    theirs = await postfix_run(pki, cards)
    ours = await mailflow_run(mailflow_server, pki, cards, caplog)
    assert ours[0] == theirs[0]
    assert compared_lines(ours[1]) == compared_lines(theirs[1])
    assert [next(line.split(" ")[0] for line in theirs[1][name] if "TLS connection" in line) for name in cards] == [
        "Trusted", "Trusted", "Untrusted"]

"""Submission through real clients: swaks over 587-style (STARTTLS + AUTH PLAIN, verified against a trustme CA)
and 465-style (implicit TLS) listeners, and Postfix's posttls-finger verifying the certificate."""
from __future__ import annotations

import pytest
import trustme

from mailflow import status
from mailflow.stages.smtpd.auth import hash_password
from tests.support import eventually, maildir_messages, require_tool, run_tool

pytestmark = pytest.mark.interop


@pytest.fixture
async def door(mailflow_server, tmp_path):
    """A server with a submission and a submissions listener; user alice / s3cret; ca.pem to verify with."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    (tmp_path / "users").write_text(f"alice {hash_password('s3cret', n=1024)}\n")
    mf = await mailflow_server(smtpd={
        "tls_cert_file": str(tmp_path / "cert.pem"), "sasl_user_maps": [f"texthash:{tmp_path / 'users'}"],
        "auth_failure_delay": 0,
        "listeners": [{"address": "127.0.0.1:0", "role": "submission"},
                      {"address": "127.0.0.1:0", "role": "submissions"}]})
    return mf, str(tmp_path / "ca.pem"), tmp_path / "mail" / "bob" / "Maildir"


def swaks(port: int, ca: str, *extra: str) -> list[str]:
    return [require_tool("swaks"), "--server", "127.0.0.1", "--port", str(port), "--ehlo", "client.test",
            "--from", "alice@local.test", "--to", "bob@local.test", "--tls-ca-path", ca, "--tls-sni", "localhost",
            "--header", "Subject: swaks submission", "--body", "hello", "--timeout", "10", *extra]


AUTH = ("--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "s3cret")


async def test_swaks_submits_with_starttls_and_auth_plain(door):
    mf, ca, maildir = door
    rc, out = await run_tool(*swaks(mf.smtpd.address_of("submission")[1], ca, "--tls", "--tls-verify", *AUTH))
    assert rc == 0, out
    assert "235 2.7.0" in out and "queued as" in out
    await eventually(lambda: maildir_messages(maildir))


async def test_swaks_without_auth_is_refused_530(door):
    mf, ca, _ = door
    rc, out = await run_tool(*swaks(mf.smtpd.address_of("submission")[1], ca, "--tls", "--tls-verify"))
    assert rc != 0
    assert str(status.AUTH_REQUIRED) in out


async def test_swaks_without_tls_gets_no_auth(door):
    mf, ca, _ = door
    rc, out = await run_tool(*swaks(mf.smtpd.address_of("submission")[1], ca, *AUTH))
    assert rc == 28, out  # swaks: AUTH not offered
    assert "Host did not advertise authentication" in out


async def test_swaks_wrong_password_is_535(door):
    mf, ca, _ = door
    rc, out = await run_tool(*swaks(mf.smtpd.address_of("submission")[1], ca, "--tls", "--tls-verify",
                               "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "nope"))
    assert rc == 28 and "535 5.7.8" in out, out


async def test_swaks_submits_over_implicit_tls(door):
    mf, ca, maildir = door
    rc, out = await run_tool(*swaks(mf.smtpd.address_of("submissions")[1], ca, "--tlsc", "--tls-verify", *AUTH))
    assert rc == 0, out
    assert "queued as" in out
    await eventually(lambda: maildir_messages(maildir))


async def test_posttls_finger_verifies_the_certificate(door):
    mf, ca, _ = door
    finger = require_tool("posttls-finger")
    port = mf.smtpd.address_of("submission")[1]
    rc, out = await run_tool(finger, "-c", "-l", "secure", "-F", ca, f"[127.0.0.1]:{port}", "localhost", timeout=30)
    assert "Verified TLS connection established" in out, out

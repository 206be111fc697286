"""The restriction items a Postfix main.cf names that need no DNS, through a real mailflow over SMTP, where
tests/interop/test_restriction_items_vs_postfix.py (the same items against Postfix 3.7) cannot go: a session under
TLS, plaintext_reject_code, the items that need AUTH on a listener without it, reject_unlisted_sender at MAIL
(delay_reject false), warn_if_reject over an access table's DEFER_IF_PERMIT, and the load-time checks."""
from __future__ import annotations

import base64
import logging

import pytest

from mailflow import status
from mailflow.config import config_from_dict
from mailflow.errors import ConfigError
from tests.support import SmtpClient

HELLO = "EHLO client.test"


async def test_reject_plaintext_session_passes_under_tls_and_uses_its_code(mailflow_server, pki):
    _, cert, ctx = pki
    mf = await mailflow_server(smtpd={"tls_cert_file": cert, "plaintext_reject_code": 550,
                                      "recipient_restrictions": ["reject_plaintext_session"]})
    port = mf.smtp_addresses[0][1]
    plain = await SmtpClient.connect(port)
    await plain.cmd(HELLO)
    await plain.cmd("MAIL FROM:<s@remote.test>")
    assert (await plain.cmd("RCPT TO:<postmaster@local.test>")).text == "550 5.7.1 Session encryption is required"
    await plain.close()
    secured = await SmtpClient.connect(port)
    await secured.cmd(HELLO)
    await secured.starttls(ctx)
    await secured.cmd(HELLO)
    await secured.cmd("MAIL FROM:<s@remote.test>")
    assert (await secured.cmd("RCPT TO:<postmaster@local.test>")).code == 250
    await secured.close()


async def test_sasl_items_are_ignored_and_logged_without_auth(mailflow_server, caplog):
    """Postfix: `restriction ... ignored: no SASL support` when smtpd_sasl_auth_enable is off."""
    caplog.set_level(logging.WARNING, logger="mailflow.smtpd")
    mf = await mailflow_server(smtpd={
        "sender_login_maps": ["inline:{s@remote.test=alice}"],
        "recipient_restrictions": ["reject_sender_login_mismatch", "check_sasl_access inline:{alice=REJECT}"]})
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await client.cmd(HELLO)
    await client.cmd("MAIL FROM:<s@remote.test>")
    assert (await client.cmd("RCPT TO:<postmaster@local.test>")).code == 250
    await client.close()
    warnings = [r.getMessage() for r in caplog.records]
    assert "restriction `reject_sender_login_mismatch' ignored: no SASL support" in warnings
    assert "restriction `check_sasl_access' ignored: no SASL support" in warnings


async def test_a_sender_login_item_is_logged_as_ignored_for_the_null_sender_too(mailflow_server, caplog):
    """Postfix's generic_checks warns before it looks at the sender."""
    caplog.set_level(logging.WARNING, logger="mailflow.smtpd")
    mf = await mailflow_server(smtpd={"recipient_restrictions": ["reject_unauthenticated_sender_login_mismatch"]})
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await client.cmd(HELLO)
    await client.cmd("MAIL FROM:<>")
    assert (await client.cmd("RCPT TO:<postmaster@local.test>")).code == 250
    await client.close()
    assert "restriction `reject_unauthenticated_sender_login_mismatch' ignored: no SASL support" in \
        [r.getMessage() for r in caplog.records]


async def test_the_sender_login_setting_asks_the_maps_the_resolved_sender(mailflow_server, users):
    """The [smtpd] reject_sender_login_mismatch setting is the items' check: sender_login_maps are asked the sender
    qualified and with the percent hack applied (Postfix's smtpd_resolve_addr), at MAIL."""
    mf = await mailflow_server(myorigin="local.test", smtpd={
        "sasl_auth_enable": True, "sasl_user_maps": [users], "auth_failure_delay": 0,
        "allow_plaintext_auth_on_loopback": True, "reject_sender_login_mismatch": True,
        "sender_login_maps": ["inline:{bob@local.test=bob}"]})
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await client.cmd(HELLO)
    for sender in ("bob%local.test@local.test", "bob"):
        assert await client.cmd(f"MAIL FROM:<{sender}>") == status.sender_login_mismatch(sender, None)
    assert (await client.cmd("AUTH PLAIN " + base64.b64encode(b"\0bob\0hunter2").decode())).code == 235
    assert (await client.cmd("MAIL FROM:<bob>")).code == 250
    await client.close()


async def test_unlisted_sender_refused_at_mail_with_delay_reject_off(mailflow_server):
    """smtpd_reject_unlisted_sender runs where Postfix's smtpd_check_mail runs: at MAIL without delay_reject."""
    mf = await mailflow_server(smtpd={"delay_reject": False, "reject_unlisted_sender": True})
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await client.cmd(HELLO)
    assert (await client.cmd("MAIL FROM:<nobody@local.test>")).text == \
        "550 5.1.0 <nobody@local.test>: Sender address rejected: User unknown in local recipient table"
    assert (await client.cmd("MAIL FROM:<postmaster@local.test>")).code == 250
    assert (await client.cmd("RSET")).code == 250
    assert (await client.cmd("MAIL FROM:<someone@remote.test>")).code == 250  # (not a local domain)
    await client.close()


@pytest.mark.parametrize("lists", [{}, {"recipient_restrictions": ["reject_unlisted_sender",
                                                                    "reject_unlisted_recipient", "permit"]}])
async def test_no_unknown_recipient_checks_turns_off_the_unlisted_checks(mailflow_server, lists):
    """Postfix's check_sender_rcpt_maps and check_recipient_rcpt_maps return at once under
    receive_override_options = no_unknown_recipient_checks, the items' and the implied checks alike: an after-queue
    filter's return listener takes back the mail of a local sender no table lists (www-data)."""
    mf = await mailflow_server(smtpd={"reject_unlisted_sender": True, **lists, "listeners": [{
        "address": "127.0.0.1:0", "overrides": {"receive_override_options": ["no_unknown_recipient_checks"]}}]})
    checked, unchecked = (port for _, port in mf.smtp_addresses)
    refused = await SmtpClient.connect(checked)
    await refused.cmd(HELLO)
    await refused.cmd("MAIL FROM:<www-data@local.test>")
    assert (await refused.cmd("RCPT TO:<postmaster@local.test>")).text == \
        "550 5.1.0 <www-data@local.test>: Sender address rejected: User unknown in local recipient table"
    await refused.close()
    taken = await SmtpClient.connect(unchecked)
    await taken.cmd(HELLO)
    await taken.cmd("MAIL FROM:<www-data@local.test>")
    assert (await taken.cmd("RCPT TO:<postmaster@local.test>")).code == 250
    assert (await taken.cmd("RCPT TO:<nobody@local.test>")).code == 250
    await taken.close()


async def test_warn_if_reject_makes_a_defer_if_permit_a_warning(mailflow_server, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    mf = await mailflow_server(smtpd={"recipient_restrictions": [
        "warn_if_reject", "check_sender_access inline:{ {s@remote.test=DEFER_IF_PERMIT 4.7.9 maybe later} }"]})
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await client.cmd(HELLO)
    await client.cmd("MAIL FROM:<s@remote.test>")
    assert (await client.cmd("RCPT TO:<postmaster@local.test>")).code == 250
    await client.close()
    assert any(r.getMessage().startswith("NOQUEUE: reject_warning: RCPT from ") and
               "450 4.7.9 <s@remote.test>: Sender address rejected: maybe later; from=<s@remote.test>" in r.getMessage()
               for r in caplog.records)


async def test_warn_if_reject_warns_of_a_policys_4_3_x_but_not_of_a_server_fault(mailflow_server, caplog):
    """Postfix's smtpd_check_reject exempts only its own failures (reject_dict_retry, reject_server_error): a policy
    server's default action and an access action `451 4.3.0` are policies' verdicts, only warned of; an access
    value naming a table is a configuration error and stays a refusal."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    mf = await mailflow_server(smtpd={"recipient_restrictions": [
        "warn_if_reject", "check_policy_service inet:127.0.0.1:9", "warn_if_reject",
        "check_sender_access inline:{ {s@remote.test=451 4.3.0 busy}, {t@remote.test=hash:/nowhere} }"]})
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await client.cmd(HELLO)
    await client.cmd("MAIL FROM:<s@remote.test>")
    assert (await client.cmd("RCPT TO:<postmaster@local.test>")).code == 250
    await client.cmd("RSET")
    await client.cmd("MAIL FROM:<t@remote.test>")
    assert (await client.cmd("RCPT TO:<postmaster@local.test>")).text == \
        "451 4.3.5 <t@remote.test>: Sender address rejected: Server configuration error"
    await client.close()
    warned = [r.getMessage().split("]: ", 1)[-1] for r in caplog.records if "reject_warning: " in r.getMessage()]
    assert [w.split("; ")[0] for w in warned[:2]] == [
        "451 4.3.5 <postmaster@local.test>: Recipient address rejected: Server configuration problem",
        "451 4.3.0 <s@remote.test>: Sender address rejected: busy"]


async def test_warn_if_reject_warns_of_an_access_table_that_cannot_answer(mailflow_server, caplog):
    """Postfix's check_access gives a failed table the value `451 4.3.5 Server configuration error`, which
    check_table_result refuses as a policy's (MAIL_ERROR_POLICY): under warn_if_reject only a warning (as a
    private Postfix 3.7.11 logs it: tests/interop/test_restriction_items_vs_postfix.py, c_wfail)."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    mf = await mailflow_server(smtpd={"recipient_restrictions": ["warn_if_reject", "check_sender_access fail:down"]})
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await client.cmd(HELLO)
    await client.cmd("MAIL FROM:<s@remote.test>")
    assert (await client.cmd("RCPT TO:<postmaster@local.test>")).code == 250
    await client.close()
    assert any("NOQUEUE: reject_warning: RCPT from " in r.getMessage() and
               ": 451 4.3.5 <s@remote.test>: Sender address rejected: Server configuration error; " in r.getMessage()
               for r in caplog.records)


async def test_a_warning_under_soft_bounce_names_the_reply_as_it_would_be_sent(mailflow_server, caplog):
    """Postfix's smtpd_check_reject makes the 5 a 4 before it logs, warning or not."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    mf = await mailflow_server(soft_bounce=True, smtpd={"recipient_restrictions": ["warn_if_reject", "reject"]})
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await client.cmd(HELLO)
    await client.cmd("MAIL FROM:<s@remote.test>")
    assert (await client.cmd("RCPT TO:<postmaster@local.test>")).code == 250
    await client.close()
    assert any("reject_warning: RCPT from " in r.getMessage() and ": 454 4.7.1 <postmaster@local.test>: Recipient "
               "address rejected: Access denied; " in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("item, reason", [
    ("warn_if_reject permit", "'warn_if_reject' takes no argument (got 'permit')"),
    ("reject_unauth_pipelining now", "'reject_unauth_pipelining' takes no argument (got 'now')"),
    ("check_sasl_access", "'check_sasl_access' needs an argument"),
    ("check_sasl_access nosuchtype:/x", "check_sasl_access: "),
])
def test_a_wrong_argument_fails_at_load(item, reason):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"smtpd": {"recipient_restrictions": [item]}})
    assert reason in str(e.value)


def test_a_warned_relay_guard_guards_nothing():
    """Postfix's has_required skips the item after warn_if_reject: such a list relays for anyone."""
    relay = {"relay_restrictions": ["permit_mynetworks", "warn_if_reject", "reject_unauth_destination"]}
    with pytest.raises(ConfigError, match="must reach one of"):
        config_from_dict({"smtpd": relay})
    relay["relay_restrictions"].append("reject_unauth_destination")
    config_from_dict({"smtpd": relay})


def test_a_run_of_warn_if_reject_warns_the_item_after_the_run():
    """has_required skips the one word after a warn_if_reject, so Postfix's smtpd starts with `warn_if_reject,
    warn_if_reject, reject_unauth_destination`, yet at runtime the guard only warns (it relays for anyone): mailflow
    refuses it, stricter on purpose (docs/security.md)."""
    with pytest.raises(ConfigError, match="must reach one of"):
        config_from_dict({"smtpd": {"relay_restrictions": ["permit_mynetworks", "warn_if_reject", "warn_if_reject",
                                                           "reject_unauth_destination"]}})

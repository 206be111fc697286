"""smtpd's delay_reject false, ETRN and VRFY over real sockets, with the literal replies that
tests/interop/test_delay_reject_vs_postfix.py and test_etrn_vrfy_vs_postfix.py found Postfix 3.7 to give: so that
they are checked where Postfix is not installed too."""
from __future__ import annotations

from mailflow import status
from tests.support import sessions_over
from tests.support.sessions import replay_sessions, xclient

ACCESS = "inline:{127.0.0.2=REJECT, { dip.helo = DEFER_IF_PERMIT helo maybe }, { 192.0.2.7 = OK }}"


async def replies(mf, sessions: dict[str, list[str]], sources: dict[str, str] | None = None) -> dict[str, list]:
    """Each session's replies as text (the greeting first), None once the server closed the connection."""
    done = await replay_sessions(mf.smtp_addresses[0][1], sessions, sources)
    await sessions_over(mf)
    return {name: [None if r is None or r.code is None else r.text for _, r in pairs] for name, pairs in done.items()}


async def test_delay_reject_false_refuses_the_client_at_connect_then_every_command_but_quit(mailflow_server):
    mf = await mailflow_server(smtpd={"delay_reject": False, "client_restrictions": [f"check_client_access {ACCESS}"]})
    got = await replies(mf, {"refused": ["EHLO client.test", "MAIL FROM:<a@s.test>", "NOOP", "QUIT"]},
                        {"refused": "127.0.0.2"})
    assert got["refused"] == [
        "554 5.7.1 <unknown[127.0.0.2]>: Client host rejected: Access denied",
        "503 5.7.0 Error: access denied for unknown[127.0.0.2]",
        "503 5.7.0 Error: access denied for unknown[127.0.0.2]",
        "503 5.7.0 Error: access denied for unknown[127.0.0.2]",
        "221 2.0.0 Bye"]


async def test_xclient_keeps_the_helo_lists_defer_if_permit(mailflow_server):
    # Postfix's xclient_cmd forgets the HELO name (helo_reset), not defer_if_permit_helo: RCPT is deferred
    mf = await mailflow_server(mynetworks=["127.0.0.0/8"], smtpd={
        "delay_reject": False, "authorized_xclient_hosts": ["127.0.0.0/8"],
        "client_restrictions": [f"check_client_access {ACCESS}"], "helo_restrictions": [f"check_helo_access {ACCESS}"]})
    got = await replies(mf, {"xclient": ["EHLO dip.helo", xclient(7), "MAIL FROM:<a@s.test>", "RCPT TO:<a@relay.test>",
                                         "QUIT"]})
    assert got["xclient"][3:5] == ["250 2.1.0 Ok", "450 4.7.1 <dip.helo>: Helo command rejected: helo maybe"]


async def test_vrfy_answers_252_for_a_known_user_and_refuses_an_unknown_one(mailflow_server):
    mf = await mailflow_server(smtpd={"disable_vrfy_command": False})
    got = await replies(mf, {"vrfy": ["EHLO client.test", "VRFY alice@local.test", "VRFY <alice@local.test>",
                                      "VRFY nobody@local.test", "QUIT"]})
    assert got["vrfy"][2:5] == [
        "252 2.0.0 alice@local.test", "252 2.0.0 <alice@local.test>",
        "550 5.1.1 <nobody@local.test>: Recipient address rejected: User unknown in local recipient table"]


async def test_vrfy_takes_a_utf8_domain_only_after_its_smtputf8_word(mailflow_server):
    # Postfix's vrfy_cmd: extract_addr with smtputf8 = 0 unless the last word is SMTPUTF8
    mf = await mailflow_server(smtpd={"disable_vrfy_command": False})
    utf8 = "VRFY alice@d\u00f6main.test"
    got = await replies(mf, {"vrfy": ["EHLO client.test", utf8, utf8 + " smtputf8", "QUIT"]})
    assert got["vrfy"][2] == str(status.RECIPIENT_SYNTAX)
    assert got["vrfy"][3].startswith("554 5.7.1 ")  # past the syntax: relaying


async def test_vrfy_refuses_a_utf8_address_without_its_smtputf8_word(mailflow_server):
    # Postfix's vrfy_cmd under strict_smtputf8 (mailflow's MAIL and RCPT always refuse a UTF-8 address undeclared):
    # 553 5.6.7 after the syntax, before the recipient checks; unlike Postfix's, the transaction is kept
    mf = await mailflow_server(smtpd={"disable_vrfy_command": False})
    got = await replies(mf, {"vrfy": ["EHLO client.test", "MAIL FROM:<s@remote.test>", "VRFY j\u00fcrgen@local.test",
                                      "VRFY <\u00e9@local.test>", "VRFY j\u00fcrgen@local.test SMTPUTF8",
                                      "RCPT TO:<alice@local.test>", "QUIT"]})
    assert got["vrfy"][3:5] == [str(status.SMTPUTF8_REQUIRED)] * 2
    assert got["vrfy"][5].startswith("550 5.1.1 <j\u00fcrgen@local.test>: ")  # declared: the recipient tables
    assert got["vrfy"][6] == "250 2.1.5 Ok"


async def test_etrn_is_refused_by_check_etrn_access(mailflow_server):
    mf = await mailflow_server(smtpd={"etrn_restrictions": ["check_etrn_access inline:{refused.test=REJECT}"]})
    got = await replies(mf, {"etrn": ["EHLO client.test", "ETRN refused.test", "QUIT"]})
    assert got["etrn"][2] == "554 5.7.1 <refused.test>: Etrn command rejected: Access denied"

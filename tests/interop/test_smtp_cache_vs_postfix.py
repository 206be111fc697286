"""Differential test of the SMTP client's RSET probe: a private Postfix 3.7 (its smtp(8), told to cache sessions to
the peer's address by smtp_connection_cache_destinations, as it caches on demand) and mailflow (which always caches,
smtp.connection_cache_time_limit) each deliver three messages, one after the other, to a scripted SMTP peer of
their own, with and without PIPELINING; the peers hear the same commands: one session, EHLO once, and RSET before
each reuse (smtp_reuse_common's probe; mailflow pipelines it with MAIL when it can, Postfix sends it alone: the
order on the wire is the same). QUIT is left out: Postfix's scache closes an idle session without one, mailflow
QUITs it."""
from __future__ import annotations

import pytest

from tests.interop.test_lmtp_cache_vs_postfix import PEER_HOST, deliver_one_after_the_other, heard
from tests.interop.test_smtp_faults_vs_postfix import EHLO, ScriptedPeer
from tests.support import postfix_instance

pytestmark = pytest.mark.interop

WITHOUT_PIPELINING = EHLO.replace(b"250-PIPELINING\r\n", b"")


@pytest.mark.parametrize("ehlo", [EHLO, WITHOUT_PIPELINING], ids=["pipelining", "no-pipelining"])
async def test_smtp_sessions_are_reused_after_an_rset_probe_as_postfix_s_smtp_does(mailflow_server, ehlo):
    pf_peer = await ScriptedPeer({"EHLO": ehlo}).start(PEER_HOST)
    mf_peer = await ScriptedPeer({"EHLO": ehlo}).start(PEER_HOST)
    try:
        async with postfix_instance({
            "mydestination": "", "relay_domains": "box.test", "mynetworks": "127.0.0.0/8",
            "transport_maps": f"inline:{{box.test=smtp:[{PEER_HOST}]:{pf_peer.port}}}",
            "smtp_connection_cache_destinations": PEER_HOST,
        }) as pf:
            await deliver_one_after_the_other(pf.port, pf_peer)
        mf = await mailflow_server(relay_domains=["box.test"], mynetworks=["127.0.0.0/8"],
                                   transport_maps=[f"inline:{{box.test=smtp:[{PEER_HOST}]:{mf_peer.port}}}"])
        await deliver_one_after_the_other(mf.smtp_addresses[0][1], mf_peer)
    finally:
        await pf_peer.stop()
        await mf_peer.stop()
    assert heard(mf_peer) == heard(pf_peer) == ["EHLO"] + ["MAIL", "RCPT", "DATA", "RSET"] * 2 + [
        "MAIL", "RCPT", "DATA", "|"]

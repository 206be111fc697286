"""Differential test of policy delegation (check_policy_service): one scripted policy server behind a private
Postfix and behind mailflow, configured alike; each of the server's answers must give the same RCPT reply.

Not compared, because mailflow differs on purpose (docs/security.md): an answer Postfix cannot carry out
(`451 4.3.5 <rcpt>: Recipient address rejected: Server configuration error`, Postfix without the prefix), and
policy connection reuse.
"""
from __future__ import annotations

import asyncio

import pytest

from tests.support import SmtpClient, postfix_instance

pytestmark = pytest.mark.interop

ANSWERS = {  # the recipient's local part -> what the policy server answers for it
    "reject-with-code": "REJECT 5.1.2 bad mailbox",
    "reject-with-code-of-the-wrong-class": "REJECT 4.1.2 wrong class",
    "defer-with-code": "DEFER 4.2.0 greylisted",
    "defer-with-code-of-the-wrong-class": "DEFER 5.2.0 wrong class",
    "defer-without-text": "DEFER",
    "postgrey": "DEFER_IF_PERMIT 4.2.0 Greylisted, see http://postgrey.schweikert.ch/help/local.test.html",
    "defer-if-permit-without-text": "DEFER_IF_PERMIT",
    "unknown-defer-if-reject": "DEFER_IF_REJECT 4.2.0 soft",  # (unknown-*: no such user, a later refusal)
    "unknown-defer-if-reject-without-text": "DEFER_IF_REJECT",
    "unknown-postgrey": "DEFER_IF_PERMIT 4.2.0 Greylisted, see http://postgrey.schweikert.ch/help/local.test.html",
}


class ScriptedPolicy:
    """SMTPD_POLICY_README's server side: answers each request by the recipient's local part (DUNNO else)."""

    def __init__(self):
        self.requests: list[dict[str, str]] = []

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"inet:127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request := await self._request(reader):
                self.requests.append(request)
                local = request.get("recipient", "").partition("@")[0]
                writer.write(f"action={ANSWERS.get(local, 'DUNNO')}\n\n".encode())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    @staticmethod
    async def _request(reader: asyncio.StreamReader) -> dict[str, str]:
        request: dict[str, str] = {}
        for _ in range(100):  # attributes in one request (Postfix 3.7 sends 29)
            line = (await reader.readline()).decode().rstrip("\n")
            if not line:
                break
            name, _, value = line.partition("=")
            request[name] = value
        return request


async def replies(port: int) -> dict[str, str]:
    got = {}
    for local in ANSWERS:
        client = await SmtpClient.connect(port)
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
        got[local] = (await client.cmd(f"RCPT TO:<{local}@local.test>")).text
        await client.close()
    return got


async def test_policy_answers_give_the_replies_postfix_gives(mailflow_server):
    users = ",".join(f"{local}=ok" for local in ANSWERS if not local.startswith("unknown-"))
    async with ScriptedPolicy() as spec:
        async with postfix_instance({
            "myhostname": "pf.test", "mydestination": "local.test", "local_recipient_maps": f"inline:{{{users}}}",
            "smtpd_recipient_restrictions": f"check_policy_service {spec}", "smtpd_policy_service_timeout": "5s",
        }) as pf:
            postfix = await replies(pf.port)
        mf = await mailflow_server(local_recipient_maps=[f"inline:{{{users}}}"],
                                   smtpd={"recipient_restrictions": [f"check_policy_service {spec}"]})
        mailflow = await replies(mf.smtp_addresses[0][1])
    assert {local: reply for local, reply in mailflow.items() if reply != postfix[local]} == {}, postfix
    # the answers themselves, so that a change on both sides cannot pass unnoticed
    assert postfix["reject-with-code-of-the-wrong-class"] == \
        "554 5.1.2 <reject-with-code-of-the-wrong-class@local.test>: Recipient address rejected: wrong class"
    assert postfix["postgrey"] == ("450 4.2.0 <postgrey@local.test>: Recipient address rejected: Greylisted, see "
                                   "http://postgrey.schweikert.ch/help/local.test.html")
    assert postfix["defer-without-text"].endswith(": Recipient address rejected: Access denied")
    assert postfix["unknown-defer-if-reject"] == \
        "450 4.2.0 <unknown-defer-if-reject@local.test>: Recipient address rejected: soft"
    assert postfix["unknown-postgrey"].startswith("450 4.2.0 ")  # before the implied unknown-user check

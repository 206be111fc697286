"""Differential tests of mynetworks against a private Postfix 3.7: the same list, written in each of the forms
Postfix's match lists take (an exclusion, a /file of patterns, a cidr: table, a texthash: table, `!` on a file
or a table), must let the same clients relay. Clients connect from loopback aliases (127.0.0.1, .2, .3, .9: Linux
routes all of 127/8 to lo) and ask to relay to a remote domain, both servers with `permit_mynetworks,
reject_unauth_destination`; the RCPT replies must be the same, word for word.

Not compared, because mailflow differs on purpose (docs/config.md, mynetworks): a network with host bits set
(`127.0.0.1/8`), which Postfix takes and then answers every RCPT reaching it with `451 4.3.0 Temporary lookup
failure`, and mailflow refuses when it reads the configuration; checked below as the difference it is.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from mailflow.config import load_config
from mailflow.errors import ConfigError
from tests.support import SmtpClient, postfix_instance

pytestmark = pytest.mark.interop

CLIENTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.9")
FILES = {
    "nets": "# who may relay\n!127.0.0.2, 127.0.0.3\n  127.0.0.0/8 # the rest of loopback\n",
    "inner": "127.0.0.3\n",
    "outer": "!/{folder}/inner\n127.0.0.0/8\n",
    "cidr": "# cidr_table(5): any value counts\n127.0.0.2 REJECT\n127.0.0.9/32 OK\n",
    "hash": "127.0.0.3 anything\n127.0.0.9 x\n",
}
FORMS = {  # a name -> the list, `{folder}` where FILES are
    "exclusion first": "!127.0.0.2 127.0.0.0/8",
    "first match wins": "127.0.0.2 !127.0.0.0/8 127.0.0.9",
    "double negation": "!!127.0.0.2 [127.0.0.9]",
    "brackets around the network": "!127.0.0.3 [127.0.0.0/8]",
    "file": "{folder}/nets",
    "excluded file": "!{folder}/inner, 127.0.0.0/8",
    "file naming a file": "{folder}/outer",
    "cidr table": "cidr:{folder}/cidr",
    "excluded cidr table": "!cidr:{folder}/cidr 127.0.0.0/8",
    "texthash table": "texthash:{folder}/hash 127.0.0.1",
}


@pytest.fixture(scope="module")
def folder():
    where = Path(tempfile.mkdtemp(prefix="mailflow-networks-"))
    os.chmod(where, 0o755)  # read by Postfix's smtpd, which runs as postfix
    for name, text in FILES.items():
        (where / name).write_text(text.replace("/{folder}", str(where)))
        os.chmod(where / name, 0o644)
    yield where
    shutil.rmtree(where, ignore_errors=True)


async def relay_replies(port: int) -> dict[str, str]:
    """Each client's reply to RCPT for a remote domain."""
    replies = {}
    for source in CLIENTS:
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        client = await SmtpClient.connect(port, sock=sock)
        for command in ("EHLO client.test", "MAIL FROM:<s@example.org>"):
            assert (await client.cmd(command)).code == 250
        replies[source] = (await client.cmd("RCPT TO:<r@remote.example>")).text
        await client.close()
    return replies


@pytest.mark.parametrize("form", FORMS)
async def test_mynetworks_forms_let_the_same_clients_relay(form, folder, mailflow_server):
    mynetworks = FORMS[form].replace("{folder}", str(folder))
    async with postfix_instance({"mynetworks": mynetworks,
                                 "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination"}) as pf:
        expected = await relay_replies(pf.port)
    mf = await mailflow_server(mynetworks=[mynetworks], smtpd={
        "relay_restrictions": ["permit_mynetworks", "reject_unauth_destination"]})
    assert await relay_replies(mf.smtp_addresses[0][1]) == expected
    assert any(r.startswith("250") for r in expected.values()) and any(r.startswith("554") for r in expected.values())


async def test_host_bits_fail_every_relay_check_in_postfix_and_are_refused_by_mailflow(tmp_path):
    async with postfix_instance({"mynetworks": "127.0.0.1/8",
                                 "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination"}) as pf:
        replies = await relay_replies(pf.port)
        assert set(replies.values()) == {"451 4.3.0 <r@remote.example>: Temporary lookup failure"}
        await pf.logged('mynetworks: non-null host address bits in "127.0.0.1/8"')
    (tmp_path / "mailflow.toml").write_text("mynetworks = ['127.0.0.1/8']\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "mailflow.toml")
    assert caught.value.key == "mynetworks"
    assert "perhaps you should use '127.0.0.0/8' instead" in caught.value.reason

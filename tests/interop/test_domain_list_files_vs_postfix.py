"""Differential test of a domain list's `/file/name` against a private Postfix 3.7: `relay_domains = /file` on both
(Postfix's match_list reads it; mailflow.tables.match_list), with lines as people write them (a first line starting
with a blank, a `#` line, a `#` word after domains, commas, a file naming another), and each candidate domain asked
as a RCPT from a client outside mynetworks under `reject_unauth_destination`: a domain in the list is relayed (250),
another refused (554 Relay access denied). The replies must be the same."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.support import SmtpClient, postfix_instance

pytestmark = pytest.mark.interop

LIST = ("  lead.example\n# hidden.example\na.example, b.example #cut.example c2.example\n"
        "\tc.example\n{folder}/more\n\n")
CANDIDATES = ("lead.example", "hidden.example", "a.example", "b.example", "cut.example", "c2.example", "c.example",
              "more.example", "none.example")


async def rcpt_codes(port: int) -> dict[str, int]:
    codes = {}
    for domain in CANDIDATES:
        client = await SmtpClient.connect(port)
        try:
            assert (await client.cmd("EHLO client.test")).code == 250
            assert (await client.cmd("MAIL FROM:<s@client.test>")).code == 250
            codes[domain] = (await client.cmd(f"RCPT TO:<r@{domain}>")).code
        finally:
            await client.close()
    return codes


@pytest.fixture
def folder():
    path = Path(tempfile.mkdtemp(prefix="mailflow-domains-"))
    os.chmod(path, 0o755)  # (read by the private Postfix's smtpd)
    (path / "more").write_text("more.example\n")
    (path / "list").write_text(LIST.format(folder=path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_a_relay_domains_file_relays_the_domains_postfix_relays(mailflow_server, folder):
    async with postfix_instance({"myhostname": "pf.test", "mydestination": "", "mynetworks": "192.0.2.0/24",
                                 "relay_domains": f"{folder}/list",
                                 "smtpd_relay_restrictions": "reject_unauth_destination"}) as pf:
        theirs = await rcpt_codes(pf.port)
    mf = await mailflow_server(relay_domains=[f"{folder}/list"], mynetworks=[], mydestination=[],
                               smtpd={"relay_restrictions": ["reject_unauth_destination"]})
    ours = await rcpt_codes(mf.smtp_addresses[0][1])
    assert ours == theirs
    assert [domain for domain, code in theirs.items() if code == 250] == [
        "lead.example", "a.example", "b.example", "c.example", "more.example"]


FORMS = "Sub.example\nCase.EXAMPLE\nDot.EXAMPLE.\nbücher.example\nxn--mnchen-3ya.example\n"
FORM_CANDIDATES = ("sub.example", "x.sub.example", "xsub.example", "case.example", "x.CASE.example",
                   "case.example.", "dot.example", "x.dot.example", "xn--bcher-kva.example", "bücher.example",
                   "xn--mnchen-3ya.example", "münchen.example")
# mailflow's deliberate differences (docs/config.md, "Domain names"): an entry is held normalised, as a domain name:
# a trailing dot dropped (Postfix's `Dot.EXAMPLE.` matches nothing) and IDN entries by their A-label (Postfix
# compares the U-label as written, so the A-label form of `bücher.example` is not in its list, and the U-label
# form of an A-label entry is not either).
DELIBERATE = {"dot.example", "x.dot.example", "xn--bcher-kva.example", "münchen.example"}


async def form_codes(port: int) -> dict[str, int]:
    codes = {}
    for domain in FORM_CANDIDATES:
        client = await SmtpClient.connect(port)
        try:
            assert (await client.cmd("EHLO client.test")).code == 250
            utf8 = "" if domain.isascii() else " SMTPUTF8"
            assert (await client.cmd(f"MAIL FROM:<s@client.test>{utf8}")).code == 250
            codes[domain] = (await client.cmd(f"RCPT TO:<r@{domain}>")).code
        finally:
            await client.close()
    return codes


@pytest.mark.parametrize("written", ["in a file", "inline"])
async def test_subdomains_case_a_trailing_dot_and_idn_entries_as_postfix_but_the_deliberate_differences(
        mailflow_server, folder, written):
    """The same entries in a file and written inline give the same replies on each side; they are Postfix's but
    for DELIBERATE, where mailflow relays what Postfix refuses."""
    (folder / "forms").write_text(FORMS)
    inline = FORMS.split()
    async with postfix_instance({"myhostname": "pf.test", "mydestination": "", "mynetworks": "192.0.2.0/24",
                                 "relay_domains": f"{folder}/forms" if written == "in a file" else " ".join(inline),
                                 "smtputf8_enable": "yes",
                                 "smtpd_relay_restrictions": "reject_unauth_destination"}) as pf:
        theirs = await form_codes(pf.port)
    mf = await mailflow_server(relay_domains=[f"{folder}/forms"] if written == "in a file" else inline,
                               mynetworks=[], mydestination=[],
                               smtpd={"relay_restrictions": ["reject_unauth_destination"]})
    ours = await form_codes(mf.smtp_addresses[0][1])
    assert {d: c for d, c in ours.items() if d not in DELIBERATE} == \
        {d: c for d, c in theirs.items() if d not in DELIBERATE}
    assert {d: (ours[d], theirs[d]) for d in DELIBERATE} == {d: (250, 554) for d in DELIBERATE}

"""Differential test: smtp_generic_maps ([smtp] generic_maps) against a private Postfix configured alike. Both relay
every message to one smtp-sink on 127.0.0.1, whose dump shows the MAIL FROM, the RCPT TOs and the header as the
next hop got them; each message's Subject names the server and the probe. The probes are the lookups an admin of a
host with a private domain name meets: the whole address, its extension, @domain and what it keeps, a bare user of
this host's domain, a result without a domain, a value that starts with @domain and goes on (quoted once, as
mail_addr_map quotes it), the null sender, a recipient domain mapped, and the header's sender
and recipient fields (display names, comments, several addresses) beside fields that are not addresses."""
from __future__ import annotations

import re

import aiosmtplib
import pytest

from tests.support.postfix import smtp_sink
from tests.support import eventually, postfix_instance, queue_becomes

pytestmark = pytest.mark.interop

TABLE = ("inline:{ {joe@box.local = joe.user@example.com}, {@box.local = @example.com},"
         " {bob@box.local = @example.net}, {ann@box.local = ann}, {root = admin@example.com},"
         " {@partner.test = @partner.example}, {dan@box.local = Dan <dan.user@example.com>},"
         " {eve@box.local = @example.com, x@other.test} }")
PROBES = [  # (envelope sender, recipients, header lines)
    ("joe@box.local", ["carol@remote.test"], ["From: Joe <joe@box.local>", "To: carol@remote.test"]),
    ("joe+x@box.local", ["sam@partner.test"], ["From: joe+x@box.local (Joe)", "To: Sam <sam@partner.test>"]),
    ("sam+x@box.local", ["carol@remote.test", "dee@partner.test"],
     ["From: sam+x@box.local", 'To: carol@remote.test, "Dee D." <dee@partner.test>', "Cc: bob+y@box.local",
      "Reply-To: root@box.local"]),
    ("bob+other@box.local", ["carol@remote.test"], ["Sender: bob+other@box.local", "From: ann@box.local"]),
    ("root@box.local", ["carol@remote.test"], ["From: root@box.local", "Subject: about root@box.local",
                                               "Message-ID: <1@box.local>", "X-Mailer: joe@box.local"]),
    ("", ["carol@remote.test"], ["From: MAILER-DAEMON@box.local", "To: carol@remote.test"]),
    ("carol@remote.test", ["dave@remote.test"], ["From: carol@remote.test", "To: dave@remote.test"]),
    ("dan@box.local", ["carol@remote.test"], ["From: dan@box.local"]),  # a value with a display name: parsed
    ("carol@remote.test", ["dave@remote.test"],  # a folded field, a group, a quoted local part
     ['To: "Dee D." <dee@partner.test>,\r\n\tfred+x@box.local (Fred),\r\n team: joe@box.local, x@remote.test;',
      'Cc: "odd one"@box.local']),
    ("eve+x@box.local", ["carol@remote.test"], []),  # `@domain, more`: the whole value after the local part
]


async def send_probes(port: int, server: str) -> None:
    for i, (sender, rcpts, header) in enumerate(PROBES):
        content = "\r\n".join([*header, f"Subject: {server}-probe-{i}", "", "joe@box.local in the body", ""])
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10) as client:
            await client.sendmail(sender, rcpts, content.encode())


def received(dump, server: str) -> dict[int, tuple[str, list[str], list[str], str]]:
    """Per probe: MAIL FROM, the RCPT TOs, the probe's header fields (unfolded, blanks squeezed; none that a
    server adds itself) and the body, from the smtp-sink's dump."""
    out = {}
    text = dump.read_text(errors="replace") if dump.exists() else ""
    for message in text.split("X-Client-Addr:")[1:]:
        found = re.search(rf"^Subject: {server}-probe-(\d+)", message, re.MULTILINE)
        if not found:
            continue
        sender = re.search(r"^X-Mail-Args: <(.*?)>", message, re.MULTILINE).group(1)
        rcpts = sorted(re.findall(r"^X-Rcpt-Args: <(.*?)>", message, re.MULTILINE))  # (Postfix's qmgr sorts them)
        head, _, body = message.partition("\n\n")
        fields = re.split(r"\n(?![ \t])", re.sub(r"\r", "", head))
        names = {line.split(":")[0].lower() for line in PROBES[int(found.group(1))][2]}
        kept = [re.sub(r"\s+", " ", f).strip() for f in fields
                if f.split(":")[0].lower() in names and not f.startswith(f"Subject: {server}-probe-")]
        out[int(found.group(1))] = (sender, rcpts, kept, body.strip())
    return out


async def test_generic_maps_match_a_real_postfix(mailflow_server):
    async with smtp_sink() as (sink, dump):
        async with postfix_instance({"myhostname": "box.local", "mydestination": "box.local",
                                     "myorigin": "example.org", "recipient_delimiter": "+",
                                     "relayhost": f"[127.0.0.1]:{sink}", "smtp_generic_maps": TABLE}) as pf:
            await send_probes(pf.port, "pf")
            await pf.queue_empty()
        mf = await mailflow_server(myhostname="box.local", mydestination=["box.local"], myorigin="example.org",
                                   mynetworks=["127.0.0.0/8"], relayhost=f"[127.0.0.1]:{sink}",
                                   smtp={"generic_maps": [TABLE]})
        await send_probes(mf.smtp_addresses[0][1], "mf")
        await queue_becomes(mf.store, {})
        every = set(range(len(PROBES)))
        await eventually(lambda: set(received(dump, "pf")) == every and set(received(dump, "mf")) == every,
                         what="every probe at the sink")
        postfix_got, mailflow_got = received(dump, "pf"), received(dump, "mf")
    for i in every:
        assert mailflow_got[i] == postfix_got[i], PROBES[i]
    # the edges themselves, so that a change in both cannot pass unnoticed
    assert postfix_got[0][:2] == ("joe.user@example.com", ["carol@remote.test"])
    assert postfix_got[1][:3] == ("joe.user@example.com", ["sam@partner.example"],
                                  ["From: joe.user@example.com (Joe)", "To: Sam <sam@partner.example>"])
    assert postfix_got[3][0] == "bob@example.net" and postfix_got[5][0] == ""
    assert postfix_got[4][2][0] == "From: admin@example.com" and postfix_got[4][3] == "joe@box.local in the body"
    assert postfix_got[7][:3] == ("dan.user@example.com", ["carol@remote.test"], ["From: dan.user@example.com"])
    assert postfix_got[9][0] == '"eve@example.com, x"@other.test'

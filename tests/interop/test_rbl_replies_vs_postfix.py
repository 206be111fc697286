"""Differential test of the DNS lists' replies (reject_rbl_client, reject_rhsbl_*): a private Postfix 3.7 and
mailflow ask the same in-process DNS server (Postfix from its own mount namespace, where its resolv.conf names that
server on port 53: tests.support.postfix), with the same default_rbl_reply, rbl_reply_maps and restriction classes;
each session's RCPT reply and the smtpd log lines (reject lines, the warnings of a bad template or reply, the DSN
mapping) are compared word for word: the TXT reason (records joined with " / ", non-printable bytes as spaces, cut
at 500 characters, the reply not cut after it), no reason when the TXT lookup fails, what is named for each rhsbl
item (the whole sender or recipient address), the maps' key (the list as the restriction names it, `domain=filter`
too, and only that in 3.7), $rbl_* and smtpd's macros, the enhanced code fitted to the reply code and to what is
refused, and a reply that is none."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.support import SmtpClient, eventually, postfix_instance

pytestmark = pytest.mark.interop

X200 = "x" * 200
ZONE = f"""
1.0.0.127.in-addr.arpa.   60 IN PTR localhost.
localhost.                60 IN A   127.0.0.1
1.0.0.127.bl.test.        60 IN A   127.0.0.2
1.0.0.127.bl.test.        60 IN TXT "Listed; see http://bl.test/?127.0.0.1"
1.0.0.127.multi.test.     60 IN A   127.0.0.2
1.0.0.127.multi.test.     60 IN TXT "first"
1.0.0.127.multi.test.     60 IN TXT "second"
1.0.0.127.notxt.test.     60 IN A   127.0.0.2
1.0.0.127.txtfail.test.   60 IN A   127.0.0.2
1.0.0.127.txtfail.test.   60 IN TXT "never seen"
1.0.0.127.odd.test.       60 IN A   127.0.0.2
1.0.0.127.odd.test.       60 IN TXT "tab\\011bell\\007 100% $x"
1.0.0.127.long.test.      60 IN A   127.0.0.2
1.0.0.127.long.test.      60 IN TXT "{X200}"
1.0.0.127.long.test.      60 IN TXT "{X200}"
1.0.0.127.long.test.      60 IN TXT "{X200}"
1.0.0.127.mapped.test.    60 IN A   127.0.0.3
1.0.0.127.mapped.test.    60 IN TXT "mapped reason"
1.0.0.127.ten.test.       60 IN A   10.0.0.2
1.0.0.127.ten.test.       60 IN TXT "outside 127"
spam.test.rhs.test.       60 IN A   127.0.0.2
spam.test.rhs.test.       60 IN TXT "domain listed"
local.test.rhs.test.      60 IN A   127.0.0.2
localhost.rhs.test.       60 IN A   127.0.0.2
localhost.rhs.test.       60 IN TXT "client name listed"
"""
SERVFAIL = ("1.0.0.127.txtfail.test/TXT",)
MACROS = ("$rbl_code 4.7.9 [$rbl_class] [$rbl_what] [$rbl_domain] [$rbl_reason] [$rbl_txt] $client_address "
          "$client_name $helo_name $sender $recipient_domain $server_name ${rbl_reason?yes}${rbl_reason:no}")
REPLY_MAPS = f"""
mapped.test=127.0.0.3  {MACROS}
mapped.test            550 the domain's entry
keyed.test=127.0.0.2   550 5.1.1 asked with the filter
keyed.test             550 for the list named without a filter
nodsn.test             451 only text, 4.7.1 added
classfix.test          554 4.7.0 the enhanced code takes the reply code's class
notareply.test         hello $rbl_code
badtemplate.test       554 ${{rbl_reason
forms.test             554 ${{rbl_reason?{{has $rbl_reason}}:{{none}}}} ${{rbl_txt:{{no}}}}
 ${{{{$rbl_code}}=={{554}}?{{eq}}:{{ne}}}}
 ${{{{$rbl_what}} != {{127.0.0.1}} ? {{other}} : {{this}}}} [${{{{$rbl_code}} < {{60}}}}] ${{rbl_reason?{{r}}:rr}}
noreason.test          554 ${{rbl_reason?{{has $rbl_reason}}:{{none}}}} ${{{{$rbl_code}}>{{60}}}}
"""
CLASSES = {  # a restriction class per case; the session's sender names it
    "bl": "reject_rbl_client bl.test",
    "multi": "reject_rbl_client multi.test",
    "notxt": "reject_rbl_client notxt.test",
    "txtfail": "reject_rbl_client txtfail.test",
    "odd": "reject_rbl_client odd.test",
    "long": "reject_rbl_client long.test",
    "mapped": "reject_rbl_client mapped.test=127.0.0.3",
    "mappeddomain": "reject_rbl_client mapped.test",
    "ranged": "reject_rbl_client mapped.test=127.0.0.[2..4]",  # ip_match's forms (Mail-in-a-Box's [2..11])
    "listed": "reject_rbl_client mapped.test=127.0.[0;9].[1;3;5]",
    "bracketed": "reject_rbl_client mapped.test=[127.0.0.[3..4]]",  # ip_match drops brackets around it all
    "zeros": "reject_rbl_client mapped.test=127.0.0.003",  # and reads leading zeros
    "tenfiltered": "reject_rbl_client ten.test=10.0.0.[1..2]",  # a filter alone decides (rbl_match_addr)
    "ten": "reject_rbl_client ten.test",  # and without one any A record lists (not only 127.x)
    "keyed": "reject_rbl_client keyed.test=127.0.0.2",
    "unkeyed": "reject_rbl_client keyed.test",
    "nodsn": "reject_rbl_client nodsn.test",
    "classfix": "reject_rbl_client classfix.test",
    "notareply": "reject_rbl_client notareply.test",
    "badtemplate": "reject_rbl_client badtemplate.test",
    "forms": "reject_rbl_client forms.test",  # Postfix 3's {text} operands, ?: both and relational forms
    "noreason": "reject_rbl_client noreason.test",
    "rhssender": "reject_rhsbl_sender rhs.test",
    "rhshelo": "reject_rhsbl_helo rhs.test",
    "rhsrecipient": "reject_rhsbl_recipient rhs.test",
    "rhsclient": "reject_rhsbl_client rhs.test",
    "rhsreverse": "reject_rhsbl_reverse_client rhs.test",
}
# the lists whose replies come from the maps, each listing the client with its name as the reason
MAPPED_ZONE = "\n".join(f"1.0.0.127.{name}.test. 60 IN A 127.0.0.2\n1.0.0.127.{name}.test. 60 IN TXT \"{name}\""
                         for name in ("keyed", "nodsn", "classfix", "notareply", "badtemplate", "forms")) + \
    "\n1.0.0.127.noreason.test. 60 IN A 127.0.0.2"
SENDERS = {name: f"{name}@spam.test" for name in CLASSES}
ACCESS = "inline:{ " + ", ".join(f"{sender}={name}" for name, sender in SENDERS.items()) + " }"


async def replies(port: int) -> dict[str, str]:
    answers = {}
    for name, sender in SENDERS.items():
        client = await SmtpClient.connect(port)
        try:
            assert (await client.cmd("EHLO spam.test")).code == 250
            assert (await client.cmd(f"MAIL FROM:<{sender}>")).code == 250
            answers[name] = (await client.cmd("RCPT TO:<alice@local.test>")).text
        finally:
            await client.close()
    return answers


WANTED = ("NOQUEUE: reject: ", "rbl response code", "rbl_reject_reply: bad rbl reply", "mapping DSN status")


def smtpd_lines(lines) -> list[str]:
    """smtpd's reject lines and the warnings of the rbl replies, without syslog's prefix nor `warning: `."""
    picked = [(line.split("]: ", 1)[1] if "/smtpd[" in line else line).removeprefix("warning: ") for line in lines]
    return sorted(line for line in picked if line.startswith(WANTED))


@pytest.fixture
def reply_maps():
    folder = Path(tempfile.mkdtemp(prefix="mailflow-rbl-"))
    os.chmod(folder, 0o755)  # (read by the private Postfix's smtpd)
    (folder / "rbl_replies").write_text(REPLY_MAPS)
    yield f"texthash:{folder}/rbl_replies"
    shutil.rmtree(folder, ignore_errors=True)


async def test_dnsbl_replies_match_a_real_postfix_word_for_word(mailflow_server, private_dns_zone, reply_maps, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    address = private_dns_zone(ZONE + MAPPED_ZONE, servfail=SERVFAIL)
    async with postfix_instance({
        "myhostname": "pf.test", "mydestination": "local.test", "local_recipient_maps": "inline:{alice=ok}",
        "smtpd_restriction_classes": ", ".join(CLASSES), **CLASSES,
        "smtpd_sender_restrictions": f"check_sender_access {ACCESS}", "rbl_reply_maps": reply_maps,
    }, nameserver=address) as pf:
        postfix = await replies(pf.port)
        # (Postfix's smtpd logs through postlogd: the last session's line may come after its last reply)
        await eventually(lambda: pf.maillog.count("NOQUEUE: reject: ") >= len(CLASSES),
                         what="a reject line a session in the private Postfix's log")
        postfix_logged = smtpd_lines(pf.maillog.splitlines())
    mf = await mailflow_server(myhostname="pf.test", mydestination=["local.test"],
                               dns={"nameservers": [f"{address}:53"], "timeout": "2s", "tries": 1},
                               smtpd={"restriction_classes": {name: [item] for name, item in CLASSES.items()},
                                      "sender_restrictions": [f"check_sender_access {ACCESS}"],
                                      "rbl_reply_maps": [reply_maps]})
    mailflow = await replies(mf.smtp_addresses[0][1])
    assert {name: (postfix[name], mailflow[name]) for name in CLASSES if postfix[name] != mailflow[name]} == {}
    assert smtpd_lines(r.getMessage() for r in caplog.records) == postfix_logged
    # what Postfix said, so that the same mistake on both sides cannot pass unnoticed
    assert postfix["bl"] == ("554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using bl.test; "
                             "Listed; see http://bl.test/?127.0.0.1")
    assert postfix["multi"].endswith("blocked using multi.test; first / second")
    assert postfix["txtfail"].endswith("blocked using txtfail.test")
    assert postfix["rhssender"] == ("554 5.7.1 Service unavailable; Sender address [rhssender@spam.test] blocked "
                                    "using rhs.test; domain listed")
    assert postfix["long"].endswith(f"long.test; {X200} / {X200} / {X200[:94]}")  # 500 characters, whole
    assert postfix["notareply"] == "450 4.7.1 Service unavailable"
    assert postfix["keyed"] == "550 5.0.0 asked with the filter"  # (5.1.1 names an address, not a client)
    assert postfix["unkeyed"] == "550 5.7.1 for the list named without a filter"
    assert postfix["forms"] == "554 5.7.1 has forms  eq this [] r"  # ($rbl_txt is not empty)
    assert postfix["noreason"] == "554 5.7.1 none true"
    assert postfix["ranged"] == postfix["listed"] == ("554 5.7.1 Service unavailable; Client host [127.0.0.1] "
                                                      "blocked using mapped.test; mapped reason")
    assert postfix["mapped"] == ("554 5.7.9 [Client host] [127.0.0.1] [mapped.test] [mapped reason] [mapped reason] "
                                 "127.0.0.1 localhost spam.test mapped@spam.test local.test pf.test yes")

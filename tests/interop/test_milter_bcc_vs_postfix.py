"""Differential test of the header fields a milter adds that message_drop_headers names (Bcc, Resent-Bcc), against
a real Postfix 3.7: the same milter edits through a private Postfix and through mailflow, each relaying to its own
smtp-sink; compared: the header fields the sink got below the relay's Received field (Message-ID and Date masked),
sorted, and the Bcc fields in order.

Postfix's cleanup removes message_drop_headers as it reads the message's own header section, before its milters
run; the fields a milter adds (SMFIR_ADDHEADER, SMFIR_INSHEADER) are written to the queue file after that
(cleanup_milter.c) and kept, and a milter's Resent-Bcc makes no message a resent one (it gets Message-Id and Date,
not Resent-*). Left different (sorted away): where the fields go. Postfix writes an added field after the
Message-Id and Date it adds, and an inserted one where its index says (0: above its own Received); mailflow's
cleanup adds those and its Received after the milters ran, and puts the Bcc fields last.
"""
from __future__ import annotations

import re
import struct

import pytest

from tests.support import eventually, postfix_instance, send_probe
from tests.support.milters import reply, scripted_milter
from tests.support.postfix import dumped_messages, smtp_sink

pytestmark = pytest.mark.interop

COMMON = {"myhostname": "mx.origin.test", "myorigin": "origin.test"}
EDITS = {b"E": reply(b"h", b"Bcc\0added@x.test\0") + reply(b"h", b"X-Added\0yes\0")
         + reply(b"i", struct.pack("!I", 0) + b"Resent-Bcc\0ins@x.test\0")
         + reply(b"m", struct.pack("!I", 1) + b"X-Changed\0now\0") + reply(b"c")}
MESSAGE = "Subject: probe-0\r\nFrom: x@y.test\r\nTo: r@remote.test\r\nBcc: own@x.test\r\nX-Changed: before\r\n\r\nbody"


def header_fields(dump) -> list[str] | None:
    """The fields of the probe's header section but the Received ones, unfolded, Message-ID and Date masked."""
    for message in dumped_messages(dump):
        if "Subject: probe-0" in message:
            head = message.split("\n\n", 1)[0].split("\nReceived: ", 1)[1]
            fields = re.split(r"\n(?![ \t])", "Received: " + head)
            return [re.sub(r"^(Message-I[Dd]|Date): .*", r"\1: *", f, flags=re.S).replace("Message-Id", "Message-ID")
                    for f in fields if not f.startswith("Received:")]
    return None


async def test_milter_added_bcc_fields_are_kept_as_postfix_keeps_them(mailflow_server):
    async with scripted_milter(EDITS) as milter, smtp_sink() as (pf_sink, pf_dump), \
            smtp_sink() as (mf_sink, mf_dump):
        async with postfix_instance({**COMMON, "smtpd_milters": milter.spec, "mydestination": "",
                                     "relayhost": f"[127.0.0.1]:{pf_sink}"}) as pf:
            assert await send_probe(pf.port, "s@remote.test", ["r@remote.test"], MESSAGE) == 250
            postfix = await eventually(lambda: header_fields(pf_dump), timeout=20)
        mf = await mailflow_server(**COMMON, relayhost=f"[127.0.0.1]:{mf_sink}", mynetworks=["127.0.0.0/8"],
                                   mydestination=[], smtpd={"listen": ["127.0.0.1:0"], "milters": [milter.spec]},
                                   milter={"command_timeout": "2s", "content_timeout": "2s"})
        assert await send_probe(mf.smtp_addresses[0][1], "s@remote.test", ["r@remote.test"], MESSAGE) == 250
        mailflow = await eventually(lambda: header_fields(mf_dump), timeout=20)
    assert sorted(mailflow) == sorted(postfix)
    assert sorted(postfix) == ["Bcc: added@x.test", "Date: *", "From: x@y.test", "Message-ID: *",
                               "Resent-Bcc: ins@x.test", "Subject: probe-0", "To: r@remote.test", "X-Added: yes",
                               "X-Changed: now"]  # (the message's own Bcc removed; not made a resent one)
    assert mailflow[-2:] == ["Resent-Bcc: ins@x.test", "Bcc: added@x.test"]  # (after cleanup's, in the milter's order)

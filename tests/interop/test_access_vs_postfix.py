"""Differential tests of access(5) tables and header/body checks against a private Postfix 3.7, both servers
configured alike:
- the same access table behind check_client_access, check_helo_access, check_sender_access and
  check_recipient_access: each action must give the same reply (code, enhanced code and text, word for word),
  do the same to the message (delivered, held, discarded, redirected, filtered, a header prepended) and log
  WARN, INFO, HOLD, DISCARD, REDIRECT, BCC and FILTER alike (at the RCPT, word for word); and the key forms the
  tables test (test_tables_vs_postfix.py) leaves out;
- the same header_checks and body_checks (regexp): the reply at the end of DATA, the delivered copy, the hold
  queue and cleanup's log lines;
- the same restriction classes (smtpd_restriction_classes), named in a list and as access table values.

One Postfix instance serves the module; each test runs its sessions against it, then against a mailflow.

Not compared, because mailflow differs on purpose (docs/security.md, docs/filtering.md): an access action
neither server knows (`451 4.3.5 <x>: ... rejected: Server configuration error`, Postfix without the prefix);
a HELO name with a trailing dot (checked below as the difference it is).
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest

from mailflow.logs import printable
from tests.support import SmtpClient, end_of_data_replies, eventually, free_port, postfix_instance

pytestmark = pytest.mark.interop

ACTIONS = {  # a probe's name -> the action its table entry answers with
    "ok": "OK", "digits": "1234567890", "dunno": "DUNNO", "reject": "REJECT", "reject-text": "REJECT go away",
    "reject-dsn": "REJECT 5.1.2 bad system", "reject-4dsn": "REJECT 4.1.1 wrong class",
    "reject-other-dsn": "REJECT 5.7.2 not an address status", "r4nn": "450 try later", "r5nn": "550 no thanks",
    "r5nn-dsn": "553 5.1.3 bad syntax", "r4nn-dsn": "451 4.1.8 not now", "r4nn-wrong": "450 5.7.2 wrong class",
    "r5nn-only": "550", "defer": "DEFER", "defer-text": "DEFER come back", "defer-dsn": "DEFER 4.1.1 later",
    "defer-if-permit": "DEFER_IF_PERMIT 4.1.2 maybe", "lower-reject": "reject lower", "hold": "HOLD held text",
    "discard": "DISCARD dropped text", "warn": "WARN careful", "filter": "FILTER smtp:[127.0.0.1]:{filter}",
    "redirect": "REDIRECT other@relay.test", "bcc": "BCC copy@relay.test", "prepend": "PREPEND X-Access: yes",
    "mynetworks": "permit_mynetworks", "info": "INFO for the log", "r5nn-2dsn": "550 2.1.1 gone",
}
NOT_DELIVERED = ("hold", "discard")
KINDS = ("client", "helo", "sender", "recipient")


def table_text(filter_port: int) -> str:
    """One entry per probe and kind: the client 192.0.2.N (through XCLIENT), the HELO name N.helo.test, the
    sender N@sender.test, the recipient N@relay.test."""
    lines = []
    for n, (name, action) in enumerate(ACTIONS.items(), start=1):
        action = action.format(filter=filter_port)
        lines += [f"192.0.2.{n} {action}", f"{name}.helo.test {action}", f"{name}@sender.test {action}",
                  f"{name}@relay.test {action}"]
    lines += ["<> REJECT null sender", "user@ REJECT user at", "sub.parent.test OK", "parent.test REJECT parent"]
    return "\n".join(lines) + "\n"


def probe_session(kind: str, n: int, name: str) -> list[str]:
    helo = f"{name}.helo.test" if kind == "helo" else "client.test"
    sender = f"{name}@sender.test" if kind == "sender" else "s@remote.test"
    rcpt = f"{name}@relay.test" if kind == "recipient" else "plain@relay.test"
    xclient = [f"XCLIENT ADDR=192.0.2.{n} NAME=[UNAVAILABLE]"] if kind == "client" else []
    return ["EHLO client.test", *xclient, f"EHLO {helo}", f"MAIL FROM:<{sender}>", f"RCPT TO:<{rcpt}>"]


async def run_sessions(port: int) -> dict[str, list[str]]:
    """Each probe's session: the replies from MAIL on (the queue id masked), then its message if RCPT got 250."""
    got = {}
    for kind in KINDS:
        for n, name in enumerate(ACTIONS, start=1):
            async with await SmtpClient.connect(port) as client:
                replies = [await client.cmd(command) for command in probe_session(kind, n, name)][-2:]
                if replies[-1].code == 250:
                    assert (await client.cmd("DATA")).code == 354
                    content = f"Subject: {kind} {name}\r\n\r\nbody\r\n.".encode()
                    queued = await client.cmd(content)
                    replies.append(queued.code if queued.code != 250 else 250)
            got[f"{kind} {name}"] = [r if isinstance(r, int) else r.text for r in replies]
    return got


def delivered(*peers) -> dict[str, tuple]:
    """Subject -> (which peer, the recipients, the X- header fields) of every message the peers got."""
    out = {}
    for which, peer in enumerate(peers):
        for message in peer.messages:
            head = message.content.split(b"\r\n\r\n")[0].decode()
            subject = next(line for line in head.splitlines() if line.startswith("Subject: "))[9:]
            out[subject] = (which, sorted(message.rcpt_tos), [l for l in head.splitlines() if l.startswith("X-")])
    return out


def expected_deliveries(replies: dict[str, list]) -> int:
    return sum(1 for probe, r in replies.items() if r[-1] == 250 and probe.split()[1] not in NOT_DELIVERED)


def postfix_held(pf) -> list[tuple[str, list[str]]]:
    """(sender, recipients) of each message in the hold queue, which is emptied for the next test."""
    listed = pf.listed()
    pf.run("postsuper", "-d", "ALL", "hold")
    return sorted((m["sender"], sorted(r["address"] for r in m["recipients"]))
                  for m in listed if m["queue_name"] == "hold")


def mailflow_held(db: Path) -> list[tuple[str, list[str]]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute("SELECT m.id, m.sender, r.address FROM message m JOIN recipient r ON r.message_id = m.id "
                           "WHERE m.queue = 'hold'").fetchall()
    finally:
        con.close()
    held: dict[str, tuple[str, list[str]]] = {}
    for queue_id, sender, rcpt in rows:
        held.setdefault(queue_id, (sender, []))[1].append(rcpt)
    return sorted((sender, sorted(rcpts)) for sender, rcpts in held.values())


HEADER_CHECKS = """\
/^Subject: hc-reject$/ REJECT header says no
/^Subject: hc-reject-plain$/ REJECT
/^Subject: hc-reject-dsn$/ REJECT 5.7.9 with a code
/^Subject: hc-reject-4dsn$/ REJECT 4.7.9 come back
/^Subject: hc-warn$/ WARN watch it
/^Subject: hc-info$/ INFO noted
/^Subject: hc-hold$/ HOLD held by header
/^Subject: hc-discard$/ DISCARD dropped by header
/^Subject: hc-redirect$/ REDIRECT other@relay.test
/^Subject: hc-filter$/ FILTER smtp:[127.0.0.1]:{filter}
/^Subject: hc-bcc$/ BCC copy@relay.test
/^Subject: hc-prepend$/ PREPEND X-Prepended: yes
/^Subject: hc-prepend-bad$/ PREPEND not a header
/^Subject: hc-replace$/ REPLACE X-Replaced: yes
/^Subject: hc-replace-bad$/ REPLACE not a header
/^X-Drop:/ IGNORE
/^Subject: hc-dunno$/ DUNNO
/^X-Folded: a b$/ REJECT folded matched unfolded
/^X-Folded: a$/ REJECT folded matched first line
/^X-Dot: a..b$/ REJECT dot matched the break
/^ second$/m WARN a line of a folded header
/^X-Fold-Prepend: a/ PREPEND X-Before: folded
if /^Subject: hc-if/
/-inner$/ REJECT inside if
endif
/^subject: HC-CASE$/ REJECT case-insensitive
/^Content-Type: application\\/x-bad/ REJECT mime part header
/^X-Nested: bad/ REJECT nested header
/^X-Action: discard$/ DISCARD stop here
/^X-Action: redirect$/ REDIRECT other@relay.test
/^X-Action: pass$/ PASS trusted
/^X-Action: hold$/ HOLD first hold
/^X-Action: hold2$/ HOLD second hold
/^X-Then: reject$/ REJECT after the stop
/^X-Bcc: 1$/ BCC copy1@relay.test
/^X-Bcc: 2$/ BCC copy2@relay.test
/^X-Bcc: bad$/ BCC not-an-address
"""
BODY_CHECKS = """\
/^body-reject$/ REJECT body says no
/^body-replace$/ REPLACE replaced line
/^body-prepend$/ PREPEND prepended line
/^body-ignore$/ IGNORE
/^Ym9keS1iYXNlNjQ=$/ REJECT base64 seen
/^body-warn$/ WARN body watch
/^body-after-stop$/ REJECT body after the stop
"""


CLASSES = {  # smtpd_restriction_classes; `{folder}`: where the tables are
    "rcpt_class": "check_sender_access texthash:{folder}/classes", "permit_class": "permit",
    "reject_class": "reject", "strict_class": "reject_non_fqdn_helo_hostname",
    "nested_class": "strict_class, permit_class", "loop_class": "check_sender_access texthash:{folder}/classes",
}
CLASS_TABLE = {  # the sender -> its entry in `classes`, which rcpt_class looks up
    "permit": "permit_class", "strict": "strict_class", "nested": "nested_class", "reject": "reject_class",
    "list": "reject_non_fqdn_helo_hostname defer", "loop": "loop_class", "undefined": "no_such_class",
    "table": "check_helo_access texthash:/nonexistent",
}
AFTER_TABLE = "permit@class.test REJECT after the class\nnested@class.test REJECT after the class\n" \
    "strict@class.test REJECT after the class\n"  # asked after rcpt_class: reached only if it had no opinion
CLASS_SESSIONS = [(sender, helo) for sender in CLASS_TABLE for helo in ("client.test", "client")]


def write_class_tables(folder: Path) -> dict[str, str]:
    """The classes' tables in `folder`; the classes, naming those tables."""
    (folder / "classes").write_text("".join(f"{s}@class.test {v}\n" for s, v in CLASS_TABLE.items()))
    (folder / "after").write_text(AFTER_TABLE)
    return {name: value.replace("{folder}", str(folder)) for name, value in CLASSES.items()}


@pytest.fixture(scope="module")
def postfix():
    """One private Postfix for the module: access tables in every list, relaying relay.test to a peer on
    `ports["relay"]`, FILTER actions to one on `ports["filter"]` (each test listens on them while it runs)."""
    folder = Path(tempfile.mkdtemp(prefix="mailflow-access-"))
    os.chmod(folder, 0o755)
    ports = {"relay": free_port(), "filter": free_port()}
    (folder / "access").write_text(table_text(ports["filter"]))
    (folder / "header").write_text(HEADER_CHECKS.replace("{filter}", str(ports["filter"])))
    (folder / "body").write_text(BODY_CHECKS)
    classes = write_class_tables(folder)
    instance = postfix_instance({
        "myhostname": "pf.test", "mydestination": "local.test", "relay_domains": "relay.test",
        "relayhost": f"[127.0.0.1]:{ports['relay']}", "notify_classes": "",
        "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
        "header_checks": f"regexp:{folder}/header", "body_checks": f"regexp:{folder}/body",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        **{f"smtpd_{kind}_restrictions": f"check_{kind}_access texthash:{folder}/access" for kind in KINDS},
        "smtpd_recipient_restrictions": f"check_recipient_access texthash:{folder}/access, rcpt_class, "
                                        f"check_sender_access texthash:{folder}/after",
        "smtpd_restriction_classes": ", ".join(classes), **classes,
    })
    loop = asyncio.new_event_loop()
    pf = loop.run_until_complete(instance.__aenter__())
    try:
        yield pf, ports
    finally:
        loop.run_until_complete(instance.__aexit__(None, None, None))
        loop.close()
        shutil.rmtree(folder, ignore_errors=True)


LOGGED = ("warn", "info", "hold", "discard", "redirect", "bcc", "filter")  # the actions smtpd logs


def dsn_mappings(lines) -> list[str]:
    """smtpd_dsn_fix's lines (`mapping DSN status 2.1.1 into Sender address status 2.1.7`), without syslog's
    prefix."""
    return sorted(line.split("]: ", 1)[-1] for line in lines if "mapping DSN status" in line)


def logged(lines, *actions: str, filter_port: int = 0) -> list[str]:
    """The log lines of these access actions (`NOQUEUE: warn: RCPT from ...`), without syslog's prefix, the FILTER
    actions' port as `{filter}`."""
    return sorted((line.split("]: ", 1)[-1] if "/smtpd[" in line else line).replace(f":{filter_port};", ":{filter};")
                  for line in lines if any(f"NOQUEUE: {action}: " in line for action in actions))


async def test_access_actions_reply_and_act_as_postfix_does(postfix, mailflow_server, smtp_peer, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    pf, ports = postfix
    pf_relay, pf_filter = await smtp_peer(port=ports["relay"]), await smtp_peer(port=ports["filter"])
    offset = await pf.sessions_ended()
    pf_replies = await run_sessions(pf.port)
    pf_log = await pf.logged("disconnect from", count=len(pf_replies), since=offset)  # (every session's lines)
    await eventually(lambda: len(delivered(pf_relay, pf_filter)) >= expected_deliveries(pf_replies), timeout=20)
    pf_fates, pf_held = delivered(pf_relay, pf_filter), postfix_held(pf)

    mf_relay, mf_filter = await smtp_peer(), await smtp_peer()
    (tmp_path / "access").write_text(table_text(mf_filter.port))
    mf = await mailflow_server(mydestination=["local.test"], relayhost=f"[127.0.0.1]:{mf_relay.port}",
                               mynetworks=["127.0.0.0/8"], smtpd={
        "authorized_xclient_hosts": ["127.0.0.0/8"],
        "relay_restrictions": ["permit_mynetworks", "reject_unauth_destination"],
        **{f"{kind}_restrictions": [f"check_{kind}_access texthash:{tmp_path}/access"] for kind in KINDS}})
    mf_replies = await run_sessions(mf.smtp_addresses[0][1])
    await eventually(lambda: len(delivered(mf_relay, mf_filter)) >= expected_deliveries(mf_replies), timeout=20)

    assert {p: (pf_replies[p], mf_replies[p]) for p in pf_replies if pf_replies[p] != mf_replies[p]} == {}
    assert delivered(mf_relay, mf_filter) == pf_fates
    assert mailflow_held(tmp_path / "queue" / "queue.db") == pf_held
    pf_logged = logged(pf_log.splitlines(), *LOGGED, filter_port=ports["filter"])
    assert logged((r.getMessage() for r in caplog.records), *LOGGED, filter_port=mf_filter.port) == pf_logged
    pf_mappings = dsn_mappings(pf_log.splitlines())
    assert dsn_mappings(r.getMessage() for r in caplog.records) == pf_mappings
    # what Postfix did, so that the same mistake on both sides cannot pass unnoticed
    assert pf_replies["sender reject-dsn"][1] == \
        "554 5.1.8 <reject-dsn@sender.test>: Sender address rejected: bad system"  # smtpd_dsn_fix
    assert pf_replies["helo reject-dsn"][1] == "554 5.0.0 <reject-dsn.helo.test>: Helo command rejected: bad system"
    assert pf_replies["client r4nn-dsn"][1] == \
        "451 4.0.0 <unknown[192.0.2.12]>: Client host rejected: not now"
    assert pf_replies["recipient r4nn-dsn"][1] == "451 4.1.2 <r4nn-dsn@relay.test>: Recipient address rejected: not now"
    assert pf_fates["recipient prepend"] == (0, ["prepend@relay.test"], ["X-Access: yes"])
    assert len(pf_held) == 4
    assert "NOQUEUE: warn: RCPT from unknown[192.0.2.22]: careful; from=<s@remote.test> to=<plain@relay.test> " \
        "proto=ESMTP helo=<client.test>" in pf_logged
    assert "NOQUEUE: hold: RCPT from unknown[192.0.2.20]: <unknown[192.0.2.20]>: Client host held text; " \
        "from=<s@remote.test> to=<plain@relay.test> proto=ESMTP helo=<client.test>" in pf_logged
    assert "NOQUEUE: filter: RCPT from localhost[127.0.0.1]: <filter@relay.test>: Recipient address triggers " \
        "FILTER smtp:[127.0.0.1]:{filter}; from=<s@remote.test> to=<filter@relay.test> proto=ESMTP " \
        "helo=<client.test>" in pf_logged
    assert pf_replies["recipient info"][1] == "250 2.1.5 Ok" and len(pf_logged) == 8 + 4 * 5
    # a numeric action's status is fitted with its own class, then takes the reply code's
    assert "mapping DSN status 2.1.1 into Sender address status 2.1.7" in pf_mappings
    assert pf_replies["sender r5nn-2dsn"][1] == "550 5.1.7 <r5nn-2dsn@sender.test>: Sender address rejected: gone"


CONTENT = {  # a message's name -> its header fields and body
    **{name: (f"Subject: {name}\r\n", "body\r\n") for name in (
        "hc-reject", "hc-reject-plain", "hc-reject-dsn", "hc-reject-4dsn", "hc-warn", "hc-info", "hc-hold",
        "hc-discard", "hc-redirect", "hc-filter", "hc-prepend", "hc-prepend-bad", "hc-replace", "hc-replace-bad",
        "hc-dunno", "hc-if-inner", "HC-CASE")},
    "ignore": ("Subject: ignore\r\nX-Drop: me\r\nX-Keep: me\r\n", "body\r\n"),
    "mime-part": ("Subject: mime-part\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n",
                  "--XX\r\nContent-Type: text/plain\r\n\r\nfirst\r\n--XX\r\nContent-Type: application/x-bad\r\n"
                  "\r\nsecond\r\n--XX--\r\n"),
    "nested": ("Subject: nested\r\nMIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n",
               "X-Nested: bad\r\nSubject: inner\r\n\r\ninner body\r\n"),
    "body-reject": ("Subject: body-reject\r\n", "first\r\nbody-reject\r\n"),
    "body-edits": ("Subject: body-edits\r\n", "body-replace\r\nbody-prepend\r\nbody-ignore\r\nbody-warn\r\nend\r\n"),
    "base64": ("Subject: base64\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
               "Content-Transfer-Encoding: base64\r\n", "Ym9keS1iYXNlNjQ=\r\n"),
    # DISCARD, REDIRECT and PASS stop the checks: a later header or body line is not looked up
    **{f"{action}-stops": (f"Subject: {action}-stops\r\nX-Action: {action}\r\nX-Then: reject\r\n",
                           "body-after-stop\r\n") for action in ("discard", "redirect", "pass")},
    "two-holds": ("Subject: two-holds\r\nX-Action: hold\r\nX-Action: hold2\r\n", "body\r\n"),  # the first only
    "bccs": ("Subject: bccs\r\nX-Bcc: 1\r\nX-Bcc: 2\r\nX-Bcc: 1\r\nX-Bcc: bad\r\n", "body\r\n"),
    "bcc-then-redirect": ("Subject: bcc-then-redirect\r\nX-Bcc: 1\r\nX-Action: redirect\r\n", "body\r\n"),
    # a folded header is matched with its line breaks kept (POSIX regexec: `.` matches one, unless the m flag)
    "folded-space": ("Subject: folded-space\r\nX-Folded: a\r\n b\r\n", "body\r\n"),
    "folded-dot": ("Subject: folded-dot\r\nX-Dot: a\r\n\tb\r\n", "body\r\n"),
    "folded-m": ("Subject: folded-m\r\nX-Multi: first\r\n second\r\n", "body\r\n"),
    "folded-prepend": ("Subject: folded-prepend\r\nX-Fold-Prepend: a\r\n b\r\n", "body\r\n"),
    "bcc-then-reject": ("Subject: bcc-then-reject\r\nX-Bcc: 2\r\nX-Then: reject\r\n", "body\r\n"),
}


CONTENT_NOT_DELIVERED = ("hc-hold", "hc-discard", "discard-stops", "two-holds")


async def send_contents(port: int) -> dict[str, str]:
    """Each message's reply at the end of DATA (the queue id masked)."""
    replies = await end_of_data_replies(port, {name: f"{head}\r\n{body}".encode()
                                               for name, (head, body) in CONTENT.items()})
    return {name: "250 queued" if reply.code == 250 else reply.text for name, reply in replies.items()}


def copies(*peers) -> dict[str, tuple]:
    """Subject -> (which peer, recipients, the header fields but those each server adds, the body)."""
    out = {}
    for which, peer in enumerate(peers):
        for message in peer.messages:
            head, _, body = message.content.decode().replace("\r\n", "\n").partition("\n\n")
            fields = [f for f in head.replace("\n ", " ").replace("\n\t", " ").split("\n")
                      if not f.split(":")[0].lower() in ("received", "message-id", "date", "from", "to")]
            subject = next((f for f in fields if f.startswith("Subject: ")), "Subject: ?")[9:]
            out[subject] = (which, sorted(message.rcpt_tos), fields, body)
    return out


def cleanup_logged(lines, filter_port: int) -> list[str]:
    """The actions' log lines (`QID: reject: header ...`), the queue id and syslog's prefix left out; made printable
    as mailflow's log formatter writes them (a folded header's line break is `?`, as in Postfix's log)."""
    found = (re.match(r"(?:.*/cleanup\[\d+\]: )?[0-9A-F]+: ((?:reject|warning|info|hold|discard|redirect|filter|bcc"
                      r"|prepend|replace|ignore): (?:header|body) .*)", printable(line)) for line in lines)
    return sorted(m.group(1).replace(str(filter_port), "{filter}") for m in found if m)


async def test_header_and_body_checks_act_as_postfixs_do(postfix, mailflow_server, smtp_peer, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.cleanup")
    pf, ports = postfix
    pf_relay, pf_filter = await smtp_peer(port=ports["relay"]), await smtp_peer(port=ports["filter"])
    offset = await pf.sessions_ended()
    pf_replies = await send_contents(pf.port)
    # (cleanup's lines of a message reach postlogd before smtpd's disconnect line of its session)
    pf_log = await pf.logged("disconnect from", count=len(pf_replies), since=offset)
    expected = sum(reply == "250 queued" for reply in pf_replies.values()) - len(CONTENT_NOT_DELIVERED)
    pf_copies = await eventually(lambda: len(copies(pf_relay, pf_filter)) >= expected and copies(pf_relay, pf_filter),
                                 timeout=20)
    pf_held = postfix_held(pf)

    mf_relay, mf_filter = await smtp_peer(), await smtp_peer()
    (tmp_path / "header").write_text(HEADER_CHECKS.replace("{filter}", str(mf_filter.port)))
    (tmp_path / "body").write_text(BODY_CHECKS)
    mf = await mailflow_server(mydestination=["local.test"], relayhost=f"[127.0.0.1]:{mf_relay.port}",
                               mynetworks=["127.0.0.0/8"], checks={
        "header_checks": [f"regexp:{tmp_path}/header"], "body_checks": [f"regexp:{tmp_path}/body"]})
    mf_replies = await send_contents(mf.smtp_addresses[0][1])
    assert {k: (pf_replies[k], mf_replies[k]) for k in pf_replies if pf_replies[k] != mf_replies[k]} == {}
    mf_copies = await eventually(lambda: len(copies(mf_relay, mf_filter)) >= expected and copies(mf_relay, mf_filter),
                                 timeout=20)

    assert mf_copies == pf_copies
    assert mailflow_held(tmp_path / "queue" / "queue.db") == pf_held
    pf_logged = cleanup_logged(pf_log.splitlines(), ports["filter"])
    assert cleanup_logged((r.getMessage() for r in caplog.records), mf_filter.port) == pf_logged
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "unknown" in r.getMessage()] \
        == []  # INFO is known
    # what Postfix did, so that the same mistake on both sides cannot pass unnoticed
    assert "reject: header Subject: hc-reject-plain from localhost[127.0.0.1]; from=<s@remote.test> " \
        "to=<plain@relay.test> proto=ESMTP helo=<client.test>: 5.7.1 message content rejected" in pf_logged
    assert (pf_replies["hc-reject-plain"], pf_replies["hc-reject-dsn"], pf_replies["hc-reject-4dsn"]) == \
        ("550 5.7.1 message content rejected", "550 5.7.9 with a code", "451 4.7.9 come back")
    assert pf_replies["nested"] == "550 5.7.1 nested header"  # an attached message's headers: nested_header_checks
    assert [pf_copies[name][2] for name in ("hc-prepend-bad", "hc-replace-bad")] == \
        [["Subject: hc-prepend-bad"], ["Subject: hc-replace-bad"]]  # a text that is no header field: ignored
    assert [pf_copies[name][1] for name in ("redirect-stops", "pass-stops", "bccs", "bcc-then-redirect")] == \
        [["other@relay.test"], ["plain@relay.test"], ["copy1@relay.test", "copy2@relay.test", "plain@relay.test"],
         ["other@relay.test"]]
    assert pf_replies["discard-stops"] == "250 queued" and "discard-stops" not in pf_copies
    assert len([line for line in pf_logged if line.startswith("hold: header X-Action")]) == 1
    assert (pf_replies["folded-space"], pf_replies["folded-dot"]) == ("250 queued", "550 5.7.1 dot matched the break")
    assert any(line.startswith("warning: header X-Multi: first? second from ") for line in pf_logged)


KEY_SESSIONS = {  # what the client sends -> (HELO name, sender, recipient)
    "null sender": ("client.test", "", "plain@relay.test"),  # smtpd_null_access_lookup_key: <>
    "upper-case sender": ("client.test", "REJECT-TEXT@SENDER.TEST", "plain@relay.test"),
    "user@ of any domain": ("client.test", "user@elsewhere.test", "plain@relay.test"),
    "a parent's subdomain listed OK": ("client.test", "x@a.sub.parent.test", "plain@relay.test"),
    "a parent": ("client.test", "x@a.parent.test", "plain@relay.test"),
    "HELO an address literal": ("[127.0.0.1]", "s@remote.test", "plain@relay.test"),
    "upper-case HELO": ("REJECT-TEXT.HELO.TEST", "s@remote.test", "plain@relay.test"),
}
TRAILING_DOT = ("reject-text.helo.test.", "s@remote.test", "plain@relay.test")  # (docs/security.md)


async def key_replies(port: int, sessions=KEY_SESSIONS) -> dict[str, str]:
    """The MAIL and RCPT replies of each session."""
    got = {}
    for name, (helo, sender, rcpt) in sessions.items():
        client = await SmtpClient.connect(port)
        await client.cmd(f"EHLO {helo}")
        mail = await client.cmd(f"MAIL FROM:<{sender}>")
        got[name] = f"{mail.text} | {(await client.cmd(f'RCPT TO:<{rcpt}>')).text}"
        await client.close()
    return got


async def test_access_keys_are_the_ones_postfix_asks(postfix, mailflow_server, tmp_path):
    """The key forms tests/interop/test_tables_vs_postfix.py leaves out: the null sender, case, user@, a
    parent domain below an OK entry, a HELO name that is an address literal."""
    pf, _ = postfix
    pf_replies = await key_replies(pf.port)
    (tmp_path / "access").write_text(table_text(9))
    mf = await mailflow_server(mydestination=["local.test"], relayhost="[127.0.0.1]:9", mynetworks=["127.0.0.0/8"],
                               smtpd={"relay_restrictions": ["permit_mynetworks", "reject_unauth_destination"],
                                      **{f"{kind}_restrictions": [f"check_{kind}_access texthash:{tmp_path}/access"]
                                         for kind in KINDS}})
    mf_replies = await key_replies(mf.smtp_addresses[0][1])
    assert {k: (pf_replies[k], mf_replies[k]) for k in pf_replies if pf_replies[k] != mf_replies[k]} == {}
    assert pf_replies["null sender"] == "250 2.1.0 Ok | 554 5.7.1 <>: Sender address rejected: null sender"
    assert pf_replies["user@ of any domain"].endswith("Sender address rejected: user at")
    assert pf_replies["a parent's subdomain listed OK"].endswith("250 2.1.5 Ok")
    # deliberate: a HELO name's trailing dot is not a way around its entry (Postfix looks the name up with it)
    pf_dot = await key_replies(pf.port, {"dot": TRAILING_DOT})
    mf_dot = await key_replies(mf.smtp_addresses[0][1], {"dot": TRAILING_DOT})
    assert (pf_dot["dot"], mf_dot["dot"]) == ("250 2.1.0 Ok | 250 2.1.5 Ok", "250 2.1.0 Ok | 554 5.7.1 "
                                              "<reject-text.helo.test.>: Helo command rejected: go away")


async def class_replies(port: int) -> dict[str, str]:
    """The RCPT reply of each (sender, HELO name) of CLASS_SESSIONS; Server configuration error's text left out
    (mailflow names what it refuses before it, a deliberate difference: docs/security.md)."""
    got = {}
    for sender, helo in CLASS_SESSIONS:
        client = await SmtpClient.connect(port)
        await client.cmd(f"EHLO {helo}")
        await client.cmd(f"MAIL FROM:<{sender}@class.test>")
        text = (await client.cmd("RCPT TO:<plain@relay.test>")).text
        got[f"{sender} {helo}"] = "451 4.3.5 Server configuration error" if text.startswith("451 4.3.5 ") else text
        await client.close()
    return got


async def test_restriction_classes_run_as_postfixs_do(postfix, mailflow_server, tmp_path):
    """A class named in a list runs its list as one item (its permit ends the list); a class as an access value,
    nested classes, a value that is a list of restrictions (a `reject` there names what the table was asked
    about); an undefined class, a lookup table or a loop through a table as the value: 451 4.3.5."""
    pf, _ = postfix
    pf_replies = await class_replies(pf.port)
    mf = await mailflow_server(mydestination=["local.test"], relayhost="[127.0.0.1]:9", mynetworks=["127.0.0.0/8"],
                               smtpd={"relay_restrictions": ["permit_mynetworks", "reject_unauth_destination"],
                                      "restriction_classes": {name: [item.strip() for item in value.split(",")]
                                                              for name, value in write_class_tables(tmp_path).items()},
                                      "recipient_restrictions": ["rcpt_class",
                                                                 f"check_sender_access texthash:{tmp_path}/after"]})
    mf_replies = await class_replies(mf.smtp_addresses[0][1])
    assert {k: (pf_replies[k], mf_replies[k]) for k in pf_replies if pf_replies[k] != mf_replies[k]} == {}
    # what Postfix did, so that the same mistake on both sides cannot pass unnoticed
    assert (pf_replies["permit client.test"], pf_replies["nested client.test"]) == ("250 2.1.5 Ok", "250 2.1.5 Ok")
    assert pf_replies["strict client.test"] == \
        "554 5.7.1 <strict@class.test>: Sender address rejected: after the class"
    assert pf_replies["nested client"] == "504 5.5.2 <client>: Helo command rejected: need fully-qualified hostname"
    assert pf_replies["reject client.test"] == "554 5.7.1 <reject@class.test>: Sender address rejected: Access denied"
    assert pf_replies["list client.test"] == \
        "450 4.3.2 <list@class.test>: Sender address rejected: Try again later"
    assert {pf_replies[f"{s} client.test"] for s in ("loop", "undefined", "table")} == \
        {"451 4.3.5 Server configuration error"}

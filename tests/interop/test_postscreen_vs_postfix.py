"""Differential test: postscreen's early tests against a private Postfix 3.7 postscreen (master.cf: postscreen on
the port, `smtpd pass`, dnsblog, tlsproxy) configured alike, with no DNS: a client that talks before its turn
(greet_action drop), a patient client (PASS NEW, to smtpd), and the same client again (PASS OLD, no teaser); the
deep protocol tests (pipelining, non-SMTP command, bare newline) under each action and the allowlist interfaces'
veto, each client from its own loopback address. Compared: each reply as the client reads it, and postscreen's log
lines (the client's port normalised).

Not compared: the DNSBL paths (Postfix's dnsblog asks the system resolver, which this test cannot point at the
in-process DNS; tests/e2e/test_postscreen.py checks mailflow's against postscreen's source). One difference
seen and kept: Postfix's postscreen leaves the pregreeting input unread (it peeks), so closing after its 521 makes
the kernel reset the connection, which may lose the 521 at the client; mailflow has read the input and closes
cleanly, so the 521 always arrives.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Callable

import pytest

from tests.support import SmtpClient, eventually, free_port, postfix_instance
from tests.support.postfix import side_by_side
from tests.support.client_certs import ClientPki

pytestmark = pytest.mark.interop

HOST = "mx.mailflow.test"
GREET_WAIT = 1  # Postfix's least (postscreen_greet_wait is whole seconds, 1 at least)
# mailflow's where the clients read the greeting before they talk (the deep tests, TLS): the greeting comes as late
# as the wait says, nothing compared tells its length; the pregreet and the concurrency dialogues keep GREET_WAIT
OUR_GREET_WAIT = 0.2


async def dialogue(port: int) -> list[bytes]:
    """What the three clients read: the pregreeter's teaser and refusal, the patient one's greeting (then QUIT),
    the returning one's greeting."""
    seen = []
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    seen.append(await asyncio.wait_for(reader.readline(), 5))
    writer.write(b"EHLO zombie.test\r\n")
    await writer.drain()
    try:
        seen.append(await asyncio.wait_for(reader.readline(), 5))
    except ConnectionResetError:  # (Postfix: see the module doc)
        seen.append(b"<reset>")
    writer.close()
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        greeting = b""
        while True:
            line = await asyncio.wait_for(reader.readline(), GREET_WAIT + 5)
            greeting += line
            if not line or line[3:4] != b"-":
                break
        seen.append(greeting)
        writer.write(b"QUIT\r\n")
        await writer.drain()
        seen.append(await asyncio.wait_for(reader.readline(), 5))
        await closed_by_server(reader)
        writer.close()
    return seen


async def closed_by_server(reader: asyncio.StreamReader) -> None:
    """Until the server's end of the connection is closed, by every process that holds it. Postfix's postscreen
    keeps its copy of a connection it passed to smtpd, and the client's state, until it sees smtpd take it; a
    connection of the same client that comes before is its concurrent one (it shares that state: no cache lookup,
    no PASS OLD line), which a loaded host makes happen now and then."""
    assert await asyncio.wait_for(reader.read(), 20) == b""


def postscreen_lines(lines: list[str]) -> list[str]:
    """The lines, each client port as PORT (`[ip]port` too: Postfix 3.7's EHLO discard line has no colon), and a
    hangup's or a pregreet's time as TIME (`HANGUP after 0.01`, `PREGREET 18 after 0`: how long the session had
    taken, 0 or 0.01 as the host is fast or busy)."""
    ported = (re.sub(r"\]:?\d+", lambda m: "]:PORT" if m[0][1] == ":" else "]PORT", line) for line in lines)
    return [re.sub(r"^(HANGUP|PREGREET \d+) after \d+(\.\d+)? ", r"\1 after TIME ", line) for line in ported]


# lines() -> the server's log lines so far (postscreen's, with tlsproxy's as `process: text` where both are read)
LogLines = Callable[[], list[str]]


async def logged(lines: LogLines, text: str, count: int) -> None:
    """Wait until `count` of the server's log lines start with `text`: what the client cannot see (its close
    handled, the cache written; Postfix's log written by postlogd), with no fixed sleep a slow host outruns."""
    await eventually(lambda: sum(line.startswith(text) for line in lines()) >= count,
                     what=f"{count} log lines starting with {text!r}")


def our_lines(caplog, *processes: str) -> LogLines:
    """mailflow's postscreen lines; with `processes`, those loggers' lines as `process: text`."""
    if not processes:
        return lambda: [r.getMessage() for r in caplog.records if r.name == "mailflow.postscreen"]
    return lambda: [f"{r.name.split('.')[1]}: {r.getMessage()}" for r in caplog.records
                    if r.name in [f"mailflow.{process}" for process in processes]]


def their_lines(pf, *processes: str) -> LogLines:
    """our_lines of a private Postfix, from its maillog."""
    if not processes:
        return lambda: re.findall(r"/postscreen\[\d+\]: (.*)$", pf.maillog, re.M)
    pattern = rf"/({'|'.join(processes)})\[\d+\]: (.*)$"
    return lambda: [f"{name}: {text}" for name, text in re.findall(pattern, pf.maillog, re.M)]


def postscreen_master_cf(port: int) -> str:
    """master.cf of a private Postfix whose postscreen listens on 127.0.0.1:`port` in front of smtpd."""
    return (f"127.0.0.1:{port} inet n - n - 1 postscreen\n"
            "smtpd pass - - n - - smtpd\n"
            "dnsblog unix - - n - 0 dnsblog\n"
            "tlsproxy unix - - n - 0 tlsproxy\n")


async def pregreet_at_postfix(access_list: str) -> tuple[list[bytes], list[str]]:
    """`dialogue` against a private Postfix's postscreen (greet_action drop, the given postscreen_access_list): its
    replies and its postscreen lines once it logged the PASS OLD."""
    port = free_port()
    async with postfix_instance(main_cf={"myhostname": HOST, "postscreen_greet_wait": f"{GREET_WAIT}s",
                                         "postscreen_greet_action": "drop", "postscreen_access_list": access_list,
                                         "postscreen_cache_map": "btree:$data_directory/postscreen_cache"},
                                master_cf=postscreen_master_cf(port)) as pf:
        theirs = await dialogue(port)
        await logged(their_lines(pf), "PASS OLD", 1)
        return theirs, postscreen_lines(their_lines(pf)())


async def test_pregreet_and_pass_as_postfix(mailflow_server, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")
    mf = await mailflow_server(smtpd={"banner": "ESMTP Postfix", "postscreen": {
        "enable": True, "access_list": [], "greet_wait": GREET_WAIT, "greet_action": "drop"}})

    ours, (theirs, their_log) = await side_by_side(dialogue(mf.smtp_addresses[0][1]), pregreet_at_postfix(""))
    our_log = postscreen_lines([r.getMessage() for r in caplog.records if r.name == "mailflow.postscreen"])
    their_log = [line for line in their_log if not line.startswith("cache ")]  # (its cache file's upkeep)

    if theirs[1] == b"<reset>":
        theirs[1] = ours[1]
    assert ours == theirs
    assert ours[0] == b"220-mx.mailflow.test ESMTP Postfix\r\n" and ours[1] == b"521 5.5.1 Protocol error\r\n"
    assert our_log == their_log, (our_log, their_log)
    assert [" ".join(line.split()[:2]) for line in our_log] == [
        "CONNECT from", "PREGREET 18", "DISCONNECT [127.0.0.1]:PORT", "CONNECT from", "PASS NEW", "CONNECT from",
        "PASS OLD"], our_log


async def test_an_access_list_table_that_cannot_answer_as_postfix(mailflow_server, caplog):
    """postscreen_access_list with a table that cannot answer (`fail:`): Postfix's server_acl_eval warns and takes
    the list as dunno, postscreen goes on with the tests (it does not stop, unlike for its other tables); the
    fault stays in that connection: the pregreeter is dropped, the patient client passes, the pass is cached."""
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")
    mf = await mailflow_server(smtpd={"banner": "ESMTP Postfix", "postscreen": {
        "enable": True, "access_list": ["fail:acl"], "greet_wait": GREET_WAIT, "greet_action": "drop"}})

    ours, (theirs, their_log) = await side_by_side(dialogue(mf.smtp_addresses[0][1]),
                                                   pregreet_at_postfix("fail:acl"))
    our_log = postscreen_lines([f"{'warning: ' * (r.levelno == logging.WARNING)}{r.getMessage()}"
                                for r in caplog.records if r.name == "mailflow.postscreen"])
    their_log = [line for line in their_log if not line.startswith("cache ")]
    if theirs[1] == b"<reset>":
        theirs[1] = ours[1]
    assert ours == theirs
    assert our_log == their_log, (our_log, their_log)
    assert their_log.count("warning: postscreen_access_list: fail:acl: table lookup error -- ignoring the "
                           "remainder of this access list") == 3


# The deep protocol tests: each client from its own loopback address (its own cache entry), one command line (or
# pipelined group) at a time, its replies read before the next. Postfix's defaults: pipelining enforce, non-SMTP
# commands drop, bare newlines ignore.
DEEP_CLIENTS = [
    ("127.0.0.2", [b"EHLO c.test\r\n", b"MAIL FROM:<s@x.test>\r\n", b"RCPT TO:<r@y.test>\r\n", b"QUIT\r\n"]),
    ("127.0.0.2", [b"QUIT\r\n"]),  # passed: PASS OLD, smtpd's own greeting
    ("127.0.0.3", [b"EHLO c.test\r\nMAIL FROM:<s@x.test>\r\n", b"RCPT TO:<r@y.test>\r\n", b"QUIT\r\n"]),
    ("127.0.0.3", [b"QUIT\r\n"]),  # failed under enforce: the tests again
    ("127.0.0.4", [b"GET / HTTP/1.0\r\n"]),
    ("127.0.0.5", [b"EHLO c.test\n", b"MAIL FROM:<s@x.test>\r\n", b"RCPT TO:<r@y.test>\r\n", b"DATA\r\n"]),
    ("127.0.0.6", [b"MAIL FROM:<s@x.test>\r\n", b"VRFY x\r\n", b"ETRN x\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n",
                   b'RCPT TO:<"a b"@y.test>\r\n', b"HELO\r\n", b"EHLO\r\n", b"ETRN\r\n", b"Subject: hi\r\n"]),
    ("127.0.0.7", [b"EHLO c.test\r\n", b"Subject\t: hi\r\n"]),  # (is_header: a tab before the colon)
]


# postscreen's last line of a session: the client left (or was dropped), or was handed to smtpd as one passed before
SESSION_ENDS = ("DISCONNECT [", "PASS OLD [")


async def deep_dialogue(port: int, log: LogLines, clients: list[tuple[str, list[bytes]]] = DEEP_CLIENTS
                        ) -> list[list[bytes]]:
    """What each client reads: its greeting, then the replies to each of its lines, until the server closes; the
    next client once the server's `log` has the session's last line (so that the lines of each come before the
    next one's, and every line is in when this returns)."""
    seen = []
    for count, (address, lines) in enumerate(clients, 1):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))
        replies = [await read_reply(reader)]
        for chunk in lines:
            writer.write(chunk)
            await writer.drain()
            for _ in range(chunk.count(b"\n")):
                replies.append(await read_reply(reader))
            if not replies[-1]:
                break
        seen.append(replies)
        writer.close()
        await eventually(lambda: sum(line.startswith(SESSION_ENDS) for line in log()) >= count,
                         what=f"postscreen's last line of session {count} ({address}: {lines[-1]!r})")
    return seen


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """One reply, every line of it; b"" when the connection closed first."""
    text = b""
    while True:
        try:
            line = await asyncio.wait_for(reader.readline(), GREET_WAIT + 5)
        except ConnectionResetError:
            return text
        text += line
        if not line or line[3:4] != b"-":
            return text


async def test_deep_protocol_tests_as_postfix(mailflow_server, caplog):
    """postscreen_pipelining_enable, postscreen_non_smtp_command_enable and postscreen_bare_newline_enable: the
    dummy engine's replies (the 450 that makes a passing client come back, the refusals of each action) and the
    log lines (COMMAND PIPELINING, NON-SMTP COMMAND, BARE NEWLINE, PASS NEW, DATA without valid RCPT)."""
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")
    mf = await mailflow_server(smtpd={"banner": "ESMTP Postfix", "disable_vrfy_command": False, "postscreen": {
        "enable": True, "access_list": [], "greet_wait": OUR_GREET_WAIT, "pipelining_enable": True,
        "non_smtp_command_enable": True, "bare_newline_enable": True}})
    ours, (theirs, their_log) = await side_by_side(
        deep_dialogue(mf.smtp_addresses[0][1], our_lines(caplog)),
        postfix_deep_dialogue({"postscreen_pipelining_enable": "yes",
                              "postscreen_non_smtp_command_enable": "yes",
                              "postscreen_bare_newline_enable": "yes"}))
    our_log = postscreen_lines([r.getMessage() for r in caplog.records if r.name == "mailflow.postscreen"])

    assert ours == theirs
    assert ours[0][-2:] == [b"450 4.3.2 Service currently unavailable\r\n", b"221 2.0.0 Bye\r\n"]
    assert ours[1][0] == b"220 mx.mailflow.test ESMTP Postfix\r\n"
    assert ours[2][-2] == b"550 5.5.1 Protocol error\r\n"
    assert ours[4][-1] == b"521 5.7.0 Error: I can break rules, too. Goodbye.\r\n"
    assert ours[6][-1] == b"521 5.7.0 Error: I can break rules, too. Goodbye.\r\n"  # (Subject<TAB>: too)
    assert our_log == their_log, (our_log, their_log)
    for seen in ("PASS NEW [127.0.0.2]:PORT", "PASS OLD [127.0.0.2]:PORT",
                 r"COMMAND PIPELINING from [127.0.0.3]:PORT after EHLO: MAIL FROM:<s@x.test>\r\n",
                 "NON-SMTP COMMAND from [127.0.0.4]:PORT after CONNECT: GET / HTTP/1.0",
                 "BARE NEWLINE from [127.0.0.5]:PORT after EHLO c.test",
                 "DATA without valid RCPT from [127.0.0.5]:PORT",
                 "NON-SMTP COMMAND from [127.0.0.6]:PORT after ETRN: Subject: hi",
                 "NON-SMTP COMMAND from [127.0.0.7]:PORT after EHLO: Subject?: hi"):
        assert seen in our_log, (seen, our_log)


async def postfix_deep_dialogue(main_cf: dict[str, str], clients: list[tuple[str, list[bytes]]] = DEEP_CLIENTS
                                ) -> tuple[list[list[bytes]], list[str]]:
    """deep_dialogue with a private Postfix postscreen configured with `main_cf`: what the clients read, and
    postscreen's log lines (ports normalised, its cache upkeep left out)."""
    port = free_port()
    master = postscreen_master_cf(port)
    async with postfix_instance(main_cf={"myhostname": HOST, "postscreen_greet_wait": f"{GREET_WAIT}s",
                                         "postscreen_access_list": "", "smtputf8_enable": "yes",
                                         "postscreen_cache_map": "btree:$data_directory/postscreen_cache",
                                         **main_cf}, master_cf=master) as pf:
        theirs = await deep_dialogue(port, their_lines(pf), clients)
        their_log = postscreen_lines(their_lines(pf)())
    return theirs, [line for line in their_log if not line.startswith("cache ")]


async def test_allowlist_veto_as_postfix(mailflow_server, caplog):
    """postscreen_allowlist_interfaces without the listener's address: `ALLOWLIST VETO`, the dummy engine with every
    deep test on (none enabled), the 450, no PASS and nothing cached: the same again next time."""
    clients = [("127.0.0.2", [b"EHLO c.test\r\n", b"MAIL FROM:<s@x.test>\r\n", b"RCPT TO:<r@y.test>\r\n",
                              b"QUIT\r\n"]),
               ("127.0.0.2", [b"HELO c.test\r\nQUIT\r\n"])]
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")
    mf = await mailflow_server(smtpd={"banner": "ESMTP Postfix", "disable_vrfy_command": False, "postscreen": {
        "enable": True, "access_list": [], "greet_wait": OUR_GREET_WAIT, "allowlist_interfaces": ["!127.0.0.1",
                                                                                              "static:all"]}})
    ours, (theirs, their_log) = await side_by_side(
        deep_dialogue(mf.smtp_addresses[0][1], our_lines(caplog), clients),
        postfix_deep_dialogue({"postscreen_allowlist_interfaces": "!127.0.0.1 static:all"},
                              clients))
    our_log = postscreen_lines([r.getMessage() for r in caplog.records if r.name == "mailflow.postscreen"])
    assert ours == theirs
    assert our_log == their_log, (our_log, their_log)
    assert our_log.count("ALLOWLIST VETO [127.0.0.2]:PORT") == 2, our_log
    assert r"COMMAND PIPELINING from [127.0.0.2]:PORT after HELO: QUIT\r\n" in our_log, our_log


async def test_the_other_actions_of_the_deep_tests_as_postfix(mailflow_server, caplog):
    """pipelining drop, non-SMTP command enforce, bare newline drop: the 521s, and the 550 at RCPT."""
    clients = [("127.0.0.2", [b"EHLO c.test\r\nMAIL FROM:<s@x.test>\r\n"]),
               ("127.0.0.3", [b"GET / HTTP/1.0\r\n", b"EHLO c.test\r\n", b"MAIL FROM:<s@x.test>\r\n",
                              b"RCPT TO:<r@y.test>\r\n", b"QUIT\r\n"]),
               ("127.0.0.4", [b"NOOP\r\n", b"HELO c.test\n"])]
    actions = {"pipelining_action": "drop", "non_smtp_command_action": "enforce", "bare_newline_action": "drop"}
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")
    mf = await mailflow_server(smtpd={"banner": "ESMTP Postfix", "disable_vrfy_command": False, "postscreen": {
        "enable": True, "access_list": [], "greet_wait": OUR_GREET_WAIT, "pipelining_enable": True,
        "non_smtp_command_enable": True, "bare_newline_enable": True, **actions}})
    ours, (theirs, their_log) = await side_by_side(
        deep_dialogue(mf.smtp_addresses[0][1], our_lines(caplog), clients),
        postfix_deep_dialogue({
            "postscreen_pipelining_enable": "yes", "postscreen_non_smtp_command_enable": "yes",
            "postscreen_bare_newline_enable": "yes", **{f"postscreen_{k}": v for k, v in actions.items()}}, clients))
    our_log = postscreen_lines([r.getMessage() for r in caplog.records if r.name == "mailflow.postscreen"])
    assert ours == theirs
    assert our_log == their_log, (our_log, their_log)
    assert ours[0][1] == ours[2][-1] == b"521 5.5.1 Protocol error\r\n"  # (the pipelined MAIL: no reply)
    assert ours[1][-2] == b"550 5.5.1 Protocol error\r\n"


async def test_the_dummy_engines_ehlo_discards_command_filter_and_footer_as_postfix(mailflow_server, caplog, pki,
                                                                                    tmp_path):
    """postscreen_discard_ehlo_keywords (STARTTLS then 502, BDAT 502 and the end), the address maps (their answer
    logged when it differs, unless silent-discard), postscreen_command_filter (the line replaced, logged) and
    postscreen_reject_footer under every 4xx and 5xx reply, with postscreen's own macros."""
    _, cert, _ = pki
    maps = tmp_path / "discards"
    maps.write_text("127.0.0.3 dsn, etrn\n127.0.0.4 silent-discard dsn\n")
    commands = tmp_path / "commands"
    commands.write_text("/^NOOP extra$/ NOOP\n/^FOO(.*)/ HELO foo$1\n")
    footer = "\\c See $server_name about $client_address.\\nSecond line"
    clients = [("127.0.0.2", [b"EHLO c.test\r\n", b"STARTTLS\r\n", b"XCLIENT\r\n", b"MAIL FROM:<s@x.test>\r\n",
                              b"RCPT TO:<r@y.test>\r\n", b"NOOP extra\r\n", b"  NOOP extra\r\n", b"FOO bar\r\n",
                              b"BDAT 1\r\n"]),
               ("127.0.0.3", [b"EHLO c.test\r\n", b"QUIT\r\n"]),
               ("127.0.0.4", [b"EHLO c.test\r\n", b"QUIT\r\n"]),
               ("127.0.0.5", [b"HELO c.test\r\n", b"BDAT 1\r\n"])]  # (no EHLO: nothing refused yet)
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")
    mf = await mailflow_server(smtpd={"banner": "ESMTP Postfix", "disable_vrfy_command": False, "tls_cert_file": cert,
                                      "postscreen": {
        "enable": True, "access_list": [], "greet_wait": OUR_GREET_WAIT, "pipelining_enable": True,
        "discard_ehlo_keywords": ["starttls", "size", "chunking"],
        "discard_ehlo_keyword_address_maps": [f"texthash:{maps}"], "command_filter": [f"regexp:{commands}"],
        "reject_footer": footer}})
    ours, (theirs, their_log) = await side_by_side(
        deep_dialogue(mf.smtp_addresses[0][1], our_lines(caplog), clients),
        postfix_deep_dialogue({
            "smtpd_tls_cert_file": cert, "smtpd_tls_key_file": cert, "smtpd_tls_security_level": "may",
            "postscreen_pipelining_enable": "yes", "postscreen_discard_ehlo_keywords": "starttls, size, chunking",
            "postscreen_discard_ehlo_keyword_address_maps": f"texthash:{maps}",
            "postscreen_command_filter": f"regexp:{commands}", "postscreen_reject_footer": footer}, clients))
    our_log = postscreen_lines([r.getMessage() for r in caplog.records if r.name == "mailflow.postscreen"])
    assert ours == theirs
    assert our_log == their_log, (our_log, their_log)
    assert ours[0][2] == (b"502-5.5.1 Error: command not implemented See mx.mailflow.test about 127.0.0.2.\r\n"
                          b"502 5.5.1 Second line\r\n")
    assert ours[3][-1].startswith(b"554-5.5.1 Error: need MAIL command See ")
    ehlo = ours[1][1].split(b"\r\n")  # (the map's answer in place of the default, not added to it)
    assert b"250-DSN" not in ehlo and b"250-ETRN" not in ehlo and b"250-STARTTLS" in ehlo


async def test_footers_by_reply_and_the_expansion_filter_as_postfix(mailflow_server, caplog, tmp_path):
    """postscreen_reject_footer_maps: the whole reply looked up (a regexp: table, `$$` for a macro's `$`), its
    value the footer, postscreen_reject_footer where no table has the reply; postscreen_expansion_filter: what a
    macro's value keeps, the rest `_`. mailflow had neither (every footer reject_footer's, values as smtpd's
    filter keeps them)."""
    maps = tmp_path / "footers"
    maps.write_text("/^502 5\\.5\\.2 / \\c mapped $$server_name [$$client_address]\\nsecond\n")
    allowed = "\\t\\40abcdefghijklmnopqrstuvwxyz0123456789[]"  # (as main.cf writes it: no dots)
    clients = [("127.0.0.2", [b"EHLO c.test\r\n", b"XCLIENT\r\n", b"RCPT TO:<r@y.test>\r\n", b"QUIT\r\n"])]
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")
    mf = await mailflow_server(smtpd={"banner": "ESMTP Postfix", "disable_vrfy_command": False, "postscreen": {
        "enable": True, "access_list": [], "greet_wait": OUR_GREET_WAIT, "pipelining_enable": True,
        "reject_footer": "default $client_address", "reject_footer_maps": [f"regexp:{maps}"],
        "expansion_filter": allowed}})
    ours, (theirs, their_log) = await side_by_side(
        deep_dialogue(mf.smtp_addresses[0][1], our_lines(caplog), clients),
        postfix_deep_dialogue({
            "postscreen_pipelining_enable": "yes", "postscreen_reject_footer": "default $client_address",
            "postscreen_reject_footer_maps": f"regexp:{maps}", "postscreen_expansion_filter": allowed}, clients))
    our_log = postscreen_lines([r.getMessage() for r in caplog.records if r.name == "mailflow.postscreen"])
    assert ours == theirs
    assert our_log == their_log, (our_log, their_log)
    assert ours[0][2] == (b"502-5.5.2 Error: command not recognized mapped mx_mailflow_test [127_0_0_2]\r\n"
                          b"502 5.5.2 second\r\n")
    assert ours[0][3] == b"503-5.5.1 Error: need MAIL command\r\n503 5.5.1 default 127_0_0_2\r\n"


@pytest.mark.parametrize("footer, warned", [
    ("Ask ${helo_name?x $sender} ${client_port:$recipient} ${client_address?$reverse_client_name}",
     ["helo_name", "reverse_client_name"]),
    # a relation: both sides looked up, then only the text chosen
    ("Ask ${{$helo_name} == {$sender}?{$recipient}:{$client_port $reverse_client_name}} ${{$client_address} != {}}",
     ["helo_name", "sender", "recipient"])])
async def test_the_footer_warns_of_the_unknown_macros_it_looks_up_as_postfix(mailflow_server, caplog, footer, warned):
    """smtpd's footer under postscreen's refusals (postscreen_reject_footer's default): psc_expand_lookup warns of a
    macro it does not know as mac_expand looks it up, so not of one in a conditional text left out (a relation's
    two sides are both looked up, then the text chosen)."""
    clients = [("127.0.0.2", [b"GET / HTTP/1.0\r\n"])]
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")
    mf = await mailflow_server(smtpd={"banner": "ESMTP Postfix", "disable_vrfy_command": False, "reject_footer": footer,
                                      "postscreen": {"enable": True, "access_list": [], "greet_wait": OUR_GREET_WAIT,
                                                     "non_smtp_command_enable": True}})
    ours, (theirs, their_log) = await side_by_side(
        deep_dialogue(mf.smtp_addresses[0][1], our_lines(caplog), clients),
        postfix_deep_dialogue({"postscreen_non_smtp_command_enable": "yes",
                              "smtpd_reject_footer": footer}, clients))
    our_log = postscreen_lines([r.getMessage() for r in caplog.records if r.name == "mailflow.postscreen"])
    assert ours == theirs
    assert our_log == [line.removeprefix("warning: ") for line in their_log], (our_log, their_log)
    assert [line for line in our_log if line.startswith("unknown macro")] == [
        f'unknown macro name "{name}" in expansion request' for name in warned], our_log


async def tls_dialogue(port: int, ctx, lines: LogLines) -> list[str]:
    """A client that starts TLS in the dummy engine before its RCPT, then comes back: what it reads (`lines`:
    postscreen's and tlsproxy's, to wait for the server to have handled each end)."""
    seen = []
    c = await SmtpClient.connect(port, timeout=GREET_WAIT + 5)
    for line in ("EHLO c.test", "STARTTLS x", "STARTTLS"):
        seen.append((await c.cmd(line)).text)
    await c.writer.start_tls(ctx, server_hostname="localhost")
    for line in ("EHLO again.test", "MAIL FROM:<s@x.test>", "RCPT TO:<r@y.test>", "STARTTLS", "QUIT"):
        seen.append((await c.cmd(line)).text)
    await c.close()
    await logged(lines, "postscreen: DISCONNECT [127.0.0.1]", 1)  # (the pass cached)
    again = await SmtpClient.connect(port, timeout=GREET_WAIT + 5)
    assert again.greeting is not None
    seen += [again.greeting.text, (await again.cmd("QUIT")).text]
    await again.close()
    await logged(lines, "postscreen: PASS OLD [127.0.0.1]", 1)
    await logged(lines, "tlsproxy: DISCONNECT [127.0.0.1]", 1)
    return seen


async def test_starttls_in_the_dummy_engine_as_postfix(mailflow_server, caplog, pki):
    """postscreen_tls_security_level may (smtpd's): STARTTLS offered, done (Postfix: by tlsproxy, whose CONNECT and
    DISCONNECT lines mailflow writes as `tlsproxy`), the HELO forgotten, no STARTTLS offered again; the client that
    got to RCPT over TLS passes and the next connection goes to smtpd."""
    _, cert, ctx = pki
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")
    caplog.set_level(logging.INFO, logger="mailflow.tlsproxy")
    mf = await mailflow_server(smtpd={"banner": "ESMTP Postfix", "disable_vrfy_command": False, "tls_cert_file": cert,
                                      "postscreen": {"enable": True, "access_list": [], "greet_wait": OUR_GREET_WAIT,
                                                     "pipelining_enable": True}})
    ours = await tls_dialogue(mf.smtp_addresses[0][1], ctx, our_lines(caplog, "postscreen", "tlsproxy"))
    our_log = postscreen_lines(our_lines(caplog, "postscreen", "tlsproxy")())
    port = free_port()
    async with postfix_instance(main_cf={"myhostname": HOST, "postscreen_greet_wait": f"{GREET_WAIT}s",
                                         "postscreen_access_list": "", "smtputf8_enable": "yes",
                                         "postscreen_cache_map": "btree:$data_directory/postscreen_cache",
                                         "postscreen_pipelining_enable": "yes", "smtpd_tls_security_level": "may",
                                         "smtpd_tls_cert_file": cert, "smtpd_tls_key_file": cert},
                                master_cf=postscreen_master_cf(port)) as pf:
        theirs = await tls_dialogue(port, ctx, their_lines(pf, "postscreen", "tlsproxy"))
        their_log = postscreen_lines(their_lines(pf, "postscreen", "tlsproxy")())
    their_log = [line for line in their_log if not line.startswith("postscreen: cache ")]
    theirs[1] = "501 5.5.4 Syntax: STARTTLS"  # (3.7.11 says `501 Syntax: EHLO hostname`, a slip fixed in 3.8)
    assert ours == theirs
    for process in ("postscreen", "tlsproxy"):  # (each in its order; Postfix's two processes' lines interleave)
        assert [line for line in our_log if line.startswith(process)] == \
            [line for line in their_log if line.startswith(process)], (our_log, their_log)
    assert "250-STARTTLS" in ours[0] and "STARTTLS" not in ours[3]
    assert ours[5:7] == ["450 4.3.2 Service currently unavailable", "554 5.5.1 Error: TLS already active"]
    assert "postscreen: PASS NEW [127.0.0.1]:PORT" in our_log and "tlsproxy: DISCONNECT [127.0.0.1]:PORT" in our_log


async def test_tlsproxys_summary_tells_a_trusted_client_certificate_as_postfix(mailflow_server, caplog, tmp_path):
    """smtpd_tls_ask_ccert (tlsproxy's default) and tls_loglevel 1: a client that sends a certificate the CA file
    verifies is `Trusted` in tlsproxy's summary (tls_log_summary), compared up to its bits (see
    tests/interop/test_smtpd_tls_log_vs_postfix.py)."""
    pki = ClientPki(tmp_path)
    ctx = pki.client("trusted").context(pki)
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")
    caplog.set_level(logging.INFO, logger="mailflow.tlsproxy")
    mf = await mailflow_server(smtpd={
        "tls_cert_file": pki.server_cert, "tls_ask_ccert": True, "tls_ca_file": pki.ca_file, "tls_loglevel": 1,
        "postscreen": {"enable": True, "access_list": [], "greet_wait": OUR_GREET_WAIT, "pipelining_enable": True}})
    await tls_dialogue(mf.smtp_addresses[0][1], ctx, our_lines(caplog, "postscreen", "tlsproxy"))
    ours = postscreen_lines([r.getMessage() for r in caplog.records if r.name == "mailflow.tlsproxy"])
    port = free_port()
    async with postfix_instance(main_cf={"myhostname": HOST, "postscreen_greet_wait": f"{GREET_WAIT}s",
                                         "postscreen_access_list": "", "smtputf8_enable": "yes",
                                         "postscreen_cache_map": "btree:$data_directory/postscreen_cache",
                                         "postscreen_pipelining_enable": "yes", "smtpd_tls_security_level": "may",
                                         "smtpd_tls_cert_file": pki.server_cert, "smtpd_tls_key_file": pki.server_cert,
                                         "smtpd_tls_ask_ccert": "yes", "smtpd_tls_CAfile": pki.ca_file,
                                         "smtpd_tls_loglevel": "1"},
                                master_cf=postscreen_master_cf(port)) as pf:
        await tls_dialogue(port, ctx, their_lines(pf, "postscreen", "tlsproxy"))
        theirs = postscreen_lines(re.findall(r"/tlsproxy\[\d+\]: (.*)$", pf.maillog, re.M))
    theirs = [re.sub(r"(bits\)).*", r"\1", line) for line in theirs]
    assert ours == theirs
    assert ours[1].startswith("Trusted TLS connection established from [127.0.0.1]:PORT: TLSv1.3 with cipher "), ours


async def concurrent_dialogue(port: int, lines: LogLines) -> list[str]:
    """One client's connections while its first is in the dummy engine: what each reads. The second comes once the
    first passed the pregreet test, the third once it got to RCPT (it has passed the deep tests, not yet left), the
    fourth once the server has handled the first's end (`lines`: its postscreen log)."""
    seen = []

    first_reader, first = await connect(port)
    seen.append(f"first: {await read_reply(first_reader)!r}")
    seen.append(f"first: {await say(first, first_reader, b'EHLO c.test' + CRLF)!r}")
    reader, writer = await connect(port)
    began = time.monotonic()
    greeting = await read_reply(reader)
    waited = "after a greet wait" if time.monotonic() - began > GREET_WAIT / 2 else "at once"
    seen += [f"second: {greeting!r} {waited}", f"second: {await say(writer, reader, b'QUIT' + CRLF)!r}"]
    writer.close()
    for line in (b"MAIL FROM:<s@x.test>", b"RCPT TO:<r@y.test>"):
        seen.append(f"first: {await say(first, first_reader, line + CRLF)!r}")
    reader, writer = await connect(port)
    began = time.monotonic()
    greeting = await read_reply(reader)
    waited = "after a greet wait" if time.monotonic() - began > GREET_WAIT / 2 else "at once"
    seen.append(f"third: {greeting[:4]!r} {waited}")
    ehlo = await say(writer, reader, b"EHLO c.test" + CRLF)
    seen.append(f"third: {'smtpd' if b'PIPELINING' in ehlo else 'the dummy engine'} answers EHLO")
    writer.close()
    seen.append(f"first: {await say(first, first_reader, b'QUIT' + CRLF)!r}")
    first.close()
    await logged(lines, "DISCONNECT [127.0.0.2]", 2)  # (the second's, the first's)
    reader, writer = await connect(port)  # alone again: the cache, which the first's end updated (PASS OLD)
    seen.append(f"fourth: {(await read_reply(reader))[:4]!r}")
    ehlo = await say(writer, reader, b"EHLO c.test" + CRLF)
    seen.append(f"fourth: {'smtpd' if b'PIPELINING' in ehlo else 'the dummy engine'} answers EHLO")
    writer.close()
    await logged(lines, "PASS OLD [127.0.0.2]", 1)
    return seen


CRLF = b"\r\n"


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from 127.0.0.2, the one client of the concurrency dialogues."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))


async def say(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, line: bytes) -> bytes:
    """`line` (its CRLF given) and the reply to it."""
    writer.write(line)
    await writer.drain()
    return await read_reply(reader)


async def dialogue_on_both(mailflow_server, caplog, dialogue, ours: dict, theirs: dict) -> tuple[list, ...]:
    """`dialogue(port, lines)` against mailflow's postscreen (`ours`: its settings over the shared ones) and then a
    private Postfix's (`theirs`: main.cf over the shared ones): (mailflow's answers, Postfix's, mailflow's postscreen
    log, Postfix's without its cache lines)."""
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")
    mf = await mailflow_server(smtpd={"banner": "ESMTP Postfix", "disable_vrfy_command": False, "postscreen": {
        "enable": True, "greet_wait": GREET_WAIT, **ours}})

    async def with_postfix() -> tuple[list, list[str]]:
        port = free_port()
        async with postfix_instance(main_cf={"myhostname": HOST, "postscreen_greet_wait": f"{GREET_WAIT}s",
                                             "smtputf8_enable": "yes",
                                             "postscreen_cache_map": "btree:$data_directory/postscreen_cache",
                                             **theirs}, master_cf=postscreen_master_cf(port)) as pf:
            return await dialogue(port, their_lines(pf)), postscreen_lines(
                re.findall(r"/postscreen\[\d+\]: (.*)$", pf.maillog, re.M))

    our_answers, (their_answers, their_log) = await side_by_side(
        dialogue(mf.smtp_addresses[0][1], our_lines(caplog)), with_postfix())
    our_log = postscreen_lines([r.getMessage() for r in caplog.records if r.name == "mailflow.postscreen"])
    return our_answers, their_answers, our_log, [line for line in their_log if not line.startswith("cache ")]


async def test_concurrent_connections_of_one_client_share_its_test_results_as_postfix(mailflow_server, caplog):
    """Postfix's postscreen is one process: a client's connections in the screen at once share its test results
    (client_info->expire_time, not the cache): the second skips the pregreet test the first passed, the third,
    after the first passed the deep tests at RCPT, goes to smtpd at once (no PASS line), and the first's end
    caches it all (PASS NEW once)."""
    ours, theirs, our_log, their_log = await dialogue_on_both(
        mailflow_server, caplog, concurrent_dialogue, {"access_list": [], "pipelining_enable": True},
        {"postscreen_access_list": "", "postscreen_pipelining_enable": "yes"})
    assert ours == theirs
    assert our_log == their_log, (our_log, their_log)
    assert "second: b'220 mx.mailflow.test ESMTP Postfix\\r\\n' at once" in ours, ours
    assert ours[-1] == "fourth: smtpd answers EHLO" and our_log.count("PASS NEW [127.0.0.2]:PORT") == 1, ours
    assert our_log[-1] == "PASS OLD [127.0.0.2]:PORT", our_log


async def denylisted_dialogue(port: int, lines: LogLines) -> list[str]:
    """A denylisted client's two connections at once: the second opens while the first is in the dummy engine;
    done when the server has logged both ends (`lines`: its postscreen log)."""
    seen = []

    first_reader, first = await connect(port)
    seen.append(f"first: {await read_reply(first_reader)!r}")
    seen.append(f"first: {await say(first, first_reader, b'HELO c.test' + CRLF)!r}")
    reader, writer = await connect(port)
    seen.append(f"second: {await read_reply(reader)!r}")
    ehlo = await say(writer, reader, b"EHLO c.test" + CRLF)
    seen.append(f"second: {'smtpd' if b'PIPELINING' in ehlo else 'the dummy engine'} answers EHLO")
    seen.append(f"second: {await say(writer, reader, b'MAIL FROM:<s@x.test>' + CRLF)!r}")
    seen.append(f"second: {await say(writer, reader, b'RCPT TO:<r@y.test>' + CRLF)!r}")
    writer.close()
    first.close()
    await logged(lines, "DISCONNECT [127.0.0.2]", 2)
    return seen


async def test_a_denylisted_clients_second_connection_is_not_forwarded_as_postfix(mailflow_server, caplog,
                                                                                 tmp_path):
    """postscreen_denylist_action enforce (PSC_STATE_FLAG_NOFORWARD): a second connection of the client, while its
    first is in the dummy engine with the pregreet test passed, meets the dummy engine too, and its 550 at RCPT."""
    table = tmp_path / "access.cidr"
    table.write_text("127.0.0.2/32 reject\n")
    table.chmod(0o644)
    tmp_path.chmod(0o755)  # (Postfix's postscreen reads it as its own user)
    ours, theirs, our_log, their_log = await dialogue_on_both(
        mailflow_server, caplog, denylisted_dialogue, {"access_list": [f"cidr:{table}"], "denylist_action": "enforce"},
        {"postscreen_access_list": f"cidr:{table}", "postscreen_denylist_action": "enforce", "relay_domains": "y.test"})
    assert ours == theirs
    assert our_log == their_log, (our_log, their_log)
    assert ours[3] == "second: the dummy engine answers EHLO"
    assert ours[-1] == "second: b'550 5.3.2 Service currently unavailable\\r\\n'", ours


async def undone_pass_dialogue(port: int, lines: LogLines) -> list[str]:
    """B passes the pipelining test at RCPT while A, the same client at once, fails it; then C, alone, once the
    server has handled both ends (`lines`: its postscreen log)."""
    seen = []

    async def codes(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, line: bytes, replies: int = 1) -> str:
        writer.write(line)
        await writer.drain()
        return " ".join([repr((await read_reply(reader))[:4]) for _ in range(replies)])

    b_reader, b = await connect(port)
    seen.append(f"B: {await read_reply(b_reader)!r}")
    a_reader, a = await connect(port)
    seen.append(f"A: {await read_reply(a_reader)!r}")
    for line in (b"EHLO b.test", b"MAIL FROM:<s@x.test>", b"RCPT TO:<r@y.test>"):
        seen.append(f"B: {await codes(b, b_reader, line + CRLF)}")
    seen.append(f"A: {await codes(a, a_reader, b'EHLO a.test' + CRLF + b'NOOP' + CRLF, replies=2)}")
    seen.append(f"A: {await codes(a, a_reader, b'QUIT' + CRLF)}")
    seen.append(f"B: {await codes(b, b_reader, b'QUIT' + CRLF)}")
    a.close()
    b.close()
    await logged(lines, "DISCONNECT [127.0.0.2]", 2)
    c_reader, c = await connect(port)
    seen.append(f"C: {(await read_reply(c_reader))[:4]!r}")
    c.write(b"EHLO c.test" + CRLF)
    ehlo = await read_reply(c_reader)
    seen.append(f"C: {'smtpd' if b'PIPELINING' in ehlo else 'the dummy engine'} answers EHLO")
    c.close()
    await logged(lines, "DISCONNECT [127.0.0.2]", 3)
    return seen


async def test_a_deep_test_one_connection_fails_undoes_the_others_pass_as_postfix(mailflow_server, caplog):
    """One client's connections at once: B passes the pipelining test, A then fails it (enforce), which undoes
    the shared pass (expire_time[...] = PSC_TIME_STAMP_DISABLED); B's end caches that, so C meets the test again."""
    ours, theirs, our_log, their_log = await dialogue_on_both(
        mailflow_server, caplog, undone_pass_dialogue, {"access_list": [], "pipelining_enable": True},
        {"postscreen_access_list": "", "postscreen_pipelining_enable": "yes"})
    assert ours == theirs
    assert our_log == their_log, (our_log, their_log)
    assert ours[-1] == "C: the dummy engine answers EHLO", ours


async def test_soft_bounce_softens_postscreens_refusals_as_postfix(mailflow_server, caplog):
    """soft_bounce: every 5xx postscreen sends goes out as a 4xx (psc_send_reply: the code's and the enhanced
    code's first digit), the RCPT refusal logged so (psc_soften_reply)."""
    clients = [("127.0.0.2", [b"XCLIENT\r\n", b"EHLO c.test\r\nMAIL FROM:<s@x.test>\r\n", b"RCPT TO:<r@y.test>\r\n",
                              b"QUIT\r\n"]),
               ("127.0.0.3", [b"GET / HTTP/1.0\r\n"])]
    caplog.set_level(logging.INFO, logger="mailflow.postscreen")
    mf = await mailflow_server(soft_bounce=True, smtpd={
        "banner": "ESMTP Postfix", "disable_vrfy_command": False, "postscreen": {
            "enable": True, "access_list": [], "greet_wait": OUR_GREET_WAIT, "pipelining_enable": True,
            "non_smtp_command_enable": True}})
    ours, (theirs, their_log) = await side_by_side(
        deep_dialogue(mf.smtp_addresses[0][1], our_lines(caplog), clients),
        postfix_deep_dialogue({"soft_bounce": "yes", "postscreen_pipelining_enable": "yes",
                              "postscreen_non_smtp_command_enable": "yes"}, clients))
    our_log = postscreen_lines([r.getMessage() for r in caplog.records if r.name == "mailflow.postscreen"])
    assert ours == theirs
    assert our_log == their_log, (our_log, their_log)
    assert ours[0][1] == b"402 4.5.2 Error: command not recognized\r\n"
    assert ours[0][4] == b"450 4.5.1 Protocol error\r\n"
    assert ours[1][-1] == b"421 4.7.0 Error: I can break rules, too. Goodbye.\r\n"

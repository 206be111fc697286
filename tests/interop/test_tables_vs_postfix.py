"""Differential tests of lookup tables against a real Postfix 3.7: the key orders of the access maps
(check_recipient_access, check_client_access through XCLIENT), of transport_maps and of virtual_alias_maps, seen
through SMTP replies and the addresses delivered to an smtp-sink; and `mailflow table query` beside `postmap -q`
(and `postmap -q -`) for the same table specs and files, cidr: among them (every rule form, then a seeded random
table); `mailflow table dump` beside `postmap -s`; `table query --aliases` and `table dump --aliases` beside
`postalias -q` and `postalias -s` on one aliases file; cidr: refusing loopback clients over SMTP.

Each table key answers with its own text, so a reply tells which key matched, not only that one did. Both
servers are configured alike (recipient_delimiter = +, which Postfix leaves empty by default).

Not compared, because mailflow differs on purpose (docs/config.md, tables/files.py, tables/regexp.py): a bad
line or pattern fails the whole table (Postfix skips the line with a warning: for cidr: the line and the reason
are compared with Postfix's warning); regexp patterns are RE2 (no back-references; `x` and other flags refused);
the hash-style database types are not implemented."""
from __future__ import annotations

import ipaddress
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailflow.cli import app as cli
from tests.support.postfix import smtp_sink, write_cooled
from tests.support import SmtpClient, eventually, postfix_instance, require_tool
from tests.support.sessions import replay_sessions

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]

# access(5) keys of every form; each answers with its own reason
RCPT_ACCESS = ("inline:{ {full+ext@acc.test = REJECT full}, {bare@acc.test = REJECT bare}, {@at.test = REJECT at},"
               " {parent.test = REJECT parent}, {.dotted.test = REJECT dotted}, {who@ = REJECT user-at},"
               " {ext+e@ = REJECT ext-at}, {base@ = REJECT base-at}, {com = REJECT tld},"
               " {origin.test = REJECT origin} }")
RCPT_REGEXP = "/^re-domain\\.test$/ REJECT regexp-domain\n/^whole@re\\.test$/ REJECT regexp-address\n"
CLIENT_REGEXP = "/^127\\.0\\.0\\.1$/ REJECT regexp-client-address\n"
PROBES = ["full+ext@acc.test", "bare+x@acc.test", "bare@acc.test", "x@at.test", "x@sub.at.test", "x@parent.test",
          "x@sub.parent.test", "x@dotted.test", "x@sub.dotted.test", "who@any.test", "who+x@any.test",
          "ext+e@any.test", "base+b@any.test", "x@example.com", "whole@re.test", "x@re-domain.test",
          "x@sub.re-domain.test", "FULL+EXT@ACC.TEST", "x@PARENT.TEST", "nobody@none.test", "unqualified",
          "who", "x%parent.test@local.test", "x%none.test@local.test"]


def readable_folder() -> Path:
    """A folder for table files under the system temp dir (pytest's tmp_path is not traversable by `postfix`)."""
    folder = Path(tempfile.mkdtemp(prefix="mailflow-tables-"))
    os.chmod(folder, 0o755)
    return folder


async def rcpt_replies(port: int, probes: list[str] = PROBES) -> dict[str, str]:
    """The RCPT reply per probe, without the enhanced status code (Postfix and mailflow word them alike). Five
    probes a session: both servers slow down a session past its tenth error (smtpd_soft_error_limit)."""
    replies = {}
    for start in range(0, len(probes), 5):
        client = await SmtpClient.connect(port)
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<s@remote.test>")
        for rcpt in probes[start:start + 5]:
            reply = await client.cmd(f"RCPT TO:<{rcpt}>")
            replies[rcpt] = f"{reply.code} {reply.text.rpartition(': ')[2]}" if reply.code != 250 else "250"
        await client.close()
    return replies


async def test_access_map_key_orders_match_a_real_postfix(mailflow_server):
    folder = readable_folder()
    (folder / "rcpt.regexp").write_text(RCPT_REGEXP)
    (folder / "client.regexp").write_text(CLIENT_REGEXP)
    restrictions = [f"check_recipient_access {RCPT_ACCESS}", f"check_recipient_access regexp:{folder}/rcpt.regexp",
                    f"check_client_access regexp:{folder}/client.regexp"]
    async with postfix_instance({
        "myhostname": "pf.test", "myorigin": "origin.test", "mydestination": "local.test", "local_recipient_maps": "",
        "relayhost": "[127.0.0.1]:9",
        "recipient_delimiter": "+", "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_recipient_restrictions": ", ".join(restrictions),
    }) as pf:
        postfix = await rcpt_replies(pf.port)
    mf = await mailflow_server(mydestination=["local.test"], local_recipient_maps=[], myorigin="origin.test",
                               relayhost="[127.0.0.1]:9", mynetworks=["127.0.0.0/8"],
                               smtpd={"relay_restrictions": ["permit_mynetworks", "reject_unauth_destination"],
                                      "recipient_restrictions": restrictions})
    mailflow = await rcpt_replies(mf.smtp_addresses[0][1])
    shutil.rmtree(folder)
    diff = {p: (postfix[p], mailflow[p]) for p in PROBES if postfix[p] != mailflow[p]}
    assert diff == {}, postfix
    # the edges themselves, so that a change on both sides cannot pass unnoticed
    assert postfix["x@at.test"] == "554 regexp-client-address"  # no @domain key in access(5)
    assert postfix["x@sub.dotted.test"] == "554 regexp-client-address"  # parent style: .domain is never asked
    assert postfix["x@re-domain.test"] == "554 regexp-client-address"  # a regexp is asked the whole address only
    assert postfix["who+x@any.test"] == "554 user-at" and postfix["x@sub.parent.test"] == "554 parent"
    assert postfix["who"] == "554 origin"  # looked up as who@myorigin: its domain comes before who@
    assert postfix["x%parent.test@local.test"] == "554 parent"  # ... and with the percent hack applied


# (file name or None, file text, spec with {file} for the file's path, keys): what `postmap -q` answers for each
TEXTHASH = ("# a comment\nAlice  first\nalice second\nbob\tvalue with  spaces  \n  # an indented comment\n"
            "carol one\n  two\ndave\n continued\nUPPER@Example.COM up\nkey#1 v#1\n"
            "erin one\n\u00a0nbsp two\n\u2003em three\n"  # (Postfix's blanks are ASCII: U+00A0 starts a line)
            "Straße street\nΣίσυφος sisyphus\nStrasse second\n")  # (UTF-8 keys: Unicode case folding, ß is ss)
REGEXP = ("/^(.*)@example\\.com$/ user=$1 braced=${1} dollar=$$\n/^UPPER/ insensitive\n/^lower/i sensitive\n"
          "!/@/ no-at\nif /@if\\.test$/\n/^a/ a-in-if\n!/^b/ not-b-in-if\nendif\n/^(a)|(b)c$/ g1=$1 g2=$2\n"
          "|^pipe| other delimiter\n/^cont$/ first\n  second\nIF/@nospace\\.test$/\n/./ after-if-without-space\n"
          "ENDIF\n/^(t)(w)(e)(l)(v)(e)(g)(r)(o)(u)(p)(s)$/ twelve=$12,${11},$(10)\n"
          "!!/^dbl@/ double-negation\n! ! !/^single@/ triple-negation\n")
CIDR = """# every rule form of cidr_table(5)
192.0.2.1              bare-address
192.0.2.0/24           net24
  continued
192.0.2.128/25         never-reached
[2001:db8::1]          v6-bracketed
[2001:db8::]/32        v6-bracket-then-length
[2001:db9::/32]        v6-length-inside
2001:dba::/48          v6-plain
::ffff:198.51.100.0/120  v4-mapped
!  !203.0.113.9        double-negation
IF 198.51.100.0/24
if ! 198.51.100.0/25
198.51.100.200         upper-half
endif
0.0.0.0/0              in-the-24
ENDIF
if![2001:dbb::]/32
::/0                   v6-not-dbb
endif
!10.0.0.0/8            not-ten
10.1.0.0/0016          leading-zero-length
"""
CIDR_KEYS = ["192.0.2.1", "192.0.2.200", "2001:db8::1", "2001:DB8::1", "2001:db8:1::", "2001:db9::9", "2001:dba::1",
             "2001:dbb::1", "::ffff:198.51.100.7", "198.51.100.7", "198.51.100.200", "203.0.113.9", "203.0.113.10",
             "10.1.2.3", "10.2.0.1", "::1", "[192.0.2.1]", "IPv6:2001:db8::1", "192.0.2", "01.2.3.4", "192.0.2.1 ",
             "fe80::1%lo", "host.example", "::ffff:10.1.2.3", "0.0.0.0", "255.255.255.255"]
QUERIES = [
    ("texthash", TEXTHASH, "texthash:{file}", ["alice", "ALICE", "bob", "carol", "dave", "upper@example.com",
                                               "Upper@EXAMPLE.com", "key#1", "nothing", "alice ", "erin",
                                               "\u00a0nbsp", "\u2003em", "STRASSE", "straße", "STRAẞE",
                                               "ΣΊΣΥΦΟΣ", "σίσυφοσ", "σίσυφος"]),
    ("regexp", REGEXP, "regexp:{file}", ["joe@example.com", "JOE@EXAMPLE.COM", "uppercase", "lower", "LOWER",
                                         "plain", "a@if.test", "b@if.test", "c@if.test", "a@x.test", "bc@x.test",
                                         "pipe@x.test", "cont", "x@nospace.test",
                                         "twelvegroups", "dbl@x.test", "single@x.test", "other@x.test"]),
    ("cidr", CIDR, "cidr:{file}", CIDR_KEYS),
    (None, "", "inline:{a=1, A=2, {b = x y}, {c = }, {d = p=q}}", ["a", "A", "b", "c", "d", "e"]),
    (None, "", "inline:{ {e=f,g} h=i }", ["e", "h"]),
    (None, "", "inline:{Straße=street, Σίσυφος=sisyphus}", ["STRASSE", "strasse", "ΣΊΣΥΦΟΣ"]),
    (None, "", "static:{ hello world }", ["any", ""]),
]


QUERIES_AT_ONCE = 3  # postmap processes run at once


def mailflow_table(*args: str, stdin: str = "") -> tuple[int, str]:
    """`mailflow table ARGS` run as the program: (exit status, standard output)."""
    done = subprocess.run([sys.executable, "-m", "mailflow", "table", *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, timeout=30)
    return done.returncode, done.stdout


def mailflow_query(*args: str, stdin: str = "") -> tuple[int, str]:
    return mailflow_table("query", *args, stdin=stdin)


def mailflow_query_in_process(spec: str, key: str, *options: str) -> tuple[int, str]:
    """`mailflow table query [OPTIONS] SPEC KEY` run by its command line's own code in this process: the same exit
    status and output as the program's (tests/unit/test_tables.py runs that), without a Python start per key (0.5
    to 1 s each: 56 keys took 18 s); an exception fails the test instead of passing for "not found" (exit 1)."""
    done = CliRunner().invoke(cli, ["table", "query", *options, spec, key], catch_exceptions=False)
    return done.exit_code, done.stdout


def postfix_tool(program: str, *args: str, stdin: str = "") -> tuple[int, str]:
    """The test Postfix's `program ARGS` (postmap, postalias): (exit status, standard output)."""
    done = subprocess.run([require_tool(program), *args], input=stdin, capture_output=True, text=True, timeout=30)
    return done.returncode, done.stdout


def postmap_query(*args: str, stdin: str = "") -> tuple[int, str]:
    return postfix_tool("postmap", "-q", *args, stdin=stdin)


def answered_alike(spec: str, keys: list[str]) -> dict[str, tuple[int, str]]:
    """Postfix's `postmap -q KEY SPEC` for each key, asserted the same as mailflow's `table query`, and so is the
    whole list asked on standard input (`postmap -q - SPEC`: key TAB value for each found, in order)."""
    with ThreadPoolExecutor(max_workers=QUERIES_AT_ONCE) as pool:  # one process per key: a few at a time
        postfix = dict(zip(keys, pool.map(lambda key: postmap_query(key, spec), keys)))
    mailflow = {key: mailflow_query_in_process(spec, key) for key in keys}
    assert {k: (postfix[k], mailflow[k]) for k in keys if postfix[k] != mailflow[k]} == {}
    stdin = "".join(f"{key}\n" for key in keys)
    assert mailflow_query(spec, "-", stdin=stdin) == postmap_query("-", spec, stdin=stdin)
    return postfix


def postmap_warning(spec: str, key: str, pattern: str) -> tuple[str, str]:
    """`pattern`'s first group in what `postmap -q KEY SPEC` warns (asserted there), and the whole warning text."""
    done = subprocess.run([require_tool("postmap"), "-q", key, spec], capture_output=True, text=True, timeout=30)
    warning = re.search(pattern, done.stderr, re.MULTILINE)
    assert warning, done.stderr
    return warning.group(1), done.stderr


def mailflow_query_refused(spec: str, key: str) -> str:
    """`mailflow table query SPEC KEY` run as the program, asserted to fail as a table that cannot answer does (exit
    75, nothing on standard output): what it wrote on standard error."""
    failed = subprocess.run([sys.executable, "-m", "mailflow", "table", "query", spec, key],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert failed.returncode == 75 and failed.stdout == "", failed
    return failed.stderr


@pytest.mark.parametrize("name, text, spec, keys", QUERIES, ids=[q[2].partition(":")[0] + str(i)
                                                                   for i, q in enumerate(QUERIES)])
def test_table_query_answers_as_postmap_q_does(tmp_path, name, text, spec, keys):
    if name:
        write_cooled(tmp_path / name, text)  # (a texthash: file Postfix would wait for)
    answered_alike(spec.replace("{file}", str(tmp_path / name)) if name else spec, keys)


def random_cidr(rng: random.Random, rules: int) -> str:
    """A cidr table of `rules` lines: networks of every length near a few bases (so that they overlap), bare
    addresses, negations and nested if blocks, IPv4 and IPv6."""
    lines, depth = [], 0
    for i in range(rules):
        roll = rng.random()
        if roll < 0.08 and depth < 3:
            lines.append(f"if {'!' if rng.random() < 0.3 else ''}{random_network(rng)}")
            depth += 1
        elif roll < 0.16 and depth:
            lines.append("endif")
            depth -= 1
        else:
            lines.append(f"{'!' if rng.random() < 0.1 else ''}{random_network(rng)} result-{i}")
    return "\n".join(lines + ["endif"] * depth) + "\n"


def random_network(rng: random.Random) -> str:
    if rng.random() < 0.75:
        address = ipaddress.ip_address(rng.choice(["10.0.0.0", "10.1.0.0", "192.0.2.0"])) + rng.randrange(1 << 17)
        length = rng.choice([0, 8, 12, 15, 16, 17, 20, 24, 28, 30, 31, 32, 32])
    else:
        address = ipaddress.ip_address(rng.choice(["2001:db8::", "2001:db8:1::"])) + rng.randrange(1 << 20)
        length = rng.choice([0, 16, 32, 48, 64, 100, 112, 120, 127, 128, 128])
    network = ipaddress.ip_network(f"{address}/{length}", strict=False)
    text = str(network) if length < network.max_prefixlen or rng.random() < 0.5 else str(address)
    return f"[{text}]" if network.version == 6 and rng.random() < 0.3 else text


def random_keys(rng: random.Random, count: int) -> list[str]:
    keys = []
    for _ in range(count):
        base = rng.choice(["10.0.0.0", "10.1.0.0", "192.0.2.0", "2001:db8::", "2001:db8:1::"])
        keys.append(str(ipaddress.ip_address(base) + rng.randrange(1 << 17)))
    return keys


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_random_cidr_table_answers_as_postmap_q_does(tmp_path, seed):
    rng = random.Random(seed)
    table = tmp_path / "random.cidr"
    table.write_text(random_cidr(rng, 300))
    stdin = "".join(f"{key}\n" for key in random_keys(rng, 500))
    postfix = postmap_query("-", f"cidr:{table}", stdin=stdin)
    assert postfix[1].count("\n") > 100, "most keys are found: the table and keys overlap"
    assert mailflow_query(f"cidr:{table}", "-", stdin=stdin) == postfix


# each result Postfix's regexp skips (mac_parse, dict_regexp_prescan), with the reason of its warning
BAD_REGEXP_RESULTS = ["/(a)/ $0", "/(a)/ $2", "/(a)/ $1st", "/(a)/ $x", "/(a)/ five$", "/(a)/ ${1"]


@pytest.mark.parametrize("text", BAD_REGEXP_RESULTS)
def test_a_regexp_result_postfix_skips_fails_the_table_naming_that_line(tmp_path, text):
    """`$0` and `$1st` were taken (as group 0, and group 1 then "st"), `$12` read as group 1 then "2"."""
    fails_naming_postfix_s_line(tmp_path, "regexp", text)


def fails_naming_postfix_s_line(tmp_path, kind: str, text: str) -> None:
    """A `kind` (regexp or pcre) table of a good rule and `text` (its third line): the line Postfix warns about is the
    one mailflow's `table query` fails naming."""
    table = tmp_path / f"bad.{kind}"
    table.write_text(f"# a comment\n/^fine$/ fine\n{text}\n")
    warning, postfix = postmap_warning(f"{kind}:{table}", "fine", kind + r" map \S+, (line \d+): ")
    failed = mailflow_query_refused(f"{kind}:{table}", "fine")
    assert f"table {kind}:{table}: {table}, {warning}: " in failed, (postfix, failed)


# each line Postfix skips, with the reason of its warning
BAD_CIDR_LINES = ["10.1.2.3/8 host-bits", "2001:db8::1/32 host-bits6", "10.0.0.0/33 long", "2001:db8::/129 long6",
                  "10.0.0.0/ empty-mask", "10.0.0.0/255.0.0.0 netmask", "10.0.0/8 short", "[1.2.3.0/8]/24 twice",
                  "192.0.2.1", "host.example x", "[2001:db8::1 unclosed", "[2001:db8::1]x garbage", "if", "if !",
                  "! x", "1.2.3.4:5 colon", "ifx 1.2.3.4 y", "if 192.0.2.0/24 extra", "endif",
                  "if 192.0.2.0/24\nendif x\nendif", "if 192.0.2.0/24\n192.0.2.1 x"]


@pytest.mark.parametrize("text", BAD_CIDR_LINES)
def test_a_cidr_line_postfix_skips_fails_the_table_with_postfix_s_line_and_reason(tmp_path, text):
    table = tmp_path / "bad.cidr"
    table.write_text(f"# a comment\n192.0.2.0/24 fine\n{text}\n")
    warning, _ = postmap_warning(f"cidr:{table}", "192.0.2.1",
                                 r"cidr map \S+, (line \d+: .*?)(?:: skipping this rule)?$")
    failed = mailflow_query_refused(f"cidr:{table}", "192.0.2.1")
    assert failed.rstrip("\n").endswith(f"table cidr:{table}: {table}, {warning}"), failed


# check_client_access cidr: over SMTP, clients from loopback addresses other than 127.0.0.1
CLIENT_CIDR = ("127.0.0.2        REJECT cidr-address\nif 127.0.0.8/29\n!127.0.0.9       REJECT cidr-in-8-not-9\n"
               "endif\n[::1]            REJECT cidr-v6\n127.0.0.64/26    REJECT cidr-net\n")
CIDR_SOURCES = ["127.0.0.1", "127.0.0.2", "127.0.0.9", "127.0.0.10", "127.0.0.70", "127.0.0.130"]
ONE_RCPT = ["EHLO client.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<x@relay.test>", "QUIT"]


async def cidr_client_replies(port: int) -> dict[str, str]:
    """The RCPT reply per client address, without the enhanced status code."""
    sessions = await replay_sessions(port, {source: ONE_RCPT for source in CIDR_SOURCES},
                                     {source: source for source in CIDR_SOURCES})
    replies = {}
    for source, exchange in sessions.items():
        reply = dict(exchange)["RCPT TO:<x@relay.test>"]
        assert reply is not None, exchange
        replies[source] = f"{reply.code} {reply.text.rpartition(': ')[2]}" if reply.code != 250 else "250"
    return replies


async def test_check_client_access_cidr_refuses_loopback_clients_as_postfix_does(mailflow_server):
    folder = readable_folder()
    try:
        table = folder / "client.cidr"
        table.write_text(CLIENT_CIDR)
        checks = [f"check_client_access cidr:{table}"]
        async with postfix_instance({
            "myhostname": "pf.test", "mydestination": "", "relayhost": "[127.0.0.1]:9", "relay_domains": "relay.test",
            "smtpd_relay_restrictions": "reject_unauth_destination", "smtpd_client_restrictions": ", ".join(checks),
        }) as pf:
            postfix = await cidr_client_replies(pf.port)
        mf = await mailflow_server(mydestination=[], relayhost="[127.0.0.1]:9", relay_domains=["relay.test"],
                                   smtpd={"client_restrictions": checks,
                                          "relay_restrictions": ["reject_unauth_destination"]})
        port = mf.smtp_addresses[0][1]
        mailflow = await cidr_client_replies(port)
        assert mailflow == postfix
        assert postfix == {"127.0.0.1": "250", "127.0.0.2": "554 cidr-address", "127.0.0.9": "250",
                           "127.0.0.10": "554 cidr-in-8-not-9", "127.0.0.70": "554 cidr-net", "127.0.0.130": "250"}
        # where mailflow differs on purpose: a line Postfix would skip makes the table fail (451 4.3.5, as Postfix
        # answers when an access table cannot be read), so no client gets through on a table missing a rule (the file
        # is re-read within a second of the change)
        table.write_text(CLIENT_CIDR + "127.0.0.1/8 REJECT host-bits\n")

        async def deferred() -> bool:
            reply = dict((await replay_sessions(port, {"x": ONE_RCPT}))["x"])["RCPT TO:<x@relay.test>"]
            return reply is not None and reply.code == 451 and reply.text.endswith("Server configuration error")
        await eventually(deferred, timeout=10, step=0.2)
    finally:
        shutil.rmtree(folder)


# transport(5) keys of every form, each to the error transport with its own text, so that the RCPT reply (both
# refuse an address whose transport is error: at RCPT) tells which key matched
TRANSPORT = ("inline:{ {full+ext@t.test = error:5.1.1 full}, {bare@t.test = error:5.1.1 bare},"
             " {t.test = error:5.1.1 domain}, {.parent.test = error:5.1.1 dot-parent},"
             " {plain.test = error:5.1.1 plain}, {who@ = error:5.1.1 user-at}, {* = error:5.1.1 star} }")
TRANSPORT_REGEXP = "/^re\\.test$/ error:5.1.1 regexp-domain\n/^whole@rr\\.test$/ error:5.1.1 regexp-address\n"
TRANSPORT_PROBES = ["full+ext@t.test", "bare+x@t.test", "other@t.test", "x@sub.t.test", "x@parent.test",
                    "x@sub.parent.test", "x@plain.test", "x@sub.plain.test", "who@any.test", "x@re.test",
                    "whole@rr.test", "x@elsewhere.test", "FULL+EXT@T.TEST", "x@T.Test"]


async def test_transport_map_key_orders_match_a_real_postfix(mailflow_server):
    folder = readable_folder()
    (folder / "transport.regexp").write_text(TRANSPORT_REGEXP)
    maps = [TRANSPORT, f"regexp:{folder}/transport.regexp"]
    async with postfix_instance({
        "myhostname": "pf.test", "mydestination": "", "relayhost": "[127.0.0.1]:9", "recipient_delimiter": "+",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "transport_maps": ", ".join(maps),
    }) as pf:
        postfix = await rcpt_replies(pf.port, TRANSPORT_PROBES)
    mf = await mailflow_server(mydestination=[], relayhost="[127.0.0.1]:9", mynetworks=["127.0.0.0/8"],
                               transport_maps=maps)
    mailflow = await rcpt_replies(mf.smtp_addresses[0][1], TRANSPORT_PROBES)
    shutil.rmtree(folder)
    diff = {p: (postfix[p], mailflow[p]) for p in TRANSPORT_PROBES if postfix[p] != mailflow[p]}
    assert diff == {}, postfix
    # the edges themselves: no parent matching without a dot, no user@ key, a regexp asked the address only
    assert postfix["x@sub.plain.test"] == postfix["x@re.test"] == postfix["who@any.test"] == "550 star"
    assert postfix["x@sub.parent.test"] == "550 dot-parent" and postfix["bare+x@t.test"] == "550 bare"


# virtual(5) keys of every form (mail_addr_find): the final RCPT TO at the next hop tells which matched, and what
# became of the extension (propagate_unmatched_extensions)
VIRTUAL = ("inline:{ {full+ext@v.test = a1@dest.test}, {bare@v.test = a2@dest.test}, {@v.test = catch@dest.test},"
           " {luser = a3@dest.test}, {@dom2.test = @dest2.test}, {Mixed@V2.Test = a4@dest.test} }")
VIRTUAL_REGEXP = "/^re-(.*)@r\\.test$/ $1@dest.test\n"
VIRTUAL_PROBES = ["full+ext@v.test", "full+other@v.test", "bare+tag@v.test", "other@v.test", "other+tag@v.test",
                  "luser@local.test", "luser+x@local.test", "luser@v2.test", "u@dom2.test", "u+x@dom2.test",
                  "re-joe@r.test", "re-joe+x@r.test", "mixed@v2.test", "FULL+EXT@V.TEST"]


async def final_addresses(port: int, probes: list[str], dump: Path, expect: int) -> dict[str, list[str]]:
    """Each probe sent alone (its index in the Subject); the RCPT TO addresses it reached the next hop with."""
    for i, rcpt in enumerate(probes):
        client = await SmtpClient.connect(port)
        for command in ("EHLO client.test", "MAIL FROM:<s@remote.test>", f"RCPT TO:<{rcpt}>", "DATA"):
            reply = await client.cmd(command)
            assert reply.code in (250, 354), (rcpt, reply)
        await client.cmd(f"Subject: probe-{i}\r\n\r\nx\r\n.")
        await client.close()

    def arrived() -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        text = dump.read_text(errors="replace") if dump.exists() else ""
        for message in text.split("X-Client-Addr:")[1:]:
            subject = re.search(r"^Subject: probe-(\d+)", message, re.MULTILINE)
            if subject:
                out.setdefault(probes[int(subject.group(1))], []).extend(
                    re.findall(r"^X-Rcpt-Args: <(.*?)>", message, re.MULTILINE))
        return out
    return await eventually(lambda: len(arrived()) == expect and arrived(), timeout=20)


async def test_virtual_alias_key_orders_match_a_real_postfix(mailflow_server):
    folder = readable_folder()
    (folder / "virtual.regexp").write_text(VIRTUAL_REGEXP)
    maps = [VIRTUAL, f"regexp:{folder}/virtual.regexp"]
    async with smtp_sink() as (pf_sink, pf_dump), smtp_sink() as (mf_sink, mf_dump):
        async with postfix_instance({
            "myhostname": "pf.test", "mydestination": "local.test", "relayhost": f"[127.0.0.1]:{pf_sink}",
            "recipient_delimiter": "+", "local_recipient_maps": "", "virtual_alias_maps": ", ".join(maps),
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        }) as pf:
            postfix = await final_addresses(pf.port, VIRTUAL_PROBES, pf_dump, len(VIRTUAL_PROBES))
        mf = await mailflow_server(mydestination=["local.test"], relayhost=f"[127.0.0.1]:{mf_sink}",
                                   mynetworks=["127.0.0.0/8"], local_recipient_maps=[], virtual_alias_maps=maps)
        mailflow = await final_addresses(mf.smtp_addresses[0][1], VIRTUAL_PROBES, mf_dump, len(VIRTUAL_PROBES))
    shutil.rmtree(folder)
    diff = {p: (postfix[p], mailflow[p]) for p in VIRTUAL_PROBES if postfix[p] != mailflow[p]}
    assert diff == {}, postfix
    # the edges themselves: the user key only for a local domain; an @domain match carries no extension
    assert postfix["luser+x@local.test"] == ["a3+x@dest.test"] and postfix["luser@v2.test"] == ["luser@v2.test"]
    assert postfix["other+tag@v.test"] == ["catch@dest.test"] and postfix["u+x@dom2.test"] == ["u+x@dest2.test"]


# check_client_access: the client's name and address given by XCLIENT, so that any name and address can be probed
CLIENT_ACCESS = ("inline:{ {unknown = REJECT name-unknown}, {host.client.test = REJECT host},"
                 " {client2.test = REJECT parent}, {192.0.2.5 = REJECT ip}, {198.51.100 = REJECT net24},"
                 " {2001:db8::5 = REJECT ip6}, {2001:db8:1 = REJECT net6} }")
NAMED_CLIENT_REGEXP = "/^192\\.0\\.2\\.6$/ REJECT regexp-ip\n/^regexp\\.client\\.test$/ REJECT regexp-name\n"
CLIENT_PROBES = [("[UNAVAILABLE]", "203.0.113.9"), ("host.client.test", "203.0.113.9"),
                 ("a.client2.test", "203.0.113.9"), ("HOST.Client.Test", "203.0.113.9"), ("other.test", "192.0.2.5"),
                 ("other.test", "198.51.100.7"), ("[UNAVAILABLE]", "IPV6:2001:db8::5"),
                 ("[UNAVAILABLE]", "IPV6:2001:db8:1::7"), ("other.test", "192.0.2.6"),
                 ("regexp.client.test", "203.0.113.9"), ("sub.regexp.client.test", "203.0.113.9"),
                 ("other.test", "203.0.113.9")]


async def client_replies(port: int) -> dict[str, str]:
    replies = {}
    for name, addr in CLIENT_PROBES:
        client = await SmtpClient.connect(port)
        await client.cmd("EHLO client.test")
        greeting = await client.cmd(f"XCLIENT NAME={name} ADDR={addr}")
        assert greeting.code == 220, greeting
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<s@remote.test>")
        reply = await client.cmd("RCPT TO:<x@relay.test>")
        replies[f"{name} {addr}"] = f"{reply.code} {reply.text.rpartition(': ')[2]}" if reply.code != 250 else "250"
        await client.close()
    return replies


async def test_client_access_keys_match_a_real_postfix(mailflow_server):
    folder = readable_folder()
    (folder / "client.regexp").write_text(NAMED_CLIENT_REGEXP)
    checks = [f"check_client_access {CLIENT_ACCESS}", f"check_client_access regexp:{folder}/client.regexp"]
    async with postfix_instance({
        "myhostname": "pf.test", "mydestination": "", "relayhost": "[127.0.0.1]:9", "relay_domains": "relay.test",
        "smtpd_authorized_xclient_hosts": "127.0.0.0/8", "inet_protocols": "all",
        "smtpd_relay_restrictions": "reject_unauth_destination", "smtpd_client_restrictions": ", ".join(checks),
    }) as pf:
        postfix = await client_replies(pf.port)
    mf = await mailflow_server(mydestination=[], relayhost="[127.0.0.1]:9", relay_domains=["relay.test"],
                               smtpd={"authorized_xclient_hosts": ["127.0.0.0/8"], "client_restrictions": checks,
                                      "relay_restrictions": ["reject_unauth_destination"]})
    mailflow = await client_replies(mf.smtp_addresses[0][1])
    shutil.rmtree(folder)
    assert {p: (postfix[p], mailflow[p]) for p in postfix if postfix[p] != mailflow[p]} == {}, postfix
    # the edges themselves: a client without a name is looked up as `unknown`; a regexp is asked the address
    assert postfix["[UNAVAILABLE] 203.0.113.9"] == "554 name-unknown" and postfix["other.test 192.0.2.6"] == \
        "554 regexp-ip"
    assert postfix["sub.regexp.client.test 203.0.113.9"] == "250"  # a regexp is not asked the parent domains


DUMPED = ("user@example.test  local\nA@Example.Test\tsecond\n# a comment\nlist@example.test one,\n two words\n"
          "Straße street\n")


def test_table_dump_lists_as_postmap_s_does(tmp_path):
    """`postmap -s TABLE` lists every entry, `key<TAB>value`, keys in lower case (a texthash: file in its hash
    order, hence sorted here; an inline: spec in order), and refuses the types it cannot list ("sequence operation
    is not supported", exit 1): `mailflow table dump` does the same."""
    write_cooled(tmp_path / "map", DUMPED)
    write_cooled(tmp_path / "re", "/x/ y\n")
    for spec in (f"texthash:{tmp_path / 'map'}", "inline:{b=2, A=1, {c = x y}}"):
        rc, out = mailflow_table("dump", spec)
        expected_rc, expected = postfix_tool("postmap", "-s", spec)
        assert (rc, sorted(out.splitlines())) == (expected_rc, sorted(expected.splitlines())) != (0, []), spec
    assert mailflow_table("dump", f"regexp:{tmp_path / 're'}") == postfix_tool(
        "postmap", "-s", f"regexp:{tmp_path / 're'}") == (1, "")


ALIASES = ('# the system aliases\nroot: admin,\n  other@example.test\n\npostmaster:\troot\n'
           'Webmaster : alice ,bob  ,\n  # a comment inside\n  carol\n'
           'run: "|/usr/bin/run   arg",  Joe   Doe <j@x.test>\nStraße: street\n')
ALIAS_KEYS = ["root", "ROOT", "postmaster", "webmaster", "run", "nobody", "root:", "STRASSE", "straße"]


def test_an_aliases_file_answers_as_postalias_q_does(tmp_path):
    """What an admin types at Postfix: `postalias -q NAME /etc/aliases` (its aliases(5) syntax: `name: value`,
    continuation lines, comments, read by postalias into aliases.db), `postalias -q - /etc/aliases` (`name:<TAB>
    value` lines) and `postalias -s /etc/aliases`. `mailflow table query --aliases texthash:FILE` and `table dump
    --aliases` read the same file as alias_maps do and answer alike: the value as postalias stores it (`a, b`),
    the name in any case, exit 1 for none found. (Without --aliases, the file is read as postmap reads a texthash:
    one, `root:` its key, as `postmap -q` reads it.) postalias -s's own entries (`@`, `YP_*`) are left out."""
    aliases = write_cooled(tmp_path / "aliases", ALIASES)
    assert postfix_tool("postalias", f"hash:{aliases}")[0] == 0
    spec = f"texthash:{aliases}"
    with ThreadPoolExecutor(max_workers=QUERIES_AT_ONCE) as pool:  # one process per key: a few at a time
        postfix = dict(zip(ALIAS_KEYS, pool.map(lambda key: postfix_tool("postalias", "-q", key, str(aliases)),
                                                 ALIAS_KEYS)))
    mailflow = {key: mailflow_query_in_process(spec, key, "--aliases") for key in ALIAS_KEYS}
    assert {key: (postfix[key], mailflow[key]) for key in ALIAS_KEYS if postfix[key] != mailflow[key]} == {}
    stdin = "".join(f"{key}\n" for key in ALIAS_KEYS)
    rc, out = mailflow_query("--aliases", spec, "-", stdin=stdin)
    assert (rc, out) == postfix_tool("postalias", "-q", "-", str(aliases), stdin=stdin)
    assert out.splitlines()[0] == "root:\tadmin, other@example.test"
    rc, out = mailflow_table("dump", "--aliases", spec)
    expected_rc, expected = postfix_tool("postalias", "-s", str(aliases))
    own = [line for line in expected.splitlines() if line.startswith(("@:", "YP_"))]
    assert (rc, sorted(out.splitlines())) == (expected_rc, sorted(set(expected.splitlines()) - set(own)))
    assert mailflow_query_in_process(spec, "root:") == postmap_query("root:", spec)


STORED = {  # name: (the value as written, as postalias stores it: tok822_scan's tokens, tok822_externalize's text)
    "trailing": ("x,", "x, "),
    "empty-items": ("x,,y, ,z,", "x, , y, , z, "),
    "leading": (",x", ", x"),
    "comment": ("x   (a   b)", "x (a   b)"),
    "angle": ("<  j@x.test  >", "<j@x.test>"),
    "phrase": ("Joe     Doe <j@x.test>, <k@x.test>", "Joe Doe <j@x.test>, <k@x.test>"),
    "semicolon": ("x; y", "x;y"),
    "group": ("grp: x, y;", "grp:x, y;"),
    "backslash": ("\\a, \\\\b", 'a, "\\\\b"'),
    "quoted": ('"|cmd  two", "j  d"@x.test, "x\\"y"@d', '"|cmd  two", "j  d"@x.test, "x\\"y"@d'),
    "operators": ("a . b @ c, |/bin/x, a%b!c", "a.b@c, |/bin/x, a%b!c"),
    "literal": ("x@[192.0.2.1], x@[a  b", "x@[192.0.2.1], x@[a  b]"),
    "continued": ("a,\n  (two\n  lines) b ,", "a, (two  lines) b, "),
}


def test_alias_values_are_shown_as_postalias_stores_them(tmp_path):
    """postalias(1) stores an aliases(5) value as its tokens written again (Postfix's tok822_scan, then
    tok822_externalize), and `postalias -q` and `-s` print that: empty items and a trailing comma kept, one space
    after a comma, a comment kept as written, no blank inside `<>` nor around `;` and a group's `:`, a backslash
    read. `table query --aliases` and `table dump --aliases` on the same file print the same. A table of another
    type is not stored by postalias: `postalias -q KEY inline:{...}` prints the value as written, and so does
    mailflow (it printed postalias's form, or its own: `x, y, z` for `x,,y, ,z,`)."""
    aliases = write_cooled(tmp_path / "aliases", "".join(f"{name}: {value}\n" for name, (value, _) in STORED.items()))
    assert postfix_tool("postalias", f"hash:{aliases}")[0] == 0
    spec = f"texthash:{aliases}"
    stdin = "".join(f"{name}\n" for name in STORED)
    expected = "".join(f"{name}:\t{stored}\n" for name, (_, stored) in STORED.items())
    assert postfix_tool("postalias", "-q", "-", str(aliases), stdin=stdin) == (0, expected)
    assert mailflow_query("--aliases", spec, "-", stdin=stdin) == (0, expected)
    dumped = {line for line in postfix_tool("postalias", "-s", str(aliases))[1].splitlines() if line[0] not in "@Y"}
    assert dumped == set(expected.splitlines())
    assert mailflow_table("dump", "--aliases", spec) == (0, expected)
    assert mailflow_query_in_process(spec, "group", "--aliases") == postfix_tool(
        "postalias", "-q", "group", str(aliases)) == (0, "grp:x, y;\n")

    inline = "inline:{{root=a,,b   c}, {other = x; y}}"
    for name, value in (("root", "a,,b   c"), ("other", "x; y")):
        assert mailflow_query_in_process(inline, name, "--aliases") == postfix_tool(
            "postalias", "-q", name, inline) == (0, f"{value}\n")

"""Differential tests of `pcre:` tables against a real Postfix 3.7 (postfix-pcre, PCRE2): `mailflow table query`
beside `postmap -q` for the same file and keys (each key alone, and all from standard input); the lines Postfix's
pcre skips with a warning, which fail mailflow's table naming the same line; and header_checks = pcre: through
both servers, the reply at the end of DATA compared.

Not compared, because mailflow differs on purpose (docs/config.md, mailflow/tables/pcre.py): a pattern PCRE takes
and RE2 cannot (a back-reference, look-around, an atomic group, a possessive quantifier) fails mailflow's table,
naming the line and the construct, where Postfix answers (checked below as the difference it is); a line Postfix
skips fails the whole table; a rule without a result is refused where Postfix answers the empty string."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.interop.test_tables_vs_postfix import (QUERIES_AT_ONCE, ROOT, mailflow_query, mailflow_query_in_process,
                                                  postmap_query, readable_folder)
from tests.support import SmtpClient, postfix_instance, require_tool

pytestmark = pytest.mark.interop


@pytest.fixture(autouse=True, scope="module")
def postfix_has_pcre() -> None:
    """Postfix's pcre: is a package of its own in Debian (postfix-pcre, installed by .ci/run)."""
    done = subprocess.run([require_tool("postconf"), "-m"], capture_output=True, text=True, timeout=30)
    if "pcre" not in done.stdout.split():
        message = "Postfix has no pcre: table type (Debian: postfix-pcre, see .ci/run)"
        if os.environ.get("MAILFLOW_REQUIRE_TOOLS") == "1":
            pytest.fail(message)
        pytest.skip(message)


# every part of pcre_table(5) mailflow takes; each rule answers with its own text
PCRE = r"""# alternation and groups: leftmost-first, where regexp: (POSIX) takes the longest
/^(a|ab)(c|bcd)?(.*)$/      alt=[$1][$2][$3]
/^<(.+?)>/                  lazy=$1
/^(\w+)@(sub\.)?example\.com$/ user=$1 sub=${2} paren=$(1) dollar=$$ end
/^CaseSensitive@/i          exact-case
/^ca(se)+less@/             caseless=$1
if /@if\.test$/
if !/^admin@/
/^(.*)@/                    in-if=$1
endif
/./                         admin-in-if
endif
!/@/                        no-at
|^pipe@|                    pipe-delimiter
! ! /^double@/              double-negation
/^u(a+)/U                   ungreedy=$1
/^x y z  # a comment
  @/x                       extended
/b@anchored/A               anchored
/^e@end$/E                  dollar-end-only
/^X@obsolete/X              obsolete-x-ignored
/^(é+)(.)/                  utf8=$1,$2
/^.@bytes\.test$/           one-byte
/^..@bytes\.test$/          two-bytes
/^é@fold/                   fold
/^cont@/                    first
  second
"""
KEYS = ["abcd", "ab", "<a>b>", "joe@example.com", "JOE@SUB.EXAMPLE.COM", "CaseSensitive@x.test",
        "casesensitive@x.test", "CASESESELESS@x.test", "joe@if.test", "admin@if.test", "joe@other.test", "plain",
        "pipe@x.test", "double@x.test", "uaaa@x.test", "xyz@x.test", "b@anchored", "xb@anchored", "e@end",
        "x@obsolete", "éx@x", "é@bytes.test", "e@bytes.test", "é@fold", "É@fold", "cont@x.test", "nothing@x.test"]


def test_pcre_table_query_answers_as_postmap_q_does(tmp_path):
    (tmp_path / "table.pcre").write_text(PCRE)
    spec = f"pcre:{tmp_path}/table.pcre"
    with ThreadPoolExecutor(max_workers=QUERIES_AT_ONCE) as pool:  # one process per key: a few at a time
        postfix = dict(zip(KEYS, pool.map(lambda key: postmap_query(key, spec), KEYS)))
    mailflow = {key: mailflow_query_in_process(spec, key) for key in KEYS}
    assert {k: (postfix[k], mailflow[k]) for k in KEYS if postfix[k] != mailflow[k]} == {}
    stdin = "".join(f"{key}\n" for key in KEYS)
    assert mailflow_query(spec, "-", stdin=stdin) == postmap_query("-", spec, stdin=stdin)
    # the edges themselves, so that a change on both sides cannot pass unnoticed
    assert [postfix[key][1] for key in ("abcd", "<a>b>", "uaaa@x.test")] == \
        ["alt=[a][bcd][]\n", "lazy=a\n", "ungreedy=a\n"]  # leftmost-first, as PCRE (regexp: gives [ab][c][d], a>b)
    # bytes, not characters: `é+` repeats the last byte of é; `.` is one byte; caseless folds ASCII only
    assert (postfix["é@bytes.test"][1], postfix["e@bytes.test"][1], postfix["É@fold"][0]) == \
        ("utf8=é,@\n", "one-byte\n", 1)
    assert postfix["joe@example.com"][1] == "user=joe sub= paren=joe dollar=$ end\n"


def test_a_result_that_is_not_utf8_cannot_be_answered_as_in_postfix(tmp_path):
    """`é+` is C3 A9+ byte-wise, so `.` takes the C3 of the second é: the result cuts a character in two."""
    table = tmp_path / "cut.pcre"
    table.write_text("/^(é+)(.)/ utf8=$1,$2\n")
    done = subprocess.run([require_tool("postmap"), "-q", "ééx", f"pcre:{table}"], capture_output=True, timeout=30)
    assert done.returncode != 0 and done.stdout == b"" and b"non-UTF-8 value" in done.stderr, done.stderr
    failed = subprocess.run([sys.executable, "-m", "mailflow", "table", "query", f"pcre:{table}", "ééx"],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert failed.returncode == 75 and failed.stdout == ""
    assert "key 'ééx': non-UTF-8 value 'utf8=é,\\udcc3'" in failed.stderr, failed.stderr


# each line Postfix's pcre skips with a warning (the table's third line)
BAD_LINES = ["/a/q unknown-flag", "/(a)/ $0", "/(a)/ $2", "/(a)/ $1st", "/(a)/ five$", "!/(a)/ $1", "/a no-close",
             "/(unclosed/ x", "if /a/\n/b/ c", "endif", "/a/"]


@pytest.mark.parametrize("text", BAD_LINES)
def test_a_pcre_line_postfix_skips_fails_the_table_naming_that_line(tmp_path, text):
    table = tmp_path / "bad.pcre"
    table.write_text(f"# a comment\n/^fine$/ fine\n{text}\n")
    done = subprocess.run([require_tool("postmap"), "-q", "fine", f"pcre:{table}"], capture_output=True, text=True,
                          timeout=30)
    warning = re.search(r"pcre map \S+, (line \d+): ", done.stderr)
    assert warning, done.stderr
    failed = subprocess.run([sys.executable, "-m", "mailflow", "table", "query", f"pcre:{table}", "fine"],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert failed.returncode == 75 and failed.stdout == "", failed
    assert f"table pcre:{table}: {table}, {warning.group(1)}: " in failed.stderr, (done.stderr, failed.stderr)


# patterns PCRE takes and RE2 cannot: Postfix answers, mailflow names the line and the construct
RE2_CANNOT = [("/^(a)\\1$/", "aa", "a back-reference"), ("/^a(?=b)/", "ab", "a look-around assertion"),
              ("/(?<!x)b$/", "ab", "a look-around assertion"), ("/^a++b/", "aab", "a possessive quantifier"),
              ("/^(?>a+)b/", "aab", "an atomic group")]


@pytest.mark.parametrize("pattern, key, construct", RE2_CANNOT)
def test_a_pattern_re2_cannot_take_fails_the_table_where_postfix_answers(tmp_path, pattern, key, construct):
    table = tmp_path / "pcre.pcre"
    table.write_text(f"# a comment\n{pattern} found\n")
    assert postmap_query(key, f"pcre:{table}") == (0, "found\n")
    failed = subprocess.run([sys.executable, "-m", "mailflow", "table", "query", f"pcre:{table}", key],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert failed.returncode == 75 and failed.stdout == ""
    assert f"{table}, line 2: {construct} is not supported (mailflow's pcre: runs on RE2: " in failed.stderr


HEADER_CHECKS = r"""/^Subject:.*\b(viagra|cialis)\b/    REJECT no $1 here
/^Subject: (.+?)(\s.*)?$/               REJECT first word: $1
/^X-Folded: a.\sb$/                     REJECT dot matched the break
/^X-NoDot: a.\sb$/s                     REJECT never
/^X-Multi: one$/m                       REJECT one line of a folded header
"""
MESSAGES = {  # name -> the header section
    "pills": "Subject: buy VIAGRA now\r\n",
    "lazy": "Subject: lottery winner today\r\n",
    "folded-dot": "X-Folded: a\r\n b\r\n",
    "folded-no-dot-all": "X-NoDot: a\r\n b\r\n",
    "folded-multi-line": "X-Multi: one\r\n two\r\n",
    "plain": "X-Plain: nothing\r\n",
}


async def data_replies(port: int) -> dict[str, str]:
    """Each message's reply at the end of DATA (a queued one as `250`)."""
    got = {}
    for name, head in MESSAGES.items():
        async with await SmtpClient.connect(port) as client:
            for command in ("EHLO client.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<plain@relay.test>", "DATA"):
                await client.cmd(command)
            reply = await client.cmd(f"{head}\r\nbody\r\n.".encode())
        got[name] = "250" if reply.code == 250 else reply.text
    return got


async def test_header_checks_in_pcre_reject_as_postfix_s_do(mailflow_server):
    folder = readable_folder()
    (folder / "header").write_text(HEADER_CHECKS)
    async with postfix_instance({
        "myhostname": "pf.test", "mydestination": "", "relay_domains": "relay.test", "relayhost": "[127.0.0.1]:9",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "header_checks": f"pcre:{folder}/header",
    }) as pf:
        postfix = await data_replies(pf.port)
    mf = await mailflow_server(mydestination=[], relay_domains=["relay.test"], relayhost="[127.0.0.1]:9",
                               mynetworks=["127.0.0.0/8"], checks={"header_checks": [f"pcre:{folder}/header"]})
    mailflow = await data_replies(mf.smtp_addresses[0][1])
    shutil.rmtree(folder)
    assert {k: (postfix[k], mailflow[k]) for k in MESSAGES if postfix[k] != mailflow[k]} == {}
    assert postfix == {"pills": "550 5.7.1 no VIAGRA here", "lazy": "550 5.7.1 first word: lottery",
                       "folded-dot": "550 5.7.1 dot matched the break", "folded-no-dot-all": "250",
                       "folded-multi-line": "550 5.7.1 one line of a folded header", "plain": "250"}

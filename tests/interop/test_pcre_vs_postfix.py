"""Differential tests of `pcre:` tables against a real Postfix 3.7 (postfix-pcre, PCRE2): `mailflow table query`
beside `postmap -q` for the same file and keys (each key alone, and all from standard input); the lines Postfix's
pcre skips with a warning, which fail mailflow's table naming the same line; and header_checks = pcre: through
both servers, the reply at the end of DATA compared.

Not compared, because mailflow differs on purpose (docs/config.md, mailflow/tables/pcre.py): a pattern PCRE takes
and RE2 cannot (a back-reference, look-around, an atomic group, a possessive quantifier) fails mailflow's table,
naming the line and the construct, where Postfix answers (checked below as the difference it is); a line Postfix
skips fails the whole table; a rule without a result is refused where Postfix answers the empty string; a
repeated group whose last repetition matches the empty string is captured as that in PCRE, as the last non-empty
one in RE2 (the random patterns leave it out)."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.interop.test_tables_vs_postfix import (QUERIES_AT_ONCE, answered_alike, fails_naming_postfix_s_line,
                                                  mailflow_query_refused, postmap_query, readable_folder)
from mailflow.tables import open_table
from tests.support import end_of_data_replies, postfix_instance, require_tool
from tests.support.postfix import write_cooled

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
/^nb sp@/x              extended-keeps-nbsp
/^ringÅ?@/x                 extended-drops-byte-0x85-of-Å
"""
KEYS = ["abcd", "ab", "<a>b>", "joe@example.com", "JOE@SUB.EXAMPLE.COM", "CaseSensitive@x.test",
        "casesensitive@x.test", "CASESESELESS@x.test", "joe@if.test", "admin@if.test", "joe@other.test", "plain",
        "pipe@x.test", "double@x.test", "uaaa@x.test", "xyz@x.test", "b@anchored", "xb@anchored", "e@end",
        "x@obsolete", "éx@x", "é@bytes.test", "e@bytes.test", "é@fold", "É@fold", "cont@x.test", "nothing@x.test",
        "nb\u00a0sp@x", "nbsp@x", "ring@x", "ringÅ@x"]


def test_pcre_table_query_answers_as_postmap_q_does(tmp_path):
    (tmp_path / "table.pcre").write_text(PCRE)
    postfix = answered_alike(f"pcre:{tmp_path}/table.pcre", KEYS)
    # the edges themselves, so that a change on both sides cannot pass unnoticed
    assert [postfix[key][1] for key in ("abcd", "<a>b>", "uaaa@x.test")] == \
        ["alt=[a][bcd][]\n", "lazy=a\n", "ungreedy=a\n"]  # leftmost-first, as PCRE (regexp: gives [ab][c][d], a>b)
    # bytes, not characters: `é+` repeats the last byte of é; `.` is one byte; caseless folds ASCII only
    assert (postfix["é@bytes.test"][1], postfix["e@bytes.test"][1], postfix["É@fold"][0]) == \
        ("utf8=é,@\n", "one-byte\n", 1)
    assert postfix["joe@example.com"][1] == "user=joe sub= paren=joe dollar=$ end\n"
    # the x flag leaves out ASCII blanks and byte 0x85 (NEL, the second byte of Å), not U+00A0
    assert (postfix["nb\u00a0sp@x"][1], postfix["ring@x"][1]) == \
        ("extended-keeps-nbsp\n", "extended-drops-byte-0x85-of-Å\n")


def random_pattern(rng: random.Random, depth: int = 0) -> str:
    """Alternations of atoms, classes, groups (capturing or not) and every quantifier, greedy and lazy. A group's
    first piece always takes a character: a repeated group whose last repetition matches the empty string is
    captured differently by PCRE and RE2 (docs/config.md), and is left to the tests above."""
    def atom() -> str:
        if depth > 0 or rng.random() < 0.5:
            return rng.choice(["a", "b", ".", "[ab]", "[^a]", "A", "\\w"])
        return rng.choice(["(", "(?:"]) + random_pattern(rng, depth + 1) + ")"

    def quantifier() -> str:
        return rng.choice(["", "", "*", "+", "?", "*?", "+?", "??", "{1,2}", "{0,2}?"])

    def branch() -> str:
        first = atom() + (rng.choice(["", "+", "+?", "{1,2}"]) if depth else quantifier())
        return first + "".join(atom() + quantifier() for _ in range(rng.randint(0, 1)))

    return "|".join(branch() for _ in range(rng.choice([1, 1, 2])))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_patterns_answer_as_postmap_q_does(tmp_path, seed):
    """Each pattern in a table of its own, its every group in the result: which keys match and what each group
    took, leftmost-first, greedy and lazy, with the i, U and s flags."""
    rng = random.Random(seed)
    keys = sorted({"".join(rng.choice("abAB") for _ in range(rng.randint(1, 6))) for _ in range(40)})
    stdin = "".join(f"{key}\n" for key in keys)
    tables = []
    for i in range(150):
        pattern = ("^" if rng.random() < 0.5 else "") + random_pattern(rng) + ("$" if rng.random() < 0.5 else "")
        groups = pattern.count("(") - pattern.count("(?:")
        table = tmp_path / f"{i}.pcre"
        table.write_text(f"/{pattern}/{rng.choice(['', '', 'i', 'U', 's', 'iU'])} r"
                         + "".join(f"[${n}]" for n in range(1, groups + 1)) + "\n")
        tables.append(table)
    with ThreadPoolExecutor(max_workers=QUERIES_AT_ONCE) as pool:
        postfix = list(pool.map(lambda table: postmap_query("-", f"pcre:{table}", stdin=stdin), tables))
    found = 0
    for table, answer in zip(tables, postfix):
        opened = open_table(f"pcre:{table}")
        mailflow = "".join(f"{key}\t{value}\n" for key in keys if (value := opened.lookup(key)) is not None)
        assert (table.read_text(), mailflow) == (table.read_text(), answer[1])
        found += answer[1].count("\n")
    assert found > len(tables) * len(keys) // 10, "the patterns and keys overlap"


def test_an_empty_last_repetition_of_a_group_is_the_one_difference_in_captures(tmp_path):
    """The difference docs/config.md names, checked as what it is: PCRE captures the empty last repetition."""
    table = tmp_path / "empty.pcre"
    table.write_text("/^((a?))*b$/ [$1]\n")
    assert postmap_query("ab", f"pcre:{table}") == (0, "[]\n")
    assert open_table(f"pcre:{table}").lookup("ab") == "[a]"


def test_a_result_that_is_not_utf8_cannot_be_answered_as_in_postfix(tmp_path):
    """`é+` is C3 A9+ byte-wise, so `.` takes the C3 of the second é: the result cuts a character in two."""
    table = tmp_path / "cut.pcre"
    table.write_text("/^(é+)(.)/ utf8=$1,$2\n")
    done = subprocess.run([require_tool("postmap"), "-q", "ééx", f"pcre:{table}"], capture_output=True, timeout=30)
    assert done.returncode != 0 and done.stdout == b"" and b"non-UTF-8 value" in done.stderr, done.stderr
    failed = mailflow_query_refused(f"pcre:{table}", "ééx")
    assert "key 'ééx': non-UTF-8 value 'utf8=é,\\udcc3'" in failed, failed


# each line Postfix's pcre skips with a warning (the table's third line)
BAD_LINES = ["/a/q unknown-flag", "/(a)/ $0", "/(a)/ $2", "/(a)/ $1st", "/(a)/ five$", "!/(a)/ $1", "/a no-close",
             "/(unclosed/ x", "if /a/\n/b/ c", "endif", "/a/", "/a)|(b/A anchored-alone"]


@pytest.mark.parametrize("text", BAD_LINES)
def test_a_pcre_line_postfix_skips_fails_the_table_naming_that_line(tmp_path, text):
    fails_naming_postfix_s_line(tmp_path, "pcre", text)


# patterns PCRE takes and RE2 cannot: Postfix answers, mailflow names the line and the construct
RE2_CANNOT = [("/^(a)\\1$/", "aa", "a back-reference"), ("/^a(?=b)/", "ab", "a look-around assertion"),
              ("/(?<!x)b$/", "ab", "a look-around assertion"), ("/^a++b/", "aab", "a possessive quantifier"),
              ("/^(?>a+)b/", "aab", "an atomic group"),
              ("/^a{2,}+b/", "aab", "a possessive quantifier")]  # (no equivalent: /^a{2,}+a/ never matches)


@pytest.mark.parametrize("pattern, key, construct", RE2_CANNOT)
def test_a_pattern_re2_cannot_take_fails_the_table_where_postfix_answers(tmp_path, pattern, key, construct):
    table = tmp_path / "pcre.pcre"
    table.write_text(f"# a comment\n{pattern} found\n")
    assert postmap_query(key, f"pcre:{table}") == (0, "found\n")
    failed = mailflow_query_refused(f"pcre:{table}", key)
    assert f"{table}, line 2: {construct} is not supported (mailflow's pcre: runs on RE2: " in failed


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
    replies = await end_of_data_replies(port, {name: f"{head}\r\nbody\r\n".encode() for name, head in MESSAGES.items()})
    return {name: "250" if reply.code == 250 else reply.text for name, reply in replies.items()}


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


# PCRE syntax RE2 lacks or reads otherwise, rewritten by mailflow to what matches the same bytes (each rule answers
# with its own name; `\s` has VT in PCRE2 and not in RE2, `\v` is any vertical space in PCRE, VT alone in RE2)
REWRITTEN = r"""/^end\Z/                   Z-end
/^h\hh/                    h-horizontal
/^H\H/                     H-not-horizontal
/^esc\e/                   e-escape
/^ctl\cA\cz/               c-control
/^com(?#a comment)ment$/   comment-group
/^x com (?#a (?# c) ment/x comment-group-extended
/^n\N+x$/                  N-not-newline
/^sp(\s)$/                 s-space=[$1]
/^ns\S$/                   S-not-space
/^cl[\s]$/                 s-in-class
/^nc[^\S]$/                S-negated-in-class
/^vt\v$/                   v-vertical
/^nv\V$/                   V-not-vertical
/^hx\x1$/                  x-one-digit
/^st\Eay$/                 stray-E
/^a\N{2}b$/                N-count
/^o\o{351}$/               o-octal
/^oc[\o{351}]$/            o-octal-in-class
/^(?x) s p a c e $/        inline-x
/^(?-i)(?xi) c a s e $/    inline-x-with-others
/^mid(?x) m i d # c $/     inline-x-after-text
"""
REWRITTEN_KEYS = ["end", "endx", "h\th", "h\xa0h".encode("latin-1").decode("utf-8", "surrogateescape"), "h h",
                  "hxh", "H\t", "Hx", "esc\x1b", "escx", "ctl\x01\x1a", "ctlAz", "comment", "xcomment", "nabcx",
                  "na\nx", "sp\x0b", "sp ", "spx", "ns\x0b", "nsx", "cl\x0b", "clx", "nc\x0b", "ncx", "vt\x0b",
                  "vt\r", "vt\x85".encode("latin-1").decode("utf-8", "surrogateescape"), "vt ", "nv\x0b",
                  "nvx", "hx\x01", "hx1", "stay", "axyb", "axb",
                  "oc\xe9".encode("latin-1").decode("utf-8", "surrogateescape"),
                  "o\xe9".encode("latin-1").decode("utf-8", "surrogateescape"), "space", "SPACE", "spa ce", "case",
                  "CASE", "midmid", "MIDmid", "mid mid"]


def test_pcre_syntax_re2_lacks_is_rewritten_to_answer_as_postmap_q_does(tmp_path):
    """Each rewrite (mailflow/tables/pcre.py _in_re2_syntax) against Postfix's own PCRE, key by key (a key that is
    not UTF-8, `h<A0>h`, is passed to postmap as its bytes with smtputf8_enable = no, which then looks it up)."""
    (tmp_path / "table.pcre").write_text(REWRITTEN)
    spec = f"pcre:{tmp_path}/table.pcre"
    opened = open_table(spec)
    differ, matched = {}, 0
    for key in REWRITTEN_KEYS:
        done = subprocess.run([require_tool("postmap"), "-c", str(latin1_config(tmp_path)), "-q",
                               os.fsencode(key), spec], capture_output=True, timeout=30)
        postfix = done.stdout.decode("utf-8", "surrogateescape").rstrip("\n") if done.returncode == 0 else None
        mailflow = opened.lookup(key)
        matched += postfix is not None
        if postfix != mailflow:
            differ[key] = (postfix, mailflow)
    assert differ == {}
    assert matched >= len(REWRITTEN.splitlines()), "each rule answers some key"


def latin1_config(tmp_path):
    """A config directory whose main.cf has smtputf8_enable = no: postmap then looks up a key that is not UTF-8."""
    folder = tmp_path / "config"
    if not folder.exists():
        folder.mkdir()
        main = subprocess.run([require_tool("postconf"), "-d", "-h", "config_directory"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        write_cooled(folder / "main.cf", (open(f"{main}/main.cf").read() if os.path.exists(f"{main}/main.cf")
                                          else "") + "\nsmtputf8_enable = no\n")
    return folder


EIGHT_BIT_CHECKS = r"""/^X-Latin: caf\xe9$/        REJECT latin header byte E9 seen
/^X-Latin2: caf.$/         REJECT latin header one byte
/^X-Utf8: caf\xc3\xa9$/    REJECT utf8 header seen
/^latin body caf\xe9$/     REJECT latin body line byte E9 seen
"""
EIGHT_BIT_MESSAGES = {  # name -> (header section, body)
    "latin-header": (b"X-Latin: caf\xe9\r\n", b"plain\r\n"),
    "latin-header-dot": (b"X-Latin2: caf\xe9\r\n", b"plain\r\n"),
    "utf8-header": ("X-Utf8: café\r\n".encode(), b"plain\r\n"),
    "latin-body": (b"X-Plain: x\r\n", b"latin body caf\xe9\r\n"),
}


async def eight_bit_replies(port: int) -> dict[str, str]:
    replies = await end_of_data_replies(port, {name: head + b"\r\n" + body
                                               for name, (head, body) in EIGHT_BIT_MESSAGES.items()})
    return {name: "250" if reply.code == 250 else reply.text for name, reply in replies.items()}


async def test_a_header_or_body_line_that_is_not_utf8_is_checked_as_postfix_checks_it(mailflow_server):
    """Postfix's cleanup hands its checks the bytes of a header or body line that is not UTF-8 (postmap -q, with
    smtputf8_enable = yes, would not look such a key up: cleanup's maps are not UTF-8 checked); mailflow matched
    U+FFFD (EF BF BD) in their place, so `\xe9` and `.` found nothing."""
    folder = readable_folder()
    (folder / "checks").write_text(EIGHT_BIT_CHECKS)
    async with postfix_instance({
        "myhostname": "pf.test", "mydestination": "", "relay_domains": "relay.test", "relayhost": "[127.0.0.1]:9",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "header_checks": f"pcre:{folder}/checks", "body_checks": f"pcre:{folder}/checks",
    }) as pf:
        postfix = await eight_bit_replies(pf.port)
    mf = await mailflow_server(mydestination=[], relay_domains=["relay.test"], relayhost="[127.0.0.1]:9",
                               mynetworks=["127.0.0.0/8"], checks={"header_checks": [f"pcre:{folder}/checks"],
                                                                  "body_checks": [f"pcre:{folder}/checks"]})
    mailflow = await eight_bit_replies(mf.smtp_addresses[0][1])
    shutil.rmtree(folder)
    assert postfix == mailflow
    assert set(postfix.values()) == {"550 5.7.1 latin header byte E9 seen", "550 5.7.1 latin header one byte",
                                     "550 5.7.1 utf8 header seen", "550 5.7.1 latin body line byte E9 seen"}


TAKEN_AS_BYTES_CHECKS = rb"""/^X-Rej: (.*)$/           REJECT rejected [$1]
/^X-Rep: (.*)$/           REPLACE X-Replaced: [$1]
/^X-Pre: (.*)$/           PREPEND X-Prepended: [$1]
/^X-Cut: (\xc3\xa9+)(.)/  REJECT cut [$1][$2]
"""
TAKEN_AS_BYTES_MESSAGES = {  # name -> header field (a Subject naming the message follows)
    "reject-latin": b"X-Rej: caf\xe9\r\n",
    "reject-utf8": "X-Rej: café\r\n".encode(),
    "reject-controls": b"X-Rej: a\x01b\x7fc\tc\r\n",
    "reject-cut": "X-Cut: ééx\r\n".encode(),  # ($2 is the C3 of the second é: not UTF-8)
    "replace-latin": b"X-Rep: caf\xe9\r\n",
    "prepend-latin": b"X-Pre: caf\xe9\r\n",
}


async def taken_as_bytes(port: int, dump, messages: dict[str, bytes] = TAKEN_AS_BYTES_MESSAGES
                         ) -> tuple[dict[str, str], dict[str, bytes]]:
    """Each message's reply at the end of DATA, and the header section of each one delivered to the sink."""
    from tests.support import eventually
    from tests.support.postfix import dumped_messages

    answers = await end_of_data_replies(port, {name: field + b"Subject: " + name.encode() + b"\r\n\r\nbody\r\n"
                                        for name, field in messages.items()}, "MAIL FROM:<s@remote.test> BODY=8BITMIME")
    replies = {name: "250" if reply.code == 250 else reply.text for name, reply in answers.items()}
    queued = sum(1 for text in replies.values() if text == "250")
    await eventually(lambda: len(dumped_messages(dump)) == queued, timeout=20)
    heads = {}
    for message in (dump.read_bytes() if dump.exists() else b"").split(b"X-Client-Addr:")[1:]:
        fields = [line for line in message.split(b"\r\n\r\n", 1)[0].split(b"\n") if line.startswith(b"X-")]
        subject = message.split(b"Subject: ", 1)[1].split(b"\n", 1)[0].rstrip(b"\r").decode()
        heads[subject] = b"\n".join(line.rstrip(b"\r") for line in fields
                                     if not line.startswith((b"X-Client", b"X-Helo", b"X-Mail", b"X-Rcpt")))
    return replies, heads


async def test_a_pcre_result_that_is_not_utf8_is_taken_as_postfix_s_cleanup_takes_it(mailflow_server):
    """A `$1` of a Latin-1 header (or one that cuts a character in two) is no lookup error on cleanup's path, as in
    Postfix's cleanup (mailflow deferred the message, 4.3.0): REPLACE and PREPEND write its bytes into the message,
    REJECT's reply text has a space for each byte that is not UTF-8 and for each control (a reply stays one line
    of text), UTF-8 kept (smtputf8_enable = yes, mailflow's)."""
    from tests.support.postfix import smtp_sink

    folder = readable_folder()
    (folder / "checks").write_bytes(TAKEN_AS_BYTES_CHECKS)
    common = {"myhostname": "pf.test", "mydestination": "", "relay_domains": "relay.test",
              "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination", "smtputf8_enable": "yes"}
    async with smtp_sink() as (pf_sink, pf_dump), smtp_sink() as (mf_sink, mf_dump):
        async with postfix_instance({**common, "relayhost": f"[127.0.0.1]:{pf_sink}",
                                     "header_checks": f"pcre:{folder}/checks"}) as pf:
            postfix = await taken_as_bytes(pf.port, pf_dump)
        mf = await mailflow_server(mydestination=[], relay_domains=["relay.test"],
                                   relayhost=f"[127.0.0.1]:{mf_sink}", mynetworks=["127.0.0.0/8"],
                                   checks={"header_checks": [f"pcre:{folder}/checks"]})
        mailflow = await taken_as_bytes(mf.smtp_addresses[0][1], mf_dump)
    shutil.rmtree(folder)
    assert mailflow == postfix
    assert postfix == ({"reject-latin": "550 5.7.1 rejected [caf ]", "reject-utf8": "550 5.7.1 rejected [café]",
                        "reject-controls": "550 5.7.1 rejected [a b c c]", "reject-cut": "550 5.7.1 cut [é][ ]",
                        "replace-latin": "250", "prepend-latin": "250"},
                       {"replace-latin": b"X-Replaced: [caf\xe9]",
                        "prepend-latin": b"X-Prepended: [caf\xe9]\nX-Pre: caf\xe9"})


async def test_a_regexp_group_over_a_byte_that_is_not_utf8_is_written_back_as_postfix_s_cleanup_does(
        mailflow_server):
    """regexp: matches such a byte as U+FFFD (RE2's UTF-8 mode matches no invalid byte): its `$1` wrote EF BF BD into
    the message where Postfix's cleanup writes the byte; it writes the byte now, and a REJECT's reply has a space
    for it, as pcre:'s (the test above) and Postfix's."""
    from tests.support.postfix import smtp_sink

    folder = readable_folder()
    (folder / "checks").write_bytes(b"".join(line + b"\n" for line in TAKEN_AS_BYTES_CHECKS.splitlines()
                                             if not line.startswith(b"/^X-Cut")))
    messages = {name: field for name, field in TAKEN_AS_BYTES_MESSAGES.items() if name != "reject-cut"}
    common = {"myhostname": "pf.test", "mydestination": "", "relay_domains": "relay.test",
              "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination", "smtputf8_enable": "yes"}
    async with smtp_sink() as (pf_sink, pf_dump), smtp_sink() as (mf_sink, mf_dump):
        async with postfix_instance({**common, "relayhost": f"[127.0.0.1]:{pf_sink}",
                                     "header_checks": f"regexp:{folder}/checks"}) as pf:
            postfix = await taken_as_bytes(pf.port, pf_dump, messages)
        mf = await mailflow_server(mydestination=[], relay_domains=["relay.test"],
                                   relayhost=f"[127.0.0.1]:{mf_sink}", mynetworks=["127.0.0.0/8"],
                                   checks={"header_checks": [f"regexp:{folder}/checks"]})
        mailflow = await taken_as_bytes(mf.smtp_addresses[0][1], mf_dump, messages)
    shutil.rmtree(folder)
    assert mailflow == postfix
    assert postfix[1] == {"replace-latin": b"X-Replaced: [caf\xe9]",
                          "prepend-latin": b"X-Prepended: [caf\xe9]\nX-Pre: caf\xe9"}

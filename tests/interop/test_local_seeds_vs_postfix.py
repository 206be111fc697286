"""Seeded differential of local(8)'s expansion against a private Postfix 3.7: alias tables, :include: files and
.forward files that combine what test_local_vs_postfix.py takes one at a time (its harness: the local domain
origin.test, mbox mailboxes in a spool directory, commands run as `nobody`, notices to the client's sender
discarded).

A case (`generated(seed)`) holds aliases to aliases (chains, loops, an alias listing itself), owner- aliases of
some (mailing lists) and -request names, :include: files (nested, missing, unreadable), nobody's .forward and
.forward+x with several targets, /files and relative names, |commands exiting 0, 75, 67 or 1, user+ext, the same
member reached twice, an unknown user. Postfix finds the .forward where mailflow keeps it
(`<maildir_base>/<user>/.forward`) through forward_path with $extension. Each recipient is one message whose
Subject is its name.

Compared per case: the copies delivered (per mailbox, /file and command: the Subjects it got, counted; notices not
counted, neither those from MAILER-DAEMON nor any other message whose Subject is a notice's (NOTICE_SUBJECTS: a list
resubmits a notice from its owner): how many arrive before the case settles depends on each server's timers, a
notice loop between list owners goes on, and test_notices_vs_postfix.py compares them); the local results (status
and text; a resubmitted copy is a message of its own, so they are compared over the case, not per recipient). Not
compared: to= and orig_to= of each line, nor its status: mailflow logs one line per recipient (its parts joined by
`; `, those delivered under a failure in `(also: …)`, one text given once with `(N times)`, all under the worst
status), Postfix one per destination (docs/transports.md); so each side's lines give a set of texts, compared.

CURATED holds seeds that agree, run as regular tests, and WRITTEN cases written out for one rule each; set
MAILFLOW_LOCAL_SEEDS (`1-200` or `1,2,3`) to run `test_generated_local_cases_match_a_real_postfix` over those seeds
(give pytest `--timeout 0`: ~6 s a seed); MAILFLOW_LOCAL_SEEDS_LOG=FILE keeps the last Postfix log there.
"""
from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailflow.app import Mailflow
from mailflow.config import config_from_dict
from tests.interop.test_local_vs_postfix import COMMON, DISCARD_NOTICES, NOBODY
from tests.support import SmtpClient, base_settings, eventually, merged, postfix_instance, script_dir
from tests.support.maillog import mail_log_file
from tests.support.seeds import seed_list

pytestmark = pytest.mark.interop

# argv: name, exit status; records the name and the message's Subject, one line per run
RECORD = ('s=$(awk \'/^Subject: / && !x {{ x = substr($0, 10) }} END {{ print x }}\')\n'
          'printf "%s %s\\n" "$1" "$s" >> {out}/runs\n'
          'exit "$2"\n')
NOTICE_SUBJECTS = ("Undelivered Mail Returned to Sender", "Delayed Mail (still being retried)",
                   "Successful Mail Delivery Report", "Mail Delivery Status Report")  # bounce(8)'s, and mailflow's
QUIET, POLL = 0.3, 0.05  # seconds: see settled()
_RESULT = re.compile(r"[ /]local(?:\[\d+\])?: \w+: (?P<line>to=<[^>]*>, (?:orig_to=<[^>]*>, )?relay=local), .*?"
                     r"(?P<status>dsn=[^,]+, status=\w+ \(.*\))$")


@dataclass
class Case:
    """One generated setup: alias lines, :include: files (None: missing; "SECRET": unreadable), .forward files."""

    aliases: dict[str, str]
    includes: dict[str, str | None]
    forwards: dict[str, str]  # ".forward", ".forward+x": content
    traffic: list[str]


def member(rng: random.Random, names: list[str], includes: list[str], spool: str, script: str) -> str:
    roll = rng.random()
    if roll < 0.3:
        return rng.choice(names)
    if roll < 0.45:
        return rng.choice(["nobody", "nobody+x", "nobody+y", "NoBody", "ghost", "files/rel"])
    if roll < 0.65:
        return f'"|{script} c{rng.randint(0, 3)} {rng.choice([0, 0, 75, 67, 1])}"'
    if roll < 0.8:
        return f"{spool}/files/f{rng.randint(0, 2)}"
    return f":include:{spool}/inc/{rng.choice(includes)}"


def generated(seed: int, spool: str = "SPOOL", script: str = "SCRIPT") -> Case:
    rng = random.Random(seed)
    names = [f"a{i}" for i in range(rng.randint(3, 6))]
    includes = ["i0", "i1"]
    pick = lambda: member(rng, names, includes, spool, script)  # noqa: E731
    aliases = {n: ", ".join(pick() for _ in range(rng.choice([1, 1, 2, 3]))) for n in names}
    for n in names:
        if rng.random() < 0.3:
            aliases[f"owner-{n}"] = rng.choice(["nobody", rng.choice(names), f"{spool}/files/owner"])
        if rng.random() < 0.15:
            aliases[f"{n}-request"] = rng.choice(["nobody", rng.choice(names)])
    inc: dict[str, str | None] = {}
    for i in ("i0", "i1"):
        inc[i] = "".join(pick() + "\n" for _ in range(rng.randint(1, 3)))
    forwards = {}
    for name in (".forward", ".forward+x"):
        if rng.random() < 0.5:
            forwards[name] = ", ".join(rng.choice(["\\nobody", "nobody", pick()]) for _ in range(rng.randint(1, 3)))
    traffic = [*aliases, "nobody", "nobody+x", "nobody+y"]
    return Case(aliases, inc, forwards, traffic)


@dataclass
class Outcome:
    copies: dict[str, Counter] = field(default_factory=dict)  # mailbox, file or command: Subjects it got
    lines: set[str] = field(default_factory=set)


def prepared(case: Case, spool: Path) -> Path:
    spool.chmod(0o1777)
    for folder in ("files", "inc"):
        (spool / folder).mkdir()
        (spool / folder).chmod(0o1777)
    home = spool / "homes" / "nobody"
    home.mkdir(parents=True)
    for name, text in case.forwards.items():
        (home / name).write_text(text + "\n")
        shutil.chown(home / name, NOBODY, NOBODY)
    for name, text in case.includes.items():
        if text is not None:
            (spool / "inc" / name).write_text(text)
            (spool / "inc" / name).chmod(0o600 if name == "secret" else 0o644)
    table = spool / "aliases"
    table.write_text("".join(f"{name}: {value}\n" for name, value in case.aliases.items()))
    return table


async def send_traffic(port: int, traffic: list[str]) -> None:
    for name in traffic:
        c = await SmtpClient.connect(port)
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<s@sender.test>")).code == 250
        assert (await c.cmd(f"RCPT TO:<{name}@origin.test>")).code == 250, name
        assert (await c.cmd("DATA")).code == 354
        await c.send(f"Subject: {name}\r\nFrom: s@sender.test\r\n\r\nbody\r\n.\r\n".encode())
        assert (await c.reply()).code == 250
        await c.cmd("QUIT")
        await c.close()


def result_lines(log: str, spool: Path, script: Path) -> list[str]:
    found = [m["line"] + ", " + m["status"] for m in map(_RESULT.search, log.splitlines()) if m]
    return [normalized(line.replace(str(script), "SCRIPT").replace(str(spool), "SPOOL")) for line in found]


def normalized(line: str) -> str:
    """A result line without what differs on purpose: queue ids, mailflow's `forwarded as ID to ADDRESS` (Postfix
    names no address)."""
    return re.sub(r"forwarded as \w+(?: to [^;)]+)?", "forwarded as ID", line)


async def settled(read_log, spool: Path, script: Path, traffic: list[str], delivering, flushed=None) -> set[str]:
    """The result lines once every recipient has one of its own (bounded), then once the server has had no delivery
    under way and no new line for QUIET seconds, looked at every POLL (at most 10 s in all: a notice loop between list
    owners goes on). A line of its own: its orig_to, or its to= without one (`to=<a1@…>, orig_to=<a0@…>` is a0's
    message, not a1's, which may still be on its way). "No delivery under way" is what says nothing more comes, not
    the quiet: a message forwarded or a notice is queued (Postfix: a file in incoming; mailflow: a delivery task)
    before the delivery that makes it ends, and a delivery waiting for a mailbox lock (Postfix sleeps a second
    between tries) logs nothing for longer than the quiet. The quiet covers the moment between a message queued and
    its delivery begun; `flushed` makes each look read every line Postfix's postlogd was sent before it."""
    def answered() -> bool:
        owners = {_whose(line) for line in result_lines(read_log(), spool, script)}
        return all(f"{name}@origin.test".lower() in owners for name in traffic)
    try:
        await eventually(answered, timeout=30, step=0.1)
    except AssertionError:
        pass  # compared as it is: the difference shows
    loop = asyncio.get_running_loop()
    count, quiet_since, deadline = -1, loop.time(), loop.time() + 10
    while loop.time() < deadline:
        if flushed is not None:
            await flushed()
        now = len(result_lines(read_log(), spool, script))
        if now != count or delivering():
            count, quiet_since = now, loop.time()
        elif loop.time() - quiet_since >= QUIET:
            break
        await asyncio.sleep(POLL)
    return set(result_lines(read_log(), spool, script))


def _whose(line: str) -> str:
    """The recipient a result line is about: its orig_to, else its to= (lower case)."""
    m = re.match(r"to=<([^>]*)>(?:, orig_to=<([^>]*)>)?", line)
    return (m[2] or m[1]).lower() if m else ""


def subjects_of_mbox(text: str) -> Counter:
    """Each message's own Subject (not those a notice quotes), counted; not the notices (see the module doc), also
    one a list resubmitted, which comes from its owner, not MAILER-DAEMON."""
    found: Counter = Counter()
    for message in re.split(r"^From ", text, flags=re.MULTILINE)[1:]:
        if message.startswith("MAILER-DAEMON "):
            continue
        subject = re.search(r"^Subject: (.*)$", message.partition("\n\n")[0], re.MULTILINE)
        if not subject or subject[1] not in NOTICE_SUBJECTS:
            found[subject[1] if subject else ""] += 1
    return found


def collect(outcome: Outcome, spool: Path, out: Path) -> Outcome:
    for path in sorted([spool / "nobody", *(spool / "files").glob("*")]):
        if path.is_file():
            outcome.copies[path.name] = subjects_of_mbox(path.read_text(errors="replace"))
    runs = out / "runs"
    if runs.exists():
        for line in runs.read_text().splitlines():
            name, _, subject = line.partition(" ")
            if subject not in NOTICE_SUBJECTS:  # (not counted: see the module doc)
                outcome.copies.setdefault(f"|{name}", Counter())[subject] += 1
        runs.unlink()
    return outcome


async def run_postfix(case_of, script: Path, out: Path) -> Outcome:
    spool = Path(tempfile.mkdtemp(prefix="mailflow-spool-"))
    case = case_of(str(spool), str(script))
    table = prepared(case, spool)
    subprocess.run(["postalias", f"hash:{table}"], check=True, capture_output=True)
    home = f"{spool}/homes/$user"
    try:
        async with postfix_instance({**COMMON, "mydestination": "origin.test", "alias_maps": f"hash:{table}",
                                     "alias_database": "", "home_mailbox": "", "mail_spool_directory": str(spool),
                                     "forward_path": f"{home}/.forward${{recipient_delimiter}}${{extension}}, "
                                                     f"{home}/.forward",
                                     "transport_maps": DISCARD_NOTICES}) as pf:
            await send_traffic(pf.port, case.traffic)
            outcome = Outcome(lines=await settled(lambda: pf.maillog, spool, script, case.traffic, pf.delivering,
                                                        pf.flushed))
            if os.environ.get("MAILFLOW_LOCAL_SEEDS_LOG"):
                Path(os.environ["MAILFLOW_LOCAL_SEEDS_LOG"]).write_text(pf.maillog)
        return collect(outcome, spool, out)
    finally:
        shutil.rmtree(spool, ignore_errors=True)


async def run_mailflow(case_of, script: Path, out: Path, tmp: Path) -> Outcome:
    spool = Path(tempfile.mkdtemp(prefix="mailflow-spool-"))
    case = case_of(str(spool), str(script))
    table = prepared(case, spool)
    settings = merged(base_settings(tmp), {
        **COMMON, "mydestination": ["origin.test"], "alias_maps": [f"texthash:{table}"],
        "local_recipient_maps": ["inline:{nobody=x}"], "transport_maps": [DISCARD_NOTICES],
        "queue": {"minimal_backoff_time": "300s", "maximal_backoff_time": "4000s"},  # Postfix's: no retry here
        "local": {"home_mailbox": "", "mail_spool_directory": str(spool), "maildir_base": str(spool / "homes")}})
    try:
        with mail_log_file(tmp / "mail.log") as log:
            mf = Mailflow(config_from_dict(settings), shutdown_grace=2.0)
            await mf.start()
            try:
                await send_traffic(mf.smtp_addresses[0][1], case.traffic)
                outcome = Outcome(lines=await settled(log.read_text, spool, script, case.traffic,
                                                        lambda: not mf.idle))
            finally:
                await mf.stop()
        return collect(outcome, spool, out)
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def compare(case_of, tmp: Path) -> tuple[Outcome, Outcome]:
    """Both servers at once, each with its spool and its recording script (their paths read SPOOL and SCRIPT in
    what is compared): Postfix's side on a thread and a loop of its own, as its tools block their caller while
    they run, which on mailflow's loop would pass for a quiet time in which mailflow could not work."""
    with script_dir() as theirs, script_dir() as ours, ThreadPoolExecutor(1) as thread:
        postfix_side = thread.submit(asyncio.run, run_postfix(case_of, recorder(theirs), theirs.out))
        mailflow = asyncio.run(run_mailflow(case_of, recorder(ours), ours.out, tmp))
        postfix = postfix_side.result()
    return postfix, mailflow


def recorder(scripts) -> Path:
    return scripts.script("record.sh", RECORD.format(out=scripts.out))


def differences(postfix: Outcome, mailflow: Outcome) -> dict:
    found: dict = {}
    for where in sorted(set(postfix.copies) | set(mailflow.copies)):
        p, m = postfix.copies.get(where, Counter()), mailflow.copies.get(where, Counter())
        if p != m:
            found[f"copies {where}"] = {"postfix": dict(p), "mailflow": dict(m)}
    p_parts, m_parts = results_of(postfix.lines), results_of(mailflow.lines)
    if p_parts != m_parts:
        found["results"] = {"postfix only": sorted(p_parts - m_parts), "mailflow only": sorted(m_parts - p_parts)}
    return found


def results_of(lines: set[str]) -> set[str]:
    """The text of each part of the result lines: mailflow logs one line per recipient, its parts joined
    by `; `, where Postfix logs one per destination, each about its own to=/orig_to= (docs/transports.md)."""
    out = set()
    for line in lines:
        m = re.search(r"status=(\w+) \((.*)\)$", line)
        if m:
            text, _, also = m[2].partition(" (also: ")
            parts = [(m[1], part) for part in text.split("; ")]
            parts += [("sent", part) for part in also.removesuffix(")").split("; ") if also]
            out.update(re.sub(r"^\S+@\S+: |( \(\d+ times\))$", "", part) for _, part in parts)
    return out


# seeds that agree with Postfix, kept as regular tests: seed 2 holds a self-referencing alias, an :include: of it,
# commands exiting 67 and 1, an unknown user in .forward with `nobody` itself, and .forward+x naming an alias and a
# file; seed 33 a relative name (`files/rel`, an address to both) in an alias value and in an :include: file;
# seed 7016 notices that a list resubmits to a file (from its owner, not MAILER-DAEMON: not counted either);
# seed 7012 an alias whose :include: file includes only itself (and an alias of it): done with no line, as local(8);
# seed 7048 a file restricted on an :include: line after one that deferred (not read), then allowed in the alias
# value naming that file: written, as local(8)'s duplicate filter first meets it there; seed 7045 a member resubmitted
# by an :include: file and again by a list with an owner- alias met through it: one new message, as local(8)
# seed 7158 an alias cycle whose :include: file is first read at the nesting limit (its member bounced there, not
# resubmitted above it), 7031 the names local(8)'s `alias database loop for NAME` lines give at that limit, 7184 a
# user met there in its own .forward+x (bounced: local(8)'s exp_from is the .forward's recipient, nobody+x)
CURATED = [2, 33, 7012, 7016, 7045, 7048, 7031, 7158, 7184]
# Not here on purpose: seed 70006. Its :include: file resubmits nobody+x and NoBody in one new message, both ending in
# nobody's mailbox: Postfix's local(8) takes one recipient per request (local_destination_recipient_limit = 1), so
# its duplicate filter lets each write a copy (two); mailflow writes one mailbox copy per local part per delivery
# (one). The rest of that seed agrees (docs/transports.md, "## local"). So do seeds 7005, 7024, 7029, 7042, 7067,
# 7114, 7123, 7133, 7136, 7156, 7172, 7198, 7219, 7258, 7262, 7269, 7277 and 7300 (nobody's copies only: a list
# resubmits two names of nobody's in one new message; 7114's also count a notice loop between list owners).


# cases written out, each for a rule of local(8)'s duplicate filter that a seed found (seeds hold more than one)
WRITTEN = {
    # a command is run once per user whose expansion names it (command.c's key: user, uid, command): twice here
    "command named by two aliases": lambda spool, script: Case(
        {"a1": f'"|{script} c0 0", a2', "a2": f'"|{script} c0 0"'}, {}, {}, ["a1"]),
    # a file is written once per uid, restricted or not (file.c's key comes before the restriction): f0 written
    # for `first` and not refused in i0; f1 refused in i0 for `later` and so not written after it
    "file met allowed, then restricted, and the other way": lambda spool, script: Case(
        {"first": f"{spool}/files/f0, :include:{spool}/inc/i0", "later": f":include:{spool}/inc/i0, {spool}/files/f1"},
        {"i0": f"{spool}/files/f1\n{spool}/files/f0\n"}, {}, ["first", "later"]),
    # a mailbox gets a copy per local part, its extension included (mailbox.c's key): nobody twice, not three times
    "mailbox named with and without an extension": lambda spool, script: Case(
        {"a2": "nobody, a1, nobody+y", "a1": "NoBody"}, {}, {}, ["a2"]),
    # no further line of a .forward (or :include:) file once one defers (token.c's deliver_token_stream): c1 75
    # defers, c2 on its line runs, c3 and the mailbox on later lines wait; c0, after nobody in a1's value, runs
    "file lines after a deferral": lambda spool, script: Case(
        {"a1": f'nobody, "|{script} c0 0"'}, {},
        {".forward": f'"|{script} c1 75", "|{script} c2 0"\n"|{script} c3 0"\n\\nobody'}, ["nobody", "a1"]),
    # ... and a file named on such a line is not met there: where it is restricted (i1) it is not refused, and so is
    # written where it is allowed after it (a3's value; file.c's key is taken where local(8) first gets to; seed 7048)
    "a restricted file after a deferral, then allowed": lambda spool, script: Case(
        {"a3": f":include:{spool}/inc/i1, {spool}/files/f0", "a1": f'"|{script} c1 75"'},
        {"i1": f"a1\n{spool}/files/f0\n"}, {}, ["a3"]),
    # ... and a file named at three places is settled at the first place local(8) reaches (file.c's key, then its
    # restriction): allowed on a line of .forward+x after one that deferred (not read), then restricted in i0 an
    # :include: file of .forward names, then allowed in .forward: refused, not written (each with nobody's rights)
    "a file allowed after a deferral, restricted, then allowed": lambda spool, script: Case(
        {"a1": "nobody+x, nobody"}, {"i0": f"{spool}/files/f0\n"},
        {".forward+x": f'"|{script} c1 75"\n{spool}/files/f0',
         ".forward": f":include:{spool}/inc/i0\n{spool}/files/f0"},
        ["a1"]),
    # ... and the other way: restricted in i0 on a line after the deferral (not read), allowed in .forward, then
    # restricted in i1: written
    "a file restricted after a deferral, allowed, then restricted": lambda spool, script: Case(
        {"a1": "nobody+x, nobody"}, {"i0": f"{spool}/files/f0\n", "i1": f"{spool}/files/f0\n"},
        {".forward+x": f'"|{script} c1 75"\n:include:{spool}/inc/i0',
         ".forward": f"{spool}/files/f0\n:include:{spool}/inc/i1"},
        ["a1"]),
    # an address met again at a nesting level it was met at already gets nothing more (local(8)'s "recipient LEVEL
    # ADDRESS" key; an alias's or a .forward's members are 4 levels deeper): nobody in its .forward (level 9) settles
    # the nobody a1, a list, names at that level, which is not resubmitted: one copy, not two (seeds 7113, 7116)
    "an address met again at its nesting level": lambda spool, script: Case(
        {"a0": "nobody, a1", "a1": "nobody", "owner-a1": "nobody"}, {}, {".forward": "nobody"}, ["a0"]),
    # ... an :include: file's members are 1 level deeper than the alias's naming it: four nested files name nobody
    # at level 9 (t: a1's nobody was met there, so nothing more), three at level 8 (u: resubmitted, a second copy)
    "include files at the nesting level of an alias member": lambda spool, script: Case(
        {"t": f"a1, :include:{spool}/inc/i0", "u": f"a1, :include:{spool}/inc/j0", "a1": "nobody"},
        {"i0": f":include:{spool}/inc/i1\n", "i1": f":include:{spool}/inc/i2\n", "i2": f":include:{spool}/inc/i3\n",
         "i3": "nobody\n", "j0": f":include:{spool}/inc/j1\n", "j1": f":include:{spool}/inc/j2\n", "j2": "nobody\n"},
        {}, ["t", "u"]),
    # local(8)'s deliver_alias bounces any address met past its nesting limit (level 100): c25 in a chain of aliases
    # (each 4 levels below the one before, from 1), e24 under an :include: file (1 level more); c0's nobody delivered
    "a chain of aliases past the nesting limit": lambda spool, script: Case(
        {**{f"c{i}": f"c{i + 1}" for i in range(25)}, "c0": "c1, nobody", "c25": "nobody",
         **{f"e{i}": f"e{i + 1}" for i in range(24)}, "e24": "nobody", "d0": f":include:{spool}/inc/i0"},
        {"i0": "e0\n"}, {}, ["c0", "d0"]),
    # ... deliver_alias passes over the name the expansion came from (exp_from) before it checks the level, and is
    # given the local part, then the user: nobody+x met in .forward+x past the limit bounces for nobody
    "the user met in its .forward+x past the nesting limit": lambda spool, script: Case(
        {**{f"c{i}": f"c{i + 1}" for i in range(23)}, "c0": "c1, nobody", "c23": "nobody+x"}, {},
        {".forward+x": "nobody+x"}, ["c0"]),
    # an address is resubmitted once however many lists name it, from the first one's owner (local(8)'s
    # deliver_indirect keys its duplicate filter by the address alone): nobody+x gets one copy, not one per list
    # (seed 7045)
    "a member of two lists": lambda spool, script: Case(
        {"a2": "a1, a0", "a1": "nobody+x", "owner-a1": "nobody", "a0": "nobody+x", "owner-a0": "nobody"}, {}, {},
        ["a2"]),
    # a part that bounces beside one deferred is logged bounced at once (local(8)'s bounce_append), not at the retry
    "a bounced part beside a deferred one": lambda spool, script: Case(
        {"a2": f'"|{script} c0 67", ghost, "|{script} c1 75"'}, {}, {}, ["a2"]),
    # failures logged apart, a part delivered beside them is logged too (status=sent), as local(8) logs each
    "a delivered part beside two failures": lambda spool, script: Case(
        {"a2": f'"|{script} c0 67", "|{script} c1 1", "|{script} c2 0"'}, {}, {}, ["a2"]),
    # an alias met again through an :include: file: expanded again, only duplicates, no loop bounce (include.c)
    "an alias loop through an include file": lambda spool, script: Case(
        {"a1": f'"|{script} c0 0", :include:{spool}/inc/i0, nobody', "a2": "a1"}, {"i0": "a2\n"}, {}, ["a1"]),
    # an alias named in a .forward is expanded there (deliver_switch looks aliases up first): its command runs,
    # nobody (the .forward's own user) gets the mailbox; forwarded, a1 came back to nobody's .forward as a loop
    "an alias in a forward file": lambda spool, script: Case(
        {"a1": f'"|{script} c0 0", nobody'}, {}, {".forward": "a1"}, ["nobody"]),
    # an alias met again through its user's .forward is expanded again (dotforward.c resets exp_from): nobody,
    # whose .forward is open, gets the mailbox; no 5.4.6 alias database loop (alias.c names this very case)
    "an alias in its own user's forward file": lambda spool, script: Case(
        {"a1": "nobody"}, {}, {".forward": "a1"}, ["a1"]),
    # a list met again through a member's .forward: the member its mailbox once, the list's command once
    "a list in a member's forward file": lambda spool, script: Case(
        {"a2": f'nobody, "|{script} c0 0"'}, {}, {".forward": "\\nobody, a2"}, ["a2"]),
    # a recipient with a part deferred forwards nothing (forward.c's forward_finish cancels the new messages):
    # nobody+y, a member of i0, gets no copy until the retry
    "a deferred recipient forwards nothing": lambda spool, script: Case(
        {"a1": f':include:{spool}/inc/i0, "|{script} c0 75"'}, {"i0": "nobody+y\n"}, {}, ["a1"]),
    # a .forward in progress is keyed by its path (dotforward.c): in .forward+x, nobody reads .forward (c0 runs),
    # nobody+x is the mailbox
    "the user in its .forward+x": lambda spool, script: Case(
        {}, {}, {".forward+x": "nobody, nobody+x", ".forward": f'"|{script} c0 0"'}, ["nobody+x"]),
    # `\user` is `user`: local(8) drops the backslash as it reads the line (tok822_parse), so in .forward+x `\nobody`
    # reads .forward (c0 runs) and nobody gets no mailbox copy (seeds 70006, 70009)
    "a backslashed user in its .forward+x": lambda spool, script: Case(
        {}, {}, {".forward+x": "\\nobody", ".forward": f'"|{script} c0 0"'}, ["nobody+x"]),
    # ... and in an alias value `\nobody` is nobody, whose .forward is read (c0), no mailbox copy
    "a backslashed user in an alias": lambda spool, script: Case(
        {"a1": f'\\nobody, "|{script} c1 0"'}, {}, {".forward": f'"|{script} c0 0"'}, ["a1"]),
    # two backslashes: the tokenizer keeps one, and recipient.c's `\user` branch gives nobody's mailbox with no
    # alias and no .forward (c0 does not run), c1 runs
    "two backslashes before a user in an alias": lambda spool, script: Case(
        {"a1": f'\\\\nobody, "|{script} c1 0"'}, {}, {".forward": f'"|{script} c0 0"'}, ["a1"]),
    # in quotes each backslash escapes the next: `"\\nobody"` leaves `\nobody`, the mailbox branch (c0 does not run)
    "a quoted backslashed user": lambda spool, script: Case(
        {"a1": '"\\\\nobody", ' + f'"|{script} c1 0"'}, {}, {".forward": f'"|{script} c0 0"'}, ["a1"]),
    # two backslashes left once read (`"\\\\nobody"` in quotes, `\\\\nobody` bare: each backslash escapes the next):
    # recipient.c's mailbox branch takes one, and no user is `\nobody`: 5.1.1 unknown user, c1 runs (it deferred
    # the whole alias as a bad value)
    "two backslashes left in quotes": lambda spool, script: Case(
        {"a1": '"\\\\\\\\nobody", ' + f'"|{script} c1 0"'}, {}, {".forward": f'"|{script} c0 0"'}, ["a1"]),
    "two backslashes left bare": lambda spool, script: Case(
        {"a1": '\\\\\\\\nobody, ' + f'"|{script} c1 0"'}, {}, {".forward": f'"|{script} c0 0"'}, ["a1"]),
    # `\nobody (copy)`: the backslash and the comment dropped, nobody's .forward read (c0)
    "a backslashed user with a comment": lambda spool, script: Case(
        {"a1": "\\nobody (copy)"}, {}, {".forward": f'"|{script} c0 0", \\nobody'}, ["a1"]),
    # an alias in an :include: file that nobody's .forward names is looked up before the file's addresses are
    # forwarded (deliver_switch): its member nobody, the .forward's own user, gets the mailbox, not a new message
    # (which came back to the .forward as a loop); without a .forward above, a1's nobody is forwarded (seed 70006)
    "an alias in an include file of a forward file": lambda spool, script: Case(
        {"a1": f'nobody, "|{script} c0 0"', "a2": f":include:{spool}/inc/i0"}, {"i0": "a1\n"},
        {".forward": f":include:{spool}/inc/i0"}, ["nobody", "a2"]),
}


@pytest.mark.parametrize("seed", CURATED)
def test_curated_local_cases_match_a_real_postfix(tmp_path, seed):
    postfix, mailflow = compare(lambda spool, script: generated(seed, spool, script), tmp_path)
    assert differences(postfix, mailflow) == {}
    assert postfix.copies and postfix.lines  # (something was delivered and logged)


@pytest.mark.parametrize("name", WRITTEN)
def test_written_local_cases_match_a_real_postfix(tmp_path, name):
    postfix, mailflow = compare(WRITTEN[name], tmp_path)
    assert differences(postfix, mailflow) == {}
    assert postfix.copies and postfix.lines  # (something was delivered and logged)


@pytest.mark.skipif(not os.environ.get("MAILFLOW_LOCAL_SEEDS"), reason="set MAILFLOW_LOCAL_SEEDS=1-200 to run")
def test_generated_local_cases_match_a_real_postfix(tmp_path_factory):
    report = {}
    for seed in seed_list(os.environ["MAILFLOW_LOCAL_SEEDS"]):
        try:
            postfix, mailflow = compare(lambda spool, script, s=seed: generated(s, spool, script),
                                        tmp_path_factory.mktemp(f"seed{seed}"))
        except AssertionError as e:  # a refused RCPT
            found = {"error": str(e).splitlines()[0]}
        else:
            found = differences(postfix, mailflow)
        if found:
            report[seed] = {"case": generated(seed), "differences": found}
            print(f"seed {seed}: {report[seed]}", flush=True)
    assert not report

"""Differential test of restriction lists in combination, against a private Postfix 3.7 configured alike: where
the evaluation rules interact (the order of items; permit, reject, defer ends; defer_if_permit and defer_if_reject
carried to the end of a list and across lists; warn_if_reject before another item, a class among them;
smtpd_delay_reject yes and no; classes naming classes; access values that are actions, restrictions or class
names; the same item in several lists; smtpd_helo_required, strict_rfc821_envelopes; clients in mynetworks or not,
through XCLIENT).

The extended draws (restriction_lists.extended, from a stream of their own) add the etrn list and ETRN commands,
access keys in address forms (user@, domain, `<>`), reject_sender_login_mismatch without AUTH, BDAT in place of
DATA and commands pipelined in one write (a group's replies read in order; a BDAT's chunk sent with its line).
The draws of more_items (a third stream) add Postfix 3.7's permit_inet_interfaces (every session connects from
127.0.0.1, an address both servers listen on: it permits whatever client XCLIENT names, on both) and
check_relay_domains in any list or class, and smtpd_null_access_lookup_key `nullsender` with a sender table keyed
by it and `<>`.

The combinations come from the seeded generator tests/support/restriction_lists.generated; each runs on one
Postfix whose main.cf is rewritten for it (its daemons have max_use = 1: every session a fresh smtpd that reads the
new main.cf, so no `postfix reload` is needed; measured here: a combination takes about 0.25 s, both sides, where a
fresh instance each would add 0.3 s of start and stop) and on a mailflow started for it. Compared per session:
every reply (a greeting, a HELO/EHLO or XCLIENT 250 by its code only, a queue id masked), and per combination the
reject, reject_warning, warn, info, hold, discard, filter, redirect and bcc log lines (queue ids masked). A
configuration Postfix's smtpd dies of (`fatal: …`, then a connection it leaves in the listen queue is served under
a working main.cf before the next combination) must be one mailflow refuses to start with, both for the relay
guard; Postfix answering fewer sessions than were sent (a timeout) is a difference.

SEEDS are the combinations kept from the exploration of the base draws (each differed before the fix it names),
EXTENDED_SEEDS those of the extended ones, MORE_SEEDS those with more_items. With MAILFLOW_RESTRICT_SEEDS=1-500
(or 1,5,9) those seeds run instead, extended and with more_items, an exploration (add `--timeout 900`; 1-900 took
3 minutes); MAILFLOW_RESTRICT_REPORT=FILE writes the differences found so far after each seed.

Differences on purpose (docs/security.md), masked or kept out of the generator's pool: mailflow's reply to an
access value it cannot take (a class naming itself through a table: nested too deep) names what it refused,
`451 4.3.5 <x>: … rejected: Server configuration error`, Postfix's is the bare words (masked); an undefined class
or classes in a loop refuse mailflow's start; the EHLO keywords; a relay or recipient list that reaches a bare
permit through a class before its guard, or whose guard follows a run of warn_if_reject, refuses mailflow's start
(Postfix's has_required starts it, an open relay). Known and left (docs/security.md): Postfix checks
reject_unlisted_sender at most once per run of smtpd_check_mail (at MAIL; with delay_reject = yes at each RCPT
too), so with delay_reject = no it refuses the first RCPT only outside the sender list, and with yes every other
RCPT in the client or helo list (run before that reset) and it skips a VRFY inside a transaction or a second
list of the same RCPT; mailflow checks it wherever met. The generator puts it in the sender list only.
Postfix 3.7.11 and earlier (fixed in 3.7.22) keep the transaction after end_of_data_restrictions refuse a message
(an ETRN then gets `503 Error: MAIL transaction in progress`), mailflow ends it: for such a Postfix
(`pf.keeps_refused_transactions`) no ETRN is drawn right after a message when there is an end_of_data list
(test_an_end_of_data_refusal_ends_the_transaction_as_documented). After a refused BDAT LAST such a Postfix's ETRN
refusal logs the last RCPT's address (`to=<…>`, stale): dropped from its lines, never from mailflow's. The ETRN
replies' enhanced codes (mailflow's, on purpose) are masked; the ETRN sites are no flush domain (Postfix's flush
service turned from 250 to 459 for relay.test after some 200 combinations of a long run, cause not found; open:
so ETRN's success path, `250 Queuing started`, is not covered here).
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import types
from pathlib import Path

import pytest

from mailflow.app import Mailflow
from mailflow.config import config_from_dict
from mailflow.restriction_vocabulary import RELAY_GUARDS, WARN_IF_REJECT, expand, split_item
from tests.support import base_settings, eventually, merged, postfix_instance
from tests.support.postfix import write_cooled
from tests.support.restriction_lists import MESSAGE, PIPELINED, Combination, generated
from tests.support.dialogue import Reply, SmtpClient
from tests.support.sessions import POSTFIX_BASE, every_session_ended
from tests.support.seeds import seed_list

pytestmark = pytest.mark.interop

# the combinations kept: 1, 2, 8, 22, 46, 68 (defer_if_permit and defer_if_reject as items, in lists, classes and
# access values, replying or not, with either delay_reject, helo_required, strict_rfc821_envelopes,
# smtpd_reject_unlisted_sender, a 450 unknown_local_recipient_reject_code), 82 and 159 (a helo list, a client
# without HELO), 197 (a sender list and a VRFY outside a transaction), 85 (a permit before the relay guard:
# Postfix's smtpd dies of it, mailflow refuses to start)
SEEDS = [1, 2, 8, 22, 46, 68, 82, 159, 197, 85]  # (drawn without `extended`: the base generator's)
# kept from the exploration of the extended generator (etrn list and ETRN, address-form keys, BDAT, pipelining):
# 31 (a BDAT before HELO with helo_required: differed before the fix of data.py's _bdat_refusal), and for what
# Postfix does in them (asserted below): 53 and 108 (reject_unauth_pipelining refusing pipelined commands), 62
# (the client list's defer_if_permit at ETRN), 33 (the null sender's `<>` key)
EXTENDED_SEEDS = [31, 53, 108, 62, 33]
# kept from the exploration of the draws with more_items (permit_inet_interfaces, check_relay_domains, another
# smtpd_null_access_lookup_key; seeds 1-900 explored, none differed): 833, for what Postfix does in it (asserted
# below): permit_inet_interfaces before the relay guard relays for a client XCLIENT names outside mynetworks;
# 91199 (of 90000-91799): a VRFY outside a transaction deferred by the client list's defer_if_permit that an earlier
# transaction's sender step left in the session (Postfix's defer_if_permit_sender; mailflow answered 252)
MORE_SEEDS = [833, 91199]

COMMON_POSTFIX = {**POSTFIX_BASE, "max_use": "1", "service_throttle_time": "1s", "smtpd_forbid_unauth_pipelining": "no",
                  "local_recipient_maps": "inline:{alice=ok, bob=ok}"}


def seeds() -> list[tuple[int, bool, bool]]:
    """(seed, extended, more) each: MAILFLOW_RESTRICT_SEEDS's, extended and with more_items, or the kept ones
    (each as it was kept: the later streams would change it)."""
    out = seed_list(os.environ.get("MAILFLOW_RESTRICT_SEEDS", ""))
    return [(seed, True, True) for seed in out] or [(seed, False, False) for seed in SEEDS] + \
        [(s, True, False) for s in EXTENDED_SEEDS] + [(s, True, True) for s in MORE_SEEDS]


def mailflow_config(combination: Combination, folder: Path):
    return config_from_dict(merged(base_settings(folder), {
        "myhostname": "pf.test", "mydestination": ["local.test"], "relayhost": "[127.0.0.1]:9",
        "mynetworks": ["127.0.0.0/8"], "smtpd": {
            "authorized_xclient_hosts": ["127.0.0.0/8"], "error_sleep_time": "0s", "forbid_unauth_pipelining": False,
            "disable_vrfy_command": False,
            **combination.mailflow()}}))


QUEUED = re.compile(r"^250 2\.0\.0 Ok: (\d+ bytes )?queued as \S+$")  # (BDAT's names the size)
# mailflow names what it refused in its configuration error (docs/security.md: Postfix's text is the bare words)
# mailflow's ETRN protocol replies carry enhanced codes, Postfix's none (docs/security.md, the ETRN row): dropped
# there; a restriction's refusal at ETRN keeps its code (Postfix's has one)
ETRN_ENHANCED_CODE = re.compile(r"(?<=^\d{3}) [245]\.\d{1,3}\.\d{1,3}(?= (?:Queuing started|<[^>]*>: service "
                                r"unavailable|Syntax: ETRN domain|Error: (?:invalid parameter syntax|MAIL transaction "
                                r"in progress|send HELO/EHLO first)|Unable to queue messages)$)")
CONFIGURATION_ERROR = re.compile(r"451 4\.3\.5 <[^>]*>: [A-Za-z -]+ rejected: Server configuration error")


def bare_configuration_error(text: str) -> str:
    return CONFIGURATION_ERROR.sub("451 4.3.5 Server configuration error", text)


def shown(command: str, reply) -> str:
    if reply.code is None:
        return f"{command} -> closed"
    if reply.code in (220, 250) and (not command or command.startswith(("EHLO", "HELO", "XCLIENT"))):
        return f"{command} -> {reply.code}"
    text = bare_configuration_error(QUEUED.sub(r"250 2.0.0 Ok: \1queued as QID", reply.text))
    if command.startswith("ETRN"):
        text = ETRN_ENHANCED_CODE.sub("", text)
    return f"{command} -> {text}"


GREETING_TIMEOUT = 3.0  # (a server that has not greeted by then has stopped answering)


async def replay(port: int, combination: Combination, greeting_timeout: float = GREETING_TIMEOUT) -> list[list[str]]:
    """Each session's replies as `shown`; the message is sent only after a 354 (else it is left out). A greeting
    that does not come ends the replay: the sessions finished before it are returned (fewer than were sent)."""
    out: list[list[str]] = []
    for commands in combination.sessions:
        try:
            out.append(await replay_one(port, commands, greeting_timeout))
        except asyncio.TimeoutError:
            break
    return out


async def replay_one(port: int, commands: list[str], greeting_timeout: float = GREETING_TIMEOUT) -> list[str]:
    client = await SmtpClient.connect(port, greet=False)
    try:
        last = await client.reply(timeout=greeting_timeout)
        out = [shown("", last)]
        for command in commands:
            if last.code is None:
                break
            if command == MESSAGE and last.code != 354:
                continue
            bdat = command.startswith("BDAT")  # (its chunk follows its line: `restriction_lists.BDAT`)
            group = [command] if bdat or command == MESSAGE else command.split(PIPELINED)
            try:
                await client.send(command.encode() + (b"" if bdat else b"\r\n"))
            except ConnectionError:
                group, last = group[:1], Reply(None, "")
            for line in group:  # (one reply each: a pipelined group's, in order; after a close, none)
                if last.code is not None:
                    try:
                        last = await client.reply()
                    except (ConnectionError, asyncio.TimeoutError):
                        last = Reply(None, "")
                out.append(shown(line.split(PIPELINED)[0] if bdat else line, last))
        return out
    finally:
        await client.close()


LOGGED = re.compile(r"(?:.*/smtpd\[\d+\]: )?(?:warning: )?(NOQUEUE|[0-9A-F]+): "
                    r"((?:reject|reject_warning|warn|info|hold|discard|filter|redirect|bcc): .*)")


# Postfix 3.7.11's skip_bdat (fixed in 3.7.22) ends a transaction whose last chunk it refused without its
# rcpt_reset: the last RCPT's address stays, and a later ETRN refusal logs it (`…; to=<a@b> proto=…`, extended
# seed 1360); dropped from such a Postfix's lines only (an ETRN line of mailflow's that names a recipient differs)
ETRN_STALE_RECIPIENT = re.compile(r"^(reject: ETRN from [^;]*; )to=<[^>]*> ")


def logged(lines, stale_etrn_recipient: bool = False) -> list[str]:
    """The lines compared, queue ids masked; `stale_etrn_recipient`: a Postfix's that keeps a refused
    transaction's recipient (`keeps_refused_transactions`), its ETRN lines without it."""
    found = (LOGGED.fullmatch(line) for line in lines)
    return [f"{'NOQUEUE' if m[1] == 'NOQUEUE' else 'QID'}: {compared(m[2], stale_etrn_recipient)}"
            for m in found if m]


def compared(text: str, stale_etrn_recipient: bool = False) -> str:
    text = bare_configuration_error(text)
    return ETRN_STALE_RECIPIENT.sub(r"\1", text) if stale_etrn_recipient else text


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def rewrite_main_cf(pf, settings: dict[str, str]) -> None:
    """The instance's main.cf with `settings` in place of the previous combination's (dated back, so that a
    reader does not wait for it to cool: tests/support/postfix.py)."""
    main_cf = pf.etc / "main.cf"
    current = dict(line.split(" = ", 1) for line in main_cf.read_text().splitlines() if " = " in line)
    write_cooled(main_cf, "".join(f"{k} = {v}\n" for k, v in {**current, **settings}.items()))


async def postfix_side(pf, combination: Combination,
                       greeting_timeout: float = GREETING_TIMEOUT) -> tuple[list[list[str]], list[str]]:
    """Postfix's replies and log lines; a configuration its smtpd dies of (a fatal error at start) is its fatal
    line in place of the sessions. A greeting that did not come: the sessions it answered and the lines logged so
    far, after a drain (`differences` then reports the sessions it did not answer)."""
    rewrite_main_cf(pf, combination.main_cf())
    start = len(pf.maillog)
    replies = await replay(pf.port, combination, greeting_timeout)
    fatal = [line.split("]: ", 1)[-1] for line in pf.maillog[start:].splitlines() if "fatal: " in line]
    if fatal:
        await drained(pf)
        return [[REFUSED[0] + fatal[0]]], []
    if len(replies) < len(combination.sessions):  # (no disconnect line to wait for: a session is left hanging)
        await drained(pf, greeting_timeout)
        return replies, logged(pf.maillog[start:].splitlines(), pf.keeps_refused_transactions)
    # (postlogd writes the log a little later: every session's disconnect line, as many as sessions)
    await eventually(lambda: pf.maillog[start:].count(": disconnect from") >= len(combination.sessions), timeout=10,
                     what="a disconnect line for every session")
    return replies, logged(pf.maillog[start:].splitlines(), pf.keeps_refused_transactions)


NEUTRAL = {**Combination(0).main_cf(), "smtpd_relay_restrictions": "reject_unauth_destination"}


async def drained(pf, greeting_timeout: float = 10.0) -> None:
    """After an smtpd died of a configuration or stopped greeting: a working one, and every connection it left
    waiting in the listen queue served (and its lines logged) before the next combination's, by a probe served
    after them. A Postfix that does not greet the probe either is left so (the caller reports the difference)."""
    rewrite_main_cf(pf, NEUTRAL)
    probe = await SmtpClient.connect(pf.port, greet=False)
    try:
        await probe.reply(timeout=greeting_timeout)
    except asyncio.TimeoutError:
        return
    finally:
        await probe.close()
    await every_session_ended(pf)


async def mailflow_side(combination: Combination, folder: Path) -> tuple[list[list[str]], list[str]]:
    try:
        config = mailflow_config(combination, folder)
    except Exception as error:  # a configuration mailflow refuses: shown in place of the sessions
        return [[f"{REFUSED[1]}{error}"]], []
    handler = Lines()
    logger = logging.getLogger("mailflow")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    mf = Mailflow(config, shutdown_grace=2.0)
    try:
        await mf.start()
        replies = await replay(mf.smtp_addresses[0][1], combination)
    finally:
        await mf.stop()
        logger.removeHandler(handler)
        logger.setLevel(level)
    return replies, logged(handler.lines)


REFUSED = ("postfix's smtpd dies: ", "mailflow refuses the configuration: ")
RELAY_GUARD_REFUSED = ("specify at least one working instance of", "must reach one of")


def differences(combination: Combination, theirs, ours) -> list[str]:
    """The combination and what differs, or nothing. A configuration both refuse for the relay guard is the same;
    one mailflow refuses for the relay guard where Postfix starts is the difference on purpose only when Postfix
    relayed for an outside client to an outside domain in this run, or every list with a guard matches one of the
    documented patterns (docs/security.md: a class reaching a bare permit before the guard, or a guard after a run
    of warn_if_reject): a refusal of a safe list is still a difference."""
    (p_replies, p_log), (m_replies, m_log) = theirs, ours
    p_refused = bool(p_replies[:1] and p_replies[0][0].startswith(REFUSED[0]))
    m_refused = bool(m_replies[:1] and m_replies[0][0].startswith(REFUSED[1]))
    if m_refused and RELAY_GUARD_REFUSED[1] in m_replies[0][0]:
        if p_refused and RELAY_GUARD_REFUSED[0] in p_replies[0][0]:
            return []
        if not p_refused and (relayed_for_outsider(p_replies) or documented_open_relay(combination)):
            return []
    if not p_refused and len(p_replies) != len(combination.sessions):
        return [combination.describe(), f"  postfix answered {len(p_replies)} of {len(combination.sessions)} "
                                        "sessions (timed out), nothing compared"]
    out = []
    for n, (a, b) in enumerate(zip(p_replies, m_replies + [[]] * len(p_replies))):
        if a != b:
            out.append(f"  session {n}: {combination.sessions[n]}")
            out += [f"    postfix:  {x}\n    mailflow: {y}" for x, y in zip(a, b + [""] * len(a)) if x != y]
    if p_log != m_log:
        out.append("  log, postfix: " + "\n                 ".join(p_log))
        out.append("  log, mailflow: " + "\n                 ".join(m_log))
    return [combination.describe(), *out] if out else []


PERMITS = ("permit", "permit_naked_ip_address")  # (the generator's lists have no static: access table)
OUTSIDE_CLIENT, OUTSIDE_DOMAIN = "XCLIENT ADDR=192.0.2.", "@elsewhere.test>"  # (Combination's CLIENTS, RECIPIENTS)


def relayed_for_outsider(replies: list[list[str]]) -> bool:
    """A session's replies (`shown`) show a 250 to a RCPT for an outside domain from a client XCLIENT made one
    outside mynetworks: an open relay seen."""
    for session in replies:
        outside = False
        for line in session:
            command, _, reply = line.partition(" -> ")
            if command.startswith("XCLIENT"):
                outside = command.startswith(OUTSIDE_CLIENT) and reply.startswith("220")
            elif outside and command.startswith("RCPT TO:") and command.endswith(OUTSIDE_DOMAIN) and \
                    reply.startswith("250"):
                return True
    return False


def documented_open_relay(combination: Combination) -> bool:
    """Every relay or recipient list that names a guard (itself or in its classes) matches a pattern
    docs/security.md says leaves it open: a bare `permit` before its first guard (Postfix judges so too), a class
    it names that has a bare `permit` before its first guard, or a guard, a permit or a class reaching either right
    after a warn_if_reject, in the list or a class (Postfix's has_required skips the item after warn_if_reject, a
    warned permit permits). Looser than relay_guard on purpose, and apart from it: a list with a guard and none of
    these is safe, and refusing it is a difference."""
    classes = combination.classes
    lists = [combination.lists.get(name, []) for name in ("relay", "recipient")]
    guarded = [items for items in lists if set(expand(items, classes)) & set(RELAY_GUARDS)]

    def warned(items: list[str]) -> bool:  # (a warned class counts when it reaches a guard or a permit itself)
        names = [split_item(item)[0] for item in items]
        return any(a == WARN_IF_REJECT and (b in RELAY_GUARDS or b in PERMITS or
                                            b in classes and expand(classes[b], classes) & {*RELAY_GUARDS, *PERMITS})
                   for a, b in zip(names, names[1:]))

    def permit_first(items: list[str]) -> bool:
        names = [split_item(item)[0] for item in items]
        return next((name in PERMITS for name in names if name in PERMITS or name in RELAY_GUARDS), False)

    def classes_under(items: list[str]) -> set[str]:  # the classes a list names, at any depth
        found: set[str] = set()
        todo = [split_item(item)[0] for item in items]
        while todo:
            name = todo.pop()
            if name in classes and name not in found:
                found.add(name)
                todo += [split_item(item)[0] for item in classes[name]]
        return found

    def matches(items: list[str]) -> bool:
        under = classes_under(items)
        return permit_first(items) or warned(items) or \
            any(permit_first(classes[name]) or warned(classes[name]) for name in under)
    return bool(guarded) and all(matches(items) for items in guarded)


@pytest.fixture(scope="module")
def postfix():
    instance = postfix_instance(COMMON_POSTFIX)
    loop = asyncio.new_event_loop()
    try:
        pf = loop.run_until_complete(instance.__aenter__())
        # the probe that saw it listen is served before the first combination's main.cf is written
        loop.run_until_complete(eventually(lambda: ": disconnect from" in pf.maillog, timeout=10,
                                           what="the private Postfix's probe served"))
        yield pf
    finally:
        loop.run_until_complete(instance.__aexit__(None, None, None))
        loop.close()


async def test_combined_lists_reply_and_log_as_postfix(postfix, tmp_path):
    found: list[str] = []
    report = os.environ.get("MAILFLOW_RESTRICT_REPORT")  # (the differences so far, rewritten after each seed)
    postfix_replies = {}
    for seed, extend, more in seeds():
        combination = generated(seed, extend, more, postfix.keeps_refused_transactions)
        theirs = postfix_replies[seed, extend, more] = await postfix_side(postfix, combination)
        ours = await mailflow_side(combination, tmp_path / str(seed))
        found += differences(combination, theirs, ours)
        if report:
            Path(report).write_text("\n".join(found) + "\n")
    assert not found, "\n".join(found)
    if not os.environ.get("MAILFLOW_RESTRICT_SEEDS"):  # what Postfix did, so that the same mistake on both sides
        def every(seed: int) -> list[str]:                 # cannot pass unnoticed
            return [reply for session in postfix_replies[seed, False, False][0] for reply in session]
        assert any(reply.endswith("rejected: defer_if_permit requested") for reply in every(1) + every(46))
        assert any(reply.endswith("rejected: defer_if_reject requested") for reply in every(8) + every(68))
        base = {seed: replies for (seed, extend, _), (replies, _) in postfix_replies.items() if not extend}
        assert base[82][1][3] == "RCPT TO:<r2@relay.test> -> 250 2.1.5 Ok"  # the helo list's defer
        assert base[197][0][-2] == "VRFY nodomain -> 554 5.7.1 <nodomain>: Relay access denied"
        assert "specify at least one working instance of" in base[85][0][0]

        def extended(seed: int) -> list[str]:
            return [reply for session in postfix_replies[seed, True, False][0] for reply in session]
        assert "BDAT 26 LAST -> 503 5.5.1 Error: need RCPT command" in extended(31)
        assert any(reply.endswith("Improper use of SMTP command pipelining") for reply in extended(53))
        assert any(reply.endswith("Improper use of SMTP command pipelining") for reply in extended(108))
        assert any(reply.startswith("ETRN") and reply.endswith("Client host rejected: defer_if_permit requested")
                   for reply in extended(62))
        assert any("<>: Sender address rejected" in reply for reply in extended(33))
        more = postfix_replies[833, True, True][0]
        assert more[2][1].startswith("XCLIENT ADDR=192.0.2.2") and \
            "RCPT TO:<x@elsewhere.test> -> 250 2.1.5 Ok" in more[2]


async def test_reject_unlisted_sender_in_the_client_list_differs_as_documented(postfix, tmp_path):
    # docs/security.md, known and left: with delay_reject = yes and the item in the client (or helo) list Postfix
    # refuses every other RCPT (a refusal returns before smtpd_check_mail's reset of sender_rcptmap_checked);
    # in the sender list every RCPT; mailflow refuses each RCPT in both
    rcpts = ["RCPT TO:<alice@local.test>", "RCPT TO:<bob@local.test>"] * 2
    session = ["EHLO good.test", "MAIL FROM:<nobody@local.test>", *rcpts, "QUIT"]
    codes = {}
    for where in ("client", "sender"):
        combination = Combination(0, lists={where: ["reject_unlisted_sender"], "relay": ["reject_unauth_destination"]},
                                  delay_reject=True, sessions=[session])
        theirs = await postfix_side(postfix, combination)
        ours = await mailflow_side(combination, tmp_path / where)
        codes[where] = [[line.split(" -> ")[1][:3] for line in side[0][0][3:7]] for side in (theirs, ours)]
    assert codes["client"] == [["550", "250", "550", "250"], ["550"] * 4]
    assert codes["sender"] == [["550"] * 4, ["550"] * 4]


async def test_an_end_of_data_refusal_ends_the_transaction_as_documented(postfix, tmp_path):
    # docs/security.md: Postfix 3.7.11 and earlier (fixed in 3.7.22): data_cmd returns before mail_reset when
    # end_of_data_restrictions refuse, so the transaction goes on (ETRN: 503); mailflow ends it (ETRN reaches the
    # flush check: 459), as 3.7.22 does
    session = ["EHLO good.test", "MAIL FROM:<s1@remote.test>", "RCPT TO:<alice@local.test>", "DATA", MESSAGE,
               "ETRN elsewhere.test", "QUIT"]
    combination = Combination(0, lists={"end_of_data": ["reject"], "relay": ["reject_unauth_destination"]},
                              sessions=[session])
    theirs = await postfix_side(postfix, combination)
    ours = await mailflow_side(combination, tmp_path)
    refused = f"{MESSAGE} -> 554 5.7.1 <END-OF-MESSAGE>: End-of-data rejected: Access denied"
    ended = [refused, "ETRN elsewhere.test -> 459 <elsewhere.test>: service unavailable"]
    kept = [refused, "ETRN elsewhere.test -> 503 Error: MAIL transaction in progress"]
    assert [side[0][0][5:7] for side in (theirs, ours)] == \
        [kept if postfix.keeps_refused_transactions else ended, ended]


# ---------------------------------------------------------------------------------------------- the comparison itself


def test_a_postfix_timeout_is_a_difference():
    combination = generated(1)
    ours = ([[" -> 220", "MAIL FROM:<a> -> 554 x"]] * len(combination.sessions), [])
    assert differences(combination, ([], []), ours)[1].startswith("  postfix answered 0 of ")


def test_both_refusing_counts_only_for_the_relay_guard():
    combination = generated(1)
    relay = [f"{REFUSED[1]}smtpd: relay_restrictions or recipient_restrictions must reach one of …"]
    assert differences(combination, ([[f"{REFUSED[0]}fatal: specify at least one working instance of …"]], []),
                       ([relay], [])) == []
    assert differences(combination, ([[f"{REFUSED[0]}fatal: unknown restriction class"]], []), ([relay], []))
    assert differences(combination, ([[f"{REFUSED[0]}fatal: specify at least one working instance of …"]], []),
                       ([[f"{REFUSED[1]}smtpd: a class loops"]], []))
    # stricter on purpose: a class reaching permit before the guard, which Postfix starts
    started = ([[" -> 220"]] * len(combination.sessions), [])
    open_class = Combination(1, lists={"relay": ["c1", "reject_unauth_destination"]}, classes={"c1": ["permit"]},
                             sessions=combination.sessions)
    assert differences(open_class, started, ([relay], [])) == []
    warned = Combination(1, lists={"relay": ["warn_if_reject", "reject_unauth_destination"]},
                         sessions=combination.sessions)
    assert differences(warned, started, ([relay], [])) == []


def test_a_relay_guard_refusal_of_a_safe_list_is_a_difference():
    # Postfix started and did not relay for an outsider, and the lists match no documented pattern
    combination = Combination(1, lists={"relay": ["permit_mynetworks", "c1", "reject_unauth_destination"]},
                              classes={"c1": ["reject_non_fqdn_sender"], "c2": ["permit"]},
                              sessions=[["XCLIENT ADDR=192.0.2.1 NAME=[UNAVAILABLE]", "RCPT TO:<x@elsewhere.test>"]])
    relay = [f"{REFUSED[1]}smtpd: relay_restrictions or recipient_restrictions must reach one of …"]
    refused = [" -> 220", "XCLIENT ADDR=192.0.2.1 NAME=[UNAVAILABLE] -> 220",
               "RCPT TO:<x@elsewhere.test> -> 554 5.7.1 <x@elsewhere.test>: Relay access denied"]
    assert differences(combination, ([refused], []), ([relay], []))[0].startswith("seed 1:")
    # the same lists, where Postfix's replies show it relaying for an outside client: an open relay seen
    relayed = refused[:2] + ["RCPT TO:<x@elsewhere.test> -> 250 2.1.5 Ok"]
    assert differences(combination, ([relayed], []), ([relay], [])) == []
    inside = ["XCLIENT ADDR=127.0.0.2 NAME=[UNAVAILABLE] -> 220", relayed[2]]
    assert differences(combination, ([[" -> 220", *inside]], []), ([relay], []))


async def test_only_the_documented_open_relay_patterns_are_excused():
    safe = (Combination(1, lists={"relay": ["c1"]}, classes={"c1": ["reject_unauth_destination", "permit"]}),
            Combination(2, lists={"relay": ["warn_if_reject", "c1", "reject_unauth_destination"]},
                        classes={"c1": ["permit_mynetworks"]}))
    assert not any(documented_open_relay(combination) for combination in safe)
    open_ = (Combination(3, lists={"relay": ["c1", "reject_unauth_destination"]}, classes={"c1": ["permit"]}),
             Combination(4, lists={"relay": ["warn_if_reject", "c1", "reject_unauth_destination"]},
                         classes={"c1": ["reject_unauth_destination"]}),
             Combination(5, lists={"relay": ["permit", "reject_unauth_destination"]}))
    assert all(documented_open_relay(combination) for combination in open_)


async def test_a_postfix_that_stops_greeting_is_reported_with_what_it_answered(tmp_path):
    # the first connection is served (a 250 to every command), the later ones are never greeted
    served = 0

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        served += 1
        if served == 1:
            writer.write(b"220 pf.test ESMTP\r\n")
            while (line := await reader.readline()) and not line.upper().startswith(b"QUIT"):
                writer.write(b"250 ok\r\n")
            writer.write(b"221 bye\r\n")
        else:
            await reader.read()  # (until the client gives up)
        writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    (tmp_path / "main.cf").write_text("")
    pf = types.SimpleNamespace(port=server.sockets[0].getsockname()[1], etc=tmp_path, maillog="",
                               keeps_refused_transactions=False)
    combination = generated(1)
    try:
        replies, log = await asyncio.wait_for(postfix_side(pf, combination, greeting_timeout=0.3), timeout=10)
    finally:
        server.close()
    assert len(replies) == 1 and replies[0][0] == " -> 220" and log == []
    ours = ([[" -> 220"]] * len(combination.sessions), [])
    assert differences(combination, (replies, log), ours)[1] == \
        f"  postfix answered 1 of {len(combination.sessions)} sessions (timed out), nothing compared"


def test_filter_redirect_and_bcc_lines_are_compared():
    lines = ["postfix/smtpd[1]: NOQUEUE: filter: RCPT from x: <a>: Sender address triggers FILTER smtp:[h]:9",
             "postfix/smtpd[1]: NOQUEUE: redirect: RCPT from x: <a>: Recipient address triggers REDIRECT b@c",
             "postfix/smtpd[1]: NOQUEUE: bcc: RCPT from x: <a>: Sender address triggers BCC b@c",
             "postfix/smtpd[1]: NOQUEUE: reject: RCPT from x: 554 5.7.1 <a>: Relay access denied"]
    assert [line.split(": ", 2)[1] for line in logged(lines)] == ["filter", "redirect", "bcc", "reject"]


def test_only_an_old_postfix_etrn_line_loses_its_stale_recipient():
    etrn = "postfix/smtpd[1]: NOQUEUE: reject: ETRN from x: 450 4.7.0 <e.test>: Etrn command rejected: no; to=<a@b> "
    rcpt = "postfix/smtpd[1]: NOQUEUE: reject: RCPT from x: 554 5.7.1 <a@b>: Relay access denied; from=<s> to=<a@b> "
    lines = [etrn + "proto=ESMTP helo=<h>", rcpt + "proto=ESMTP helo=<h>"]
    assert logged(lines, stale_etrn_recipient=True) == [
        "NOQUEUE: reject: ETRN from x: 450 4.7.0 <e.test>: Etrn command rejected: no; proto=ESMTP helo=<h>",
        "NOQUEUE: " + rcpt.split("NOQUEUE: ")[1] + "proto=ESMTP helo=<h>"]
    # mailflow's lines (and a Postfix 3.7.22's) keep it: an ETRN line that names a recipient is a difference
    assert logged(lines) == ["NOQUEUE: " + line.split("NOQUEUE: ")[1] for line in lines]

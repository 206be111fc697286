"""Differential test of the SMTP dialogue against a private Postfix 3.7 configured alike: seeded sessions of 3 to 15
steps (tests/support/dialogues.py: odd verbs and blanks, HELO names, commands out of order, unknown verbs and junk,
long lines, MAIL and RCPT parameters valid and not, BDAT and DATA, pipelined groups), each sent to both servers,
with the error counters small and no error sleep on both sides (smtpd_soft_error_limit = 2,
smtpd_hard_error_limit = 5, smtpd_junk_command_limit = 3), so that their replies and the 421 that ends a session
are compared too. One Postfix serves every session.

Compared, reply by reply: the code and enhanced status code, and the text (the host name and queue id masked; an
EHLO's keywords by its code only; an enhanced status code that Postfix's reply lacks is not compared, mailflow gives
every reply one: docs/security.md); and who closes the session (after the last step a QUIT, then whether the
connection ends).

SEEDS are the sessions kept, run as a regular test (2 to 5 s: measured 2.0 s on a quiet machine, 4.6 s on a busy
one). With MAILFLOW_DIALOGUE_SEEDS=1-300 (or 1,5,9) those seeds run instead, an exploration (measured: 20000 seeds
in 2 to 4 minutes; add `--timeout 900`, and `-p no:logging`: the captured log of a long run slows it down); the
differences are printed, MAILFLOW_DIALOGUE_REPORT=FILE gets each as it is found, then they are asserted none. A seed
during which Postfix's smtpd dies of a signal is listed apart and not compared (Postfix 3.7.11 and earlier, fixed in
3.7.22: its smtpd dies of a SIGSEGV on some BDATs that follow a chunk refused for its size; docs/security.md), and
so is one whose replies were lost to a reset (`lost_to_a_reset`: rare, a pipelined group after which a server
closes). The kept SEEDS must have neither. A reply that comes from neither server (`timeout` on both sides) is a
difference, never a match (`alike`).

Who closes is compared with a reset and a close taken alike where both come at once (`compared`, a kept mask): a
server that closes with pipelined input unread sends a reset, and which of the two the client sees is timing (the
kept seeds 3, 5, 8 and 12 end in a close or a reset on Postfix's side from run to run). After a reset the replies
the client had received are read from asyncio's StreamReader buffer (`buffered_replies`: a private attribute; the
kept seeds 4, 6, 7, 10 and 199 end so on both sides).

Left out of the generator on purpose (the differences kept, test_smtpd_vs_postfix.py's docstring): VRFY, bare LF or
CR, NUL, UTF-8 and SMTPUTF8 (the private Postfix runs with smtputf8_enable = no), STARTTLS. Kept out of it as
documented differences (docs/security.md, docs/config.md; tests/support/dialogues.py says how): a SIZE= over
message_size_limit and a second AUTH= after a refused MAIL (Postfix keeps both until the transaction ends); a BDAT
or DATA after a refused BDAT LAST, only where the private Postfix is older than 3.7.22 (Postfix 3.7.11 and earlier
keep its recipient state, fixed in 3.7.22: `pf.keeps_refused_transactions`); an empty list member around a path
(`RCPT TO: NOTIFY=,`; an RFC 822 phrase before `<>`, `MAIL FROM: AUTH=<>`, is the null sender to both: the RFC 822
forms are test_envelope_forms_vs_postfix.py's); a MAIL, RCPT or EHLO line near the limit whose
length goes into the queue file (Postfix counts its queue file in message_size_limit). A command line over
line_length_limit is sent only as an unknown verb, and mailflow's `500 5.5.2 Error: line too long` is compared as
Postfix's `500 5.5.2 Error: command not recognized` for it (Postfix runs the line's first 2048 bytes).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re

import pytest

from mailflow import status

from tests.support import SmtpClient, eventually, postfix_instance
from tests.support.seeds import seed_list
from tests.support.dialogues import Step, commands_after_data, generated, no_content_after_refused_last, one_auth_mail

pytestmark = pytest.mark.interop

# the first 40 seeds (every kind of step, the error limits' 421, pipelining's 554, BDAT's 551 and 552, lines near
# and over the limit; 32: a DATA after a refused BDAT 0 and a new MAIL), 188 and 199: `AUTH= AUTH=`, an empty
# value that names a sender (503 5.5.4, as Postfix), and 58: an AUTH= after an EHLO that ended an AUTH='s transaction
SEEDS = [*range(1, 41), 188, 199, 58]

POSTFIX = {
    "myhostname": "pf.test", "mydestination": "local.test", "mynetworks": "192.0.2.0/24",
    "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
    "local_recipient_maps": "inline:{alice=ok}", "message_size_limit": "4096", "relayhost": "[127.0.0.1]:9",
    "relay_domains": "relay.test", "smtpd_forbid_unauth_pipelining": "yes", "smtputf8_enable": "no",
    "smtpd_error_sleep_time": "0", "smtpd_soft_error_limit": "2", "smtpd_hard_error_limit": "5",
    "smtpd_junk_command_limit": "3",
    "service_throttle_time": "1s",  # (should its smtpd die, the next session waits 1 s, not 60)
}
MAILFLOW = {
    "myhostname": "pf.test", "mydestination": ["local.test"], "mynetworks": ["192.0.2.0/24"],
    "local_recipient_maps": ["inline:{alice=ok}"], "relayhost": "[127.0.0.1]:9", "relay_domains": ["relay.test"],
    "smtpd": {"message_size_limit": 4096, "error_sleep_time": "0s", "soft_error_limit": 2, "hard_error_limit": 5,
              "junk_command_limit": 3},
}
REPLY_TIMEOUT = 10.0  # (no reply by then: the server waits for input the other did not; a difference)
ENHANCED = re.compile(r"\d{3} [245]\.\d{1,3}\.\d{1,3} ")


def seeds() -> list[int]:
    return seed_list(os.environ.get("MAILFLOW_DIALOGUE_SEEDS", "")) or SEEDS


def shown(text: str | None) -> str:
    if text is None:
        return "closed"
    if text == str(status.LINE_TOO_LONG):  # (Postfix runs the line's first 2048 bytes, an unknown command here)
        return "500 5.5.2 Error: command not recognized"
    if text.startswith("250-"):
        return "250 (EHLO)"
    return re.sub(r"queued as \w+", "queued as QID", text)


async def replay(port: int, steps: list[Step], shown=shown) -> list[str]:
    """Each reply as `shown` (a function of its text), step by step, the greeting's by its code; then QUIT's and
    whether the connection ended. A reply that does not come is `timeout` and ends the replay."""
    client = await SmtpClient.connect(port, greet=False)
    out = []
    try:
        greeting = await client.reply(REPLY_TIMEOUT)
        out.append(str(greeting.code))
        for step in [*steps, Step((b"QUIT\r\n",))]:
            await client.send(b"".join(step.units))
            reply = None
            for _ in step.units:
                reply = await client.reply(REPLY_TIMEOUT)
                out.append(shown(reply.text if reply.code else None))
                if reply.code is None:
                    return out
            if await closed_after_content(client, step, reply, out, shown, REPLY_TIMEOUT):
                return out
        out.append("closed" if (await client.reply(REPLY_TIMEOUT)).code is None else "still open")
    except ConnectionError:  # the server closed with input unread (a reset): the replies read before it count
        out += [shown(text) for text in buffered_replies(client)] + ["reset"]
    except asyncio.TimeoutError:
        out.append("timeout")
    finally:
        await client.close()
    return out


async def closed_after_content(client: SmtpClient, step, reply, out: list[str], shown, timeout: float) -> bool:
    """After a 354 to the step's last unit (`reply`), its content sent and the reply appended to `out` as `shown`,
    and one for each command line pipelined after its end (`commands_after_data`): whether the connection closed
    instead (the replay ends). Nothing is sent after any other reply."""
    if reply is None or reply.code != 354 or not step.content:
        return False
    await client.send(step.content)
    for _ in range(1 + commands_after_data(step.content)):
        reply = await client.reply(timeout)
        out.append(shown(reply.text if reply.code else None))
        if reply.code is None:
            return True
    return False


def buffered_replies(client: SmtpClient) -> list[str]:
    """The whole replies the client had received when its connection was reset: asyncio's StreamReader keeps them
    in its buffer but raises the reset at the next read (a server that closes with input unread sends a reset
    right after its last reply; Linux would still have let a client read that reply)."""
    lines = bytes(client.reader._buffer).decode("utf-8", "replace").split("\r\n")[:-1]
    out, reply = [], []
    for text in lines:
        reply.append(text)
        if text[3:4] != "-":
            out.append("\n".join(reply))
            reply = []
    return out


def without_extra_enhanced_code(postfix: str, mailflow: str) -> str:
    """mailflow's reply without its enhanced status code where Postfix's has none."""
    if not postfix[:3].isdigit() or ENHANCED.match(postfix) or not ENHANCED.match(mailflow):
        return mailflow
    return mailflow[:4] + mailflow.split(" ", 2)[2]


FAREWELLS = ("221 ", "421 ", "521 ", "554 5.5.0 ")  # the replies after which a server closes


def lost_to_a_reset(postfix: list[str], mailflow: list[str], farewells: tuple[str, ...] = FAREWELLS) -> bool:
    """Whether one side's connection was reset where the other's went on to a farewell (a reply that begins with one
    of `farewells`) and a close, all replies before the reset alike: a server that closes with the client's
    pipelined input unread sends a reset, and Linux may drop the replies the client had not read yet (the farewell
    too). Not a difference that can be judged."""
    for reset, other in ((postfix, mailflow), (mailflow, postfix)):
        at = len(reset) - 1
        if (reset[-1:] == ["reset"] and other[:at] == reset[:at] and other[-1:] in (["closed"], ["reset"])
                and len(other) > at + 1 and other[-2].startswith(farewells)):
            return True
    return False


def compared(postfix: list[str], mailflow: list[str]) -> tuple[list[str], list[str]]:
    """(Postfix's replies, mailflow's) as compared: a reset and a close are alike where both come at once."""
    ends = ("closed", "reset")
    if len(postfix) == len(mailflow) and postfix[-1:] != mailflow[-1:] and postfix[-1] in ends and mailflow[-1] in ends:
        postfix, mailflow = [*postfix[:-1], "closed"], [*mailflow[:-1], "closed"]
    return postfix, [without_extra_enhanced_code(p, m) for p, m in zip(postfix, mailflow)] + mailflow[len(postfix):]


def alike(postfix: list[str], mailflow: list[str]) -> bool:
    """The replies (as `compared`) match, and both servers answered to the end: where both wait for input (a
    `timeout`) nothing was compared."""
    return mailflow == postfix and postfix[-1:] != ["timeout"]


def describe(steps: list[Step]) -> list[str]:
    return [repr(b"".join(step.units))[2:-1] for step in steps]


SIGNALLED = "killed by signal"


async def died(pf, before: int) -> bool:
    """Whether the private Postfix's master logged an smtpd killed by a signal since `before` such lines (its log
    is written a moment later: waited for up to 2 s)."""
    with contextlib.suppress(AssertionError, TimeoutError):
        await eventually(lambda: pf.maillog.count(SIGNALLED) > before, timeout=2, what="an smtpd killed")
        return True
    return False


async def differences(mailflow_server, seed_list: list[int],
                      report: str | None = None) -> tuple[dict[int, list[str]], list[int], list[int]]:
    """(the seeds whose replies differ, each with its steps and replies side by side; the seeds during which
    Postfix's smtpd died of a signal, a Postfix fault and not compared; those whose replies were `lost_to_a_reset`).
    `report`: a file that gets each
    difference as it is found, and each such seed."""
    mf = await mailflow_server(**MAILFLOW)
    port = mf.smtp_addresses[0][1]
    out, crashed, reset = {}, [], []
    async with postfix_instance(POSTFIX) as pf:
        for seed in seed_list:
            steps = generated(seed, pf.keeps_refused_transactions)
            before = pf.maillog.count(SIGNALLED)
            postfix, mailflow = await asyncio.gather(replay(pf.port, steps), replay(port, steps))
            postfix, ours = compared(postfix, mailflow)
            if alike(postfix, ours):
                continue
            if await died(pf, before):
                crashed.append(seed)
                write(report, f"postfix died: seed {seed}")
                continue
            if lost_to_a_reset(*compared(postfix, mailflow)):
                reset.append(seed)
                write(report, f"replies lost to a reset: seed {seed}")
                continue
            out[seed] = [f"seed {seed}:", *(f"   {unit!r}" for unit in describe(steps)),
                         *(f"  {'  ' if p == m else '!='} PF {p!r}\n     MF {m!r}" for p, m in
                           zip(postfix + [""] * len(ours), ours + [""] * len(postfix)))]
            write(report, "\n".join(out[seed]))
    return out, crashed, reset


def write(report: str | None, text: str) -> None:
    if report:
        with open(report, "a") as f:
            f.write(text + "\n")


async def test_seeded_dialogues_match_a_real_postfix(mailflow_server):
    found, crashed, reset = await differences(mailflow_server, seeds(), os.environ.get("MAILFLOW_DIALOGUE_REPORT"))
    for lines in found.values():
        print("\n".join(lines))
    print("seeds during which Postfix's smtpd died:", crashed, "; replies lost to a reset:", reset)
    assert found == {}
    if seeds() == SEEDS:  # (the kept sessions: every one compared)
        assert crashed == reset == []


def test_both_servers_waiting_is_no_match():
    assert alike(["220", "250 (EHLO)", "closed"], ["220", "250 (EHLO)", "closed"])
    assert not alike(["220", "250 (EHLO)", "timeout"], ["220", "250 (EHLO)", "timeout"])


def test_the_generator_masks_end_with_the_transaction():
    auth = Step((b"MAIL FROM:<s@remote.test> AUTH=<>\r\n",))
    assert one_auth_mail([auth, Step((b"EHLO a.test\r\n",)), auth])[2] == auth
    assert one_auth_mail([auth, Step((b"RSET x\r\n",)), auth])[2] != auth  # (refused: 501, nothing reset)
    data = Step((b"DATA\r\n",), b"x\r\n.\r\n")
    after_refused_last = [Step((b"BDAT 5000 LAST\r\n",)), Step((b"MAIL FROM:<s@remote.test>\r\n",)), data]
    assert no_content_after_refused_last(after_refused_last)[-1] == data
    assert no_content_after_refused_last([after_refused_last[0], data]) == [after_refused_last[0]]

"""Differential test of local(8)'s mailbox_command and luser_relay: the same aliases and settings through a private
Postfix 3.7 and mailflow (local domain origin.test; `mailbox_command` a script recording its environment and input
(with an ENVID, which 3.7 does not export), exiting by the address extension; `luser_relay = nobody+$user`; the user
`nobody`, a system user, as the mailbox; ghost, no user, reached through the alias `team` as mailflow's smtpd
refuses it at RCPT).

Compared: every local result line (to=, orig_to=, dsn, status, text); the command's environment (but HOME and SHELL:
Postfix gives the passwd entry's, mailflow the home under maildir_base and /bin/sh; LANG, MAIL_CONFIG and PWD are
Postfix's export_environment) and input. Masked: dates, queue ids, the Received header, the script's folder.
"""
from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from mailflow.app import Mailflow
from mailflow.config import config_from_dict
from tests.interop.test_agents_vs_postfix import masked_message
from tests.support import SmtpClient, base_settings, eventually, merged, postfix_instance, script_dir
from tests.support.maillog import mail_log_file

pytestmark = pytest.mark.interop

RECORD = ('f={out}/${{EXTENSION:-none}}\n'
          '{{ env | sort | sed "s/^/env:/"; echo stdin:; cat; }} > $f.part\n'
          'mv $f.part $f\n'
          'case "$EXTENSION" in\n'
          ' x1) echo "it broke"; exit 1;;\n'
          ' x67) echo "no such mailbox"; exit 67;;\n'
          ' x75) echo "try later"; exit 75;;\n'
          'esac\n')
TRAFFIC = ["nobody", "team", "nobody+x1", "nobody+x67", "nobody+x75"]
COMMON = {"myhostname": "mx.origin.test", "myorigin": "origin.test", "recipient_delimiter": "+"}
DISCARD_NOTICES = "inline:{sender.test=discard:}"
LUSER_RELAY = "nobody+$user"
_RESULT = re.compile(r"[ /]local(?:\[\d+\])?: \w+: (?P<line>to=<[^>]*>, (?:orig_to=<[^>]*>, )?relay=local), .*?"
                     r"(?P<status>dsn=[^,]+, status=\w+ \(.*\))$")


async def send_traffic(port: int) -> None:
    for number, name in enumerate(TRAFFIC):
        c = await SmtpClient.connect(port)
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd(f"MAIL FROM:<s@sender.test> ENVID=envid-{number}")).code == 250
        assert (await c.cmd(f"RCPT TO:<{name}@origin.test>")).code == 250, name
        assert (await c.cmd("DATA")).code == 354
        await c.send((f"Subject: {name}\r\nMessage-ID: <{name}@client.test>\r\n"
                      "From: s@sender.test\r\n\r\nbody\r\n.\r\n").encode())
        assert (await c.reply()).code == 250
        await c.cmd("QUIT")
        await c.close()


def results(log: str, script: Path) -> list[str]:
    found = [m["line"] + ", " + m["status"] for m in map(_RESULT.search, log.splitlines()) if m]
    return sorted(line.replace(str(script), "SCRIPT") for line in found)


async def logged(read_log, script: Path, flushed=None) -> list[str]:
    """The result lines once every recipient has one, and a late extra line would be in: after 0.5 s (a deferral's
    line and a late one), and then `flushed` (Postfix's: every line sent to postlogd meanwhile is in its log)."""
    await eventually(lambda: len({line.split(",")[0] for line in results(read_log(), script)}) >= len(TRAFFIC),
                     timeout=20, step=0.1)
    await asyncio.sleep(0.5)
    if flushed is not None:
        await flushed()
    return results(read_log(), script)


def records(out: Path) -> dict[str, dict]:
    found = {}
    for path in sorted(out.glob("*")):
        head, _, stdin = path.read_text().partition("stdin:\n")
        env = [line[4:] for line in head.splitlines() if line.startswith("env:") and not line.startswith(
            ("env:LANG=", "env:MAIL_CONFIG=", "env:PWD=", "env:HOME=", "env:SHELL="))]
        found[path.name] = {"env": env, "stdin": masked_message(stdin)}
        path.unlink()
    return found


async def run_postfix(script: Path, out: Path) -> tuple[list[str], dict]:
    async with postfix_instance({**COMMON, "mydestination": "origin.test", "alias_maps": "inline:{team=ghost}",
                                 "alias_database": "", "local_recipient_maps": "",
                                 "mailbox_command": str(script), "luser_relay": LUSER_RELAY,
                                 "transport_maps": DISCARD_NOTICES}) as pf:
        await send_traffic(pf.port)
        lines = await logged(lambda: pf.maillog, script, pf.flushed)
    return lines, records(out)


async def run_mailflow(script: Path, out: Path, tmp: Path) -> tuple[list[str], dict]:
    settings = merged(base_settings(tmp), {
        **COMMON, "mydestination": ["origin.test"], "alias_maps": ["inline:{team=ghost}"],
        "local_recipient_maps": ["inline:{nobody=x, team=x}"], "transport_maps": [DISCARD_NOTICES],
        "local": {"mailbox_command": str(script), "luser_relay": LUSER_RELAY}})
    with mail_log_file(tmp / "mail.log") as log:
        mf = Mailflow(config_from_dict(settings), shutdown_grace=2.0)
        await mf.start()
        try:
            await send_traffic(mf.smtp_addresses[0][1])
            lines = await logged(log.read_text, script)
        finally:
            await mf.stop()
    return lines, records(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[list[str], dict]]:
    with script_dir() as d:
        script = d.script("record.sh", RECORD.format(out=d.out))
        postfix = asyncio.run(run_postfix(script, d.out))
        mailflow = asyncio.run(run_mailflow(script, d.out, tmp_path_factory.mktemp("local")))
    return {"postfix": postfix, "mailflow": mailflow}


def test_mailbox_command_and_luser_relay_results_match_postfix(runs):
    print("\n".join(runs["postfix"][0]), "\n--\n", "\n".join(runs["mailflow"][0]))
    assert runs["mailflow"][0] == runs["postfix"][0]


def test_mailbox_command_environment_and_input_match_postfix(runs):
    assert runs["mailflow"][1] == runs["postfix"][1]



async def lmtp_results(read_log, names: list[str]) -> list[str]:
    """The result lines about `names` (to= or orig_to=), once each has one; the Dovecot session id masked."""
    def found() -> list[str]:
        lines = [f"{m['program']}: {m['line']}, {m['status']}" for m in map(_ANY_RESULT.search, read_log().splitlines())
                 if m]
        return sorted(re.sub(r"> \S+ Saved", "> ID Saved", line) for line in lines
                      if any(f"<{name}@example.test>" in line for name in names))
    await eventually(lambda: len(found()) >= len(names), timeout=30, step=0.1)
    return found()


_ANY_RESULT = re.compile(r"/(?P<program>\w+)\[\d+\]: \w+: (?P<line>to=<[^>]*>, (?:orig_to=<[^>]*>, )?relay=[^,]+), .*?"
                         r"(?P<status>dsn=[^,]+, status=\w+ \(.*\))$")


async def test_mailbox_transport_to_dovecot_lmtp_is_logged_as_postfix_logs_it(dovecot, tmp_path):
    """`mailbox_transport = lmtp:...` to the same private Dovecot: an alias of alice and ghost (Dovecot refuses it)
    are logged alike, `to=<alice@…>, orig_to=<info@…>, relay=` Dovecot with its reply, under lmtp, by Postfix and by
    mailflow."""
    names = ["info", "ghost"]
    common = {**COMMON, "myorigin": "example.test", "relay_domains": ""}
    async with postfix_instance({**common, "mydestination": "example.test", "alias_maps": "inline:{info=alice}",
                                 "alias_database": "", "local_recipient_maps": "",
                                 "mailbox_transport": f"lmtp:inet:127.0.0.1:{dovecot.lmtp_port}",
                                 "transport_maps": DISCARD_NOTICES}) as pf:
        await send_to(pf.port, names)
        postfix = await lmtp_results(lambda: pf.maillog, names)
    settings = merged(base_settings(tmp_path), {
        **common, "relay_domains": [], "mydestination": ["example.test"], "alias_maps": ["inline:{info=alice}"],
        "local_recipient_maps": ["inline:{info=x, ghost=x}"], "transport_maps": [DISCARD_NOTICES],
        "local": {"mailbox_transport": f"lmtp:[127.0.0.1]:{dovecot.lmtp_port}"}})
    with mail_log_file(tmp_path / "mail.log") as log:
        mf = Mailflow(config_from_dict(settings), shutdown_grace=2.0)
        await mf.start()
        try:
            await send_to(mf.smtp_addresses[0][1], names)
            mailflow = await lmtp_results(log.read_text, names)
        finally:
            await mf.stop()
    assert mailflow == postfix


async def send_to(port: int, names: list[str]) -> None:
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd("MAIL FROM:<s@sender.test>")).code == 250
    for name in names:
        assert (await c.cmd(f"RCPT TO:<{name}@example.test>")).code == 250, name
    assert (await c.cmd("DATA")).code == 354
    await c.send(b"Subject: lmtp\r\nFrom: s@sender.test\r\n\r\nbody\r\n.\r\n")
    assert (await c.reply()).code == 250
    await c.cmd("QUIT")
    await c.close()

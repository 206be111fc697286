"""`|command` destinations of the local transport (LocalTransport with CommandSettings), with real scripts.

Covered: an alias command gets local(8)'s environment (exactly those variables, shell-special characters in
message context replaced by '_'), the message with Return-Path and Delivered-To on stdin, `/` as working
directory (an alias has no home), umask 077, and (as root) default_privs' identity; a .forward command runs in the
user's home, and (as root) a system user's .forward is opened, and its commands, files and :include: files run, are
written and read, with that user's rights; mailbox and command parts combine: a command exiting 75 defers the recipient
(the mailbox written), 67 bounces it 5.1.1, success names both parts; command_time_limit bounces 5.3.0 (as Postfix).
"""
from __future__ import annotations

import os
import pwd
import re
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest

from mailflow.clock import VirtualClock
from mailflow.config import Config
from mailflow.content import Content
from mailflow.model import DeliveryRequest, Outcome, OwnedFailure, RcptResult, Recipient
from mailflow.transports.local.aliasing import LocalExpander
from mailflow.routing.rewrite import Rewriter
from mailflow.transports.local.agent import (OWNED_NOTICE_LIMIT, CommandSettings, LocalTransport, Part,
                                             _owned_failures)
from mailflow.transports.maildir import MaildirWriter
from mailflow.transports.pipe import CommandSpool
from tests.support import script_dir

CONTENT = b"From: sender@remote.test\r\nSubject: hello\r\n\r\nline one\r\n"
RECORD = 'env > {out}/env\ncat > {out}/stdin\npwd > {out}/pwd\nid -u > {out}/uid\numask > {out}/umask\n'


@pytest.fixture
def scripts():
    with script_dir() as d:
        yield d


@pytest.fixture
async def transport() -> AsyncIterator[Callable[..., LocalTransport]]:
    """make_transport, each transport made closed at the test's end: its /file writers are threads that are not
    daemons, and one left idle by a transport never closed kept the interpreter from exiting after the tests."""
    made: list[LocalTransport] = []

    def make(*args, **kwargs) -> LocalTransport:
        made.append(make_transport(*args, **kwargs))
        return made[-1]

    yield make
    for t in made:
        await t.close()


def make_transport(base: Path, aliases: str, time_limit: float = 10.0, default_privs: str = "nobody",
                   spool: CommandSpool | None = None, **local) -> LocalTransport:
    """Local users alice, bob and nobody (a system user) in example.test; homes under `base`/mail; `aliases` an
    aliases(5) file; `local`: more [local] settings."""
    (base / "users").write_text("alice x\nbob x\nnobody x\n")
    (base / "aliases").write_text(aliases)
    config = Config(myhostname="mx.example.test", myorigin="example.test", mydestination=("example.test",),
                    local_recipient_maps=(f"texthash:{base / 'users'}",), alias_maps=(f"texthash:{base / 'aliases'}",),
                    local={"maildir_base": str(base / "mail"), "default_privs": default_privs, **local})
    return LocalTransport(LocalExpander(config, Rewriter(config)), local=config.local,
                          writer=MaildirWriter(VirtualClock()), clock=VirtualClock(),
                          commands=CommandSettings(default_privs, time_limit=time_limit, recipient_delimiter="+",
                                                   spool=spool))


def request(rcpt: str, sender: str = "sender@remote.test", original: str = "") -> DeliveryRequest:
    return DeliveryRequest("Q1", sender, (Recipient(0, rcpt, original or rcpt),), "mx.example.test",
                           Content.of(CONTENT))


def environment(text: str) -> dict[str, str]:
    env = dict(line.split("=", 1) for line in text.splitlines())
    for shell_own in ("PWD", "SHLVL", "_", "OLDPWD"):  # set by /bin/sh itself
        env.pop(shell_own, None)
    return env


def maildir(base: Path, user: str) -> list[bytes]:
    new = base / "mail" / user / "Maildir" / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


async def test_an_alias_command_gets_local_environment_and_the_message(scripts, tmp_path, transport):
    s = scripts.script("record.sh", RECORD.format(out=scripts.out))
    t = transport(tmp_path, f'run: "|{s} --flag"\n')
    [result] = (await t.deliver(request("Run+Tag@Example.test", sender="o'brien&co@remote.test",
                                        original='"first"@Elsewhere.test.'))).results
    assert (result.outcome, result.dsn) == (Outcome.SENT, "2.0.0")
    assert result.text == f"delivered to command: {s} --flag"
    assert environment(scripts.read("env")) == {  # no HOME, no SHELL: an alias is nobody's account (local(8))
        "USER": "run", "LOGNAME": "run",
        "SENDER": "o_brien_co@remote.test", "RECIPIENT": "Run+Tag@Example.test",
        "ORIGINAL_RECIPIENT": "first@Elsewhere.test.", "LOCAL": "run+tag", "DOMAIN": "example.test",
        "EXTENSION": "tag", "PATH": "/usr/bin:/bin"}
    from_, stdin = scripts.read("stdin").split("\n", 1)  # local(8)'s From_ line first
    assert re.fullmatch(r"From o'brien&co@remote\.test  \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}", from_), from_
    assert stdin == ("Return-Path: <o'brien&co@remote.test>\nX-Original-To: first@Elsewhere.test.\n"
                     "Delivered-To: Run+Tag@Example.test\nFrom: sender@remote.test\nSubject: hello\n\nline one\n")
    assert scripts.read("pwd") == "/\n"  # an alias has no home
    expected_uid = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert scripts.read("uid") == f"{expected_uid}\n"
    assert scripts.read("umask") == "0077\n"  # what it creates is its own alone, as under Postfix's local(8)


async def test_a_command_gets_sender_even_when_it_is_the_null_sender(scripts, tmp_path, transport):
    """local(8)'s command.c sets LOGNAME, USER, SENDER, RECIPIENT and LOCAL whatever their value: a notice's
    command sees SENDER empty, not missing; only DOMAIN, EXTENSION and ORIGINAL_RECIPIENT depend on a value."""
    s = scripts.script("record.sh", RECORD.format(out=scripts.out))
    [result] = (await transport(tmp_path, f'run: "|{s}"\n').deliver(request("run@example.test", sender=""))).results
    assert result.outcome is Outcome.SENT, result
    env = environment(scripts.read("env"))
    assert (env["SENDER"], env["USER"], env["LOCAL"], env["RECIPIENT"]) == ("", "run", "run", "run@example.test")
    assert "EXTENSION" not in env


async def test_a_forward_command_runs_in_the_users_home(scripts, transport):
    s = scripts.script("record.sh", RECORD.format(out=scripts.out))
    home = scripts.path / "mail" / "bob"
    home.mkdir(parents=True)
    home.chmod(0o755)
    (home / ".forward").write_text(f"\\bob, |{s}\n")
    [result] = (await transport(scripts.path, "").deliver(request("bob@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.SENT, "2.0.0")
    env = environment(scripts.read("env"))
    assert scripts.read("pwd") == f"{home}\n" and (env["HOME"], env["SHELL"]) == (str(home), "/bin/sh")
    assert "EXTENSION" not in env, "none without an extension, as local(8)"
    assert len(maildir(scripts.path, "bob")) == 1 and "delivered to maildir" in result.text


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches users")
async def test_as_root_a_system_users_forward_runs_its_commands_and_files_with_that_users_rights(scripts, transport):
    """local(8)'s delivery rights: what a system user's .forward names (directly or through an :include: file)
    runs and is written as that user, and the :include: file is read as that user; an alias command runs as
    default_privs (daemon here, so that the two differ)."""
    s = scripts.script("record.sh", RECORD.format(out=scripts.out))
    who = scripts.script("who.sh", f"cat > /dev/null; touch {scripts.out}/ran-as-$(id -u)\n")
    nobody = pwd.getpwnam("nobody")
    home = scripts.path / "mail" / "nobody"
    home.mkdir(parents=True)
    own = scripts.path / "own"  # only nobody may read it: read as root or daemon, the include would fail
    own.write_text(f"|{who}\n")
    own.chmod(0o600)
    (home / ".forward").write_text(f"|{s}\n{scripts.out}/kept\n:include:{own}\n")
    for path in (home, home / ".forward", own):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    t = transport(scripts.path, f"run: |{who}\n", default_privs="daemon",
                  allow_mail_to_commands=("alias", "forward", "include"))
    [result] = (await t.deliver(request("nobody@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.SENT, "2.0.0"), result
    assert scripts.read("uid") == f"{nobody.pw_uid}\n"
    assert (scripts.out / "kept").stat().st_uid == nobody.pw_uid
    assert sorted(p.name for p in scripts.out.glob("ran-as-*")) == [f"ran-as-{nobody.pw_uid}"]
    [result] = (await t.deliver(request("run@example.test"))).results
    assert result.outcome is Outcome.SENT, result
    assert sorted(p.name for p in scripts.out.glob("ran-as-*")) == sorted(
        [f"ran-as-{nobody.pw_uid}", f"ran-as-{pwd.getpwnam('daemon').pw_uid}"])


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches users")
async def test_as_root_a_system_users_forward_is_opened_with_that_users_rights(scripts, transport):
    """A hard link to a file only root may read passes Postfix's owner check (root owns it), but opened as the
    user it cannot be read: the mailbox gets the mail, and no line of the file comes back anywhere."""
    secret = scripts.path / "secret"
    secret.write_text("root@remote.test\n")
    secret.chmod(0o600)
    home = scripts.path / "mail" / "nobody"
    home.mkdir(parents=True)
    os.chown(home, pwd.getpwnam("nobody").pw_uid, 0)
    os.link(secret, home / ".forward")
    [result] = (await transport(scripts.path, "").deliver(request("nobody@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.SENT, "2.0.0"), result
    assert "delivered to maildir" in result.text and "remote.test" not in result.text
    assert len(maildir(scripts.path, "nobody")) == 1


async def test_a_command_exiting_75_defers_the_recipient_after_the_mailbox_is_written(scripts, tmp_path, transport):
    s = scripts.script("later.sh", "echo busy\nexit 75\n")
    [result] = (await transport(tmp_path, f"team: alice, |{s}\n").deliver(request("team@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.3.0")
    assert result.text.startswith("temporary failure. Command output: busy (also: delivered to maildir")
    assert len(maildir(tmp_path, "alice")) == 1


async def test_a_command_whose_input_would_take_the_queue_below_its_floor_defers_4_3_1(scripts, tmp_path, transport):
    """As a pipe service's (test_pipe_transport): the copy of the message a `|command` reads is not made below the
    queue's free-space floor; the recipient is deferred 4.3.1 (was: no check, the disk filled), the command not
    run."""
    s = scripts.script("ran.sh", f"touch {scripts.out}/ran\n")
    spool = CommandSpool(tmp_path, keep_free=5_000_000, free_space=lambda: 5_000_000)
    [result] = (await transport(tmp_path, f"team: |{s}\n", spool=spool).deliver(request("team@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.3.1")
    assert result.text == "insufficient system storage"
    assert not (scripts.out / "ran").exists()


async def test_a_deferred_recipients_parts_that_bounced_are_its_failures_now(scripts, tmp_path, transport):
    """A part bounced beside one deferred: the result is deferred and names its failures (`owned`, one too), for
    qmgr to log and tell now, as local(8) logs each bounce at once; the deferral's text stands alone."""
    later = scripts.script("later.sh", "exit 75\n")
    nouser = scripts.script("nouser.sh", "exit 67\n")
    t = transport(tmp_path, f"team: ghost, |{later}, |{nouser}, alice\n")
    [result] = (await t.deliver(request("team@example.test"))).results
    assert (result.outcome, result.dsn, result.owner) == (Outcome.DEFERRED, "4.3.0", "")
    assert result.text.startswith("temporary failure") and "user unknown" not in result.text
    assert "delivered to maildir" in result.text and not result.delivered  # (its own line names them)
    assert [(f.owner, f.address, f.dsn, f.text) for f in result.owned] == [
        ("", "ghost@example.test", "5.1.1", 'unknown user: "ghost"'),
        ("", "team@example.test", "5.1.1", "user unknown")]


async def team_with_a_deferring_include(transport, scripts, tmp_path, include: str, after: str):
    """team@example.test's one result, team an alias of `:include:team.inc, after`: `{later}` in the text a command
    that exits 75, `{ok}` one that appends its argument to the `runs` file."""
    later = scripts.script("later.sh", "exit 75\n")
    ok = scripts.script("ok.sh", f'echo "$1" >> {scripts.out}/runs\ncat > /dev/null\n')
    inc = tmp_path / "team.inc"
    inc.write_text(include.format(later=later, ok=ok))
    t = transport(tmp_path, f"team: :include:{inc}, {after.format(later=later, ok=ok)}\n",
                  allow_mail_to_commands=("alias", "forward", "include"))
    [result] = (await t.deliver(request("team@example.test"))).results
    return result


async def test_a_files_lines_after_one_that_defers_are_left_for_the_retry(scripts, tmp_path, transport):
    """local(8)'s deliver_token_stream reads no further line of an :include: (or .forward) file once one deferred:
    the rest of that line and the alias value around the file are delivered, the later lines are not (nor
    logged); they are at the retry, which repeats the file."""
    result = await team_with_a_deferring_include(
        transport, scripts, tmp_path, '"|{later}", "|{ok} same-line"\n"|{ok} next-line"\nalice\n', '"|{ok} after"')
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.3.0")
    assert scripts.read("runs").split() == ["same-line", "after"]
    assert "next-line" not in result.text and "forwarded" not in result.text


async def test_a_destination_also_named_outside_a_stopped_line_is_delivered(scripts, tmp_path, transport):
    """A destination named on a file's line after one that deferred and also elsewhere (the alias value around
    the file) is delivered there, as local(8) meets it there: only a destination every place of which is stopped
    waits for the retry."""
    result = await team_with_a_deferring_include(
        transport, scripts, tmp_path, '"|{later}"\n"|{ok} both"\n"|{ok} file-only"\n', '"|{ok} both"')
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.3.0")
    assert scripts.read("runs").split() == ["both"]


async def test_a_command_exiting_67_bounces_the_recipient_and_the_rest_is_delivered(scripts, tmp_path, transport):
    s = scripts.script("nouser.sh", "exit 67\n")
    [result] = (await transport(tmp_path, f"team: alice, |{s}\n").deliver(request("team@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.BOUNCED, "5.1.1")
    assert result.text.startswith("user unknown (also: delivered to maildir")
    assert len(maildir(tmp_path, "alice")) == 1


async def test_a_mailbox_and_a_command_both_delivered_are_named(scripts, tmp_path, transport):
    s = scripts.script("ok.sh", "cat > /dev/null\n")
    [result] = (await transport(tmp_path, f"team: alice, |{s}\n").deliver(request("team@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.SENT, "2.0.0")
    assert "delivered to maildir" in result.text and f"delivered to command: {s}" in result.text


async def test_command_time_limit_bounces(scripts, tmp_path, transport):
    s = scripts.script("slow.sh", "sleep 30\n")
    t = transport(tmp_path, f"slow: |{s}\n", time_limit=0.3)
    [result] = (await t.deliver(request("slow@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.BOUNCED, "5.3.0")
    assert result.text == f'Command time limit exceeded: "{s}"'


async def test_a_command_killed_by_a_signal_defers_as_postfix_runs_it_without_a_shell(scripts, tmp_path, transport):
    """Postfix's exec_command runs a command without shell metacharacters directly: its death by a signal is
    seen as one and defers 4.3.0 (through /bin/sh it was exit status 137, a bounce). A shell built-in still
    goes to the shell, as does a command with metacharacters."""
    s = scripts.script("killed.sh", "cat > /dev/null\nkill -9 $$\n")
    t = transport(tmp_path, f'killed: "|{s} now"\nbuiltin: "|exit 75"\npiped: "|cat | {s}"\n')
    [result] = (await t.deliver(request("killed@example.test"))).results
    assert (result.outcome, result.dsn, result.text) == (
        Outcome.DEFERRED, "4.3.0", f'Command died with signal 9: "{s} now"')
    [result] = (await t.deliver(request("builtin@example.test"))).results
    assert (result.outcome, result.dsn, result.text) == (Outcome.DEFERRED, "4.3.0", "temporary failure")
    [result] = (await t.deliver(request("piped@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.BOUNCED, "5.3.0"), "the shell reports its child's death"


async def test_a_script_without_an_interpreter_line_runs_through_the_shell_as_execvp_runs_it(scripts, tmp_path,
                                                                                              transport):
    """exec_command's execvp hands a file the kernel cannot run (ENOEXEC: no `#!` line) to /bin/sh: such a filter
    is delivered to, with its arguments, as under Postfix, not deferred for ever. A path that is not there is
    not given to the shell: deferred 4.3.0, as Postfix's failed execvp."""
    plain = scripts.path / "plain-filter"
    plain.write_text(f'cat > {scripts.out}/stdin\necho "$1" > {scripts.out}/arg\n')
    plain.chmod(0o755)
    t = transport(tmp_path, f'filter: "|{plain} one"\nmissing: "|{scripts.path}/not-there"\n')
    [result] = (await t.deliver(request("filter@example.test"))).results
    assert (result.outcome, result.dsn, result.text) == (Outcome.SENT, "2.0.0", f"delivered to command: {plain} one")
    assert scripts.read("arg") == "one\n" and "Subject: hello" in scripts.read("stdin")
    [result] = (await t.deliver(request("missing@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.3.0"), result
    assert "No such file or directory" in result.text


async def test_a_lists_failure_goes_to_its_owner_and_two_lists_failures_to_the_sender(tmp_path, transport):
    """bounce_workaround: a list's failing command is its owner's to hear of (`owner`); when two lists' commands
    fail, each owner is told of its own list's (`owned`), not one notice to one of them."""
    t = transport(tmp_path, 'l1: "|exit 67"\nowner-l1: alice\nl2: "|exit 67 # l2"\nowner-l2: bob\nall: l1, l2\n')
    [one] = (await t.deliver(request("l1@example.test"))).results
    assert (one.outcome, one.owner) == (Outcome.BOUNCED, "owner-l1@example.test"), one
    [both] = (await t.deliver(request("all@example.test"))).results
    assert (both.outcome, both.owner) == (Outcome.BOUNCED, ""), both


def test_failures_past_the_notice_limit_are_told_one_notice_per_list():
    """A list may expand to 100 000 destinations: past OWNED_NOTICE_LIMIT failures, each (owner, list) gets one
    notice, its first failure's words and how many more, so notices, log lines and the stored result stay bounded."""
    rcpt = Recipient(0, "all@example.test", "")
    count = OWNED_NOTICE_LIMIT + 50
    parts = [Part(Outcome.BOUNCED, "5.7.1", f"refused /file{n}") for n in range(count)]
    lists = [("owner-l1@example.test", "l1@example.test") if n % 2 else ("owner-l2@example.test", "l2@example.test")
             for n in range(count)]
    result = RcptResult(rcpt, Outcome.BOUNCED, "5.7.1", "refused")
    assert _owned_failures(result, parts, lists, [""] * count) == (
        OwnedFailure("owner-l2@example.test", "l2@example.test", "5.7.1", "refused /file0 (and 74 more failures)"),
        OwnedFailure("owner-l1@example.test", "l1@example.test", "5.7.1", "refused /file1 (and 74 more failures)"))
    few = parts[:3], lists[:3], [""] * 3
    assert len(_owned_failures(result, *few)) == 3  # within the limit: one each, as bounce_workaround tells them


def test_failures_told_to_the_sender_are_each_in_its_notice_up_to_the_limit_then_counted():
    """The sender's failures are listed one by one as Postfix's bounce(8) lists them, up to OWNED_NOTICE_LIMIT;
    past it the last one listed says how many more there were, in the notice, the log and the stored row."""
    rcpt = Recipient(0, "mix@example.test", "")
    count = OWNED_NOTICE_LIMIT + 1
    parts = [Part(Outcome.BOUNCED, "5.3.0", f"command {n} failed") for n in range(count + 1)]
    lists = [("owner-l1@example.test", "l1@example.test")] + [None] * count
    result = RcptResult(rcpt, Outcome.BOUNCED, "5.3.0", "failed")
    owned = _owned_failures(result, parts, lists, [""] * (count + 1))
    assert owned[0] == OwnedFailure("owner-l1@example.test", "l1@example.test", "5.3.0", "command 0 failed")
    assert owned[1:-1] == tuple(OwnedFailure("", "mix@example.test", "5.3.0", f"command {n} failed")
                                for n in range(1, count - 1))
    last = OwnedFailure("", "mix@example.test", "5.3.0", f"command {count - 1} failed (and 1 more failures)")
    assert owned[-1] == last
    within = _owned_failures(result, parts[:-1], lists[:-1], [""] * count)
    assert [f.text for f in within[1:]] == [f"command {n} failed" for n in range(1, count)]  # all, as Postfix's
    many = [("owner-l1@example.test", "l1@example.test")] * count + [None]  # past the limit for the owner
    assert _owned_failures(result, parts, many, [""] * (count + 1)) == (
        OwnedFailure("owner-l1@example.test", "l1@example.test", "5.3.0", f"command 0 failed (and {count - 1} more"
                     " failures)"),
        OwnedFailure("", "mix@example.test", "5.3.0", f"command {count} failed"))


def test_failures_of_no_list_are_told_each_as_with_an_owner():
    """Without an owner the same rule: several failures are each in the sender's notice (bounce(8) lists them),
    not folded into one "(5 times)" line, so adding an owned list to an alias does not change how they are told."""
    rcpt = Recipient(0, "mix@example.test", "")
    parts = [Part(Outcome.BOUNCED, "5.3.0", f"command {n} failed") for n in range(5)]
    result = RcptResult(rcpt, Outcome.BOUNCED, "5.3.0", "failed")
    owned = _owned_failures(result, parts, [None] * 5, [""] * 5)
    assert owned == tuple(OwnedFailure("", "mix@example.test", "5.3.0", f"command {n} failed") for n in range(5))


def test_five_thousand_failures_keep_what_is_told_small():
    """An alias of 5 000 failing commands, each with output_limit bytes of output, with and without an owned
    list: what the notice, the log lines and the recipient row are made of stays within the limit's size."""
    rcpt = Recipient(0, "mix@example.test", "")
    count = 5000
    output = "x" * 2048
    parts = [Part(Outcome.BOUNCED, "5.3.0", f"command died: {output}", f"x-unix; {output}") for _ in range(count)]
    for lists in ([None] * count, [("owner-l1@example.test", "l1@example.test")] + [None] * (count - 1)):
        owned = _owned_failures(RcptResult(rcpt, Outcome.BOUNCED, "5.3.0", "failed"), parts, lists, [""] * count)
        assert len(owned) <= OWNED_NOTICE_LIMIT + 1
        assert sum(len(f.text) + len(f.diagnostic) for f in owned) < (OWNED_NOTICE_LIMIT + 1) * 4200
        senders = count - (lists[0] is not None)
        assert owned[-1].text.endswith(f"(and {senders - OWNED_NOTICE_LIMIT} more failures)")


@pytest.mark.parametrize("owned_list", [False, True])
async def test_an_alias_of_five_thousand_failing_members_makes_a_small_notice_and_few_log_lines(tmp_path, owned_list,
                                                                                                transport):
    """Delivered and told: an alias of 5 000 unknown members (and, in the mixed case, a list with an owner whose
    command fails) gives the sender one notice listing OWNED_NOTICE_LIMIT of them and a count, of a size and a
    number of log lines that do not grow with the expansion (it was 5 000 lines and a notice of megabytes)."""
    from mailflow.model import QueuedMessage
    from mailflow.stages.bounce import build_notice
    from mailflow.stages.qmgr import _owned_lines
    from mailflow.stages.qmgr.notices import plan

    count = 5000
    members = ", ".join(f"ghost{n}" for n in range(count))
    lists = 'l1: "|exit 67"\nowner-l1: alice\n' if owned_list else ""
    t = transport(tmp_path, f"mix: {members}{', l1' if owned_list else ''}\n{lists}")
    [result] = (await t.deliver(request("mix@example.test"))).results
    assert result.outcome is Outcome.BOUNCED and len(result.owned) == OWNED_NOTICE_LIMIT + owned_list
    assert len(_owned_lines(result)) == OWNED_NOTICE_LIMIT + owned_list
    message = QueuedMessage("Q1", "sender@remote.test", 0.0, 10, False, "7BIT", 1, (result.recipient,))
    notices = plan(message, [result], warn_delay=False, myhostname="mx.example.test", double_bounce_recipient="pm",
                   now=0.0)
    [senders] = [n for n in notices if n.to == "sender@remote.test"]
    raw = build_notice(kind=senders.kind, queue_id="Q1", sender=message.sender, arrival=0.0, envid="", ret="",
                       recipients=list(senders.recipients), original=CONTENT, reporting_mta="mx.example.test",
                       now=0.0, notice_id="Q1.failure")
    assert raw.count(b"Final-Recipient:") == OWNED_NOTICE_LIMIT and len(raw) < 100_000
    assert b"(and 4900 more failures)" in raw


async def test_an_alias_of_several_failing_commands_tells_the_sender_each(tmp_path, transport):
    """Delivered: an alias of three failing commands and no owner gives three failures told to the sender."""
    t = transport(tmp_path, 'mix: "|exit 67 # a", "|exit 67 # b", "|exit 67 # c"\n')
    [result] = (await t.deliver(request("mix@example.test"))).results
    assert (result.outcome, result.owner) == (Outcome.BOUNCED, ""), result
    assert [(f.owner, f.address, f.dsn) for f in result.owned] == [("", "mix@example.test", "5.1.1")] * 3
    assert result.delivered == ""


async def test_a_bounced_recipients_delivered_parts_are_named_for_their_own_line(tmp_path, transport):
    """Failures told apart (`owned`), the parts delivered are named in `delivered`: qmgr logs them on a line of
    their own, as local(8) logs each delivery."""
    t = transport(tmp_path, 'mix: "|exit 67 # a", alice, "|exit 67 # b"\n')
    [result] = (await t.deliver(request("mix@example.test"))).results
    assert (result.outcome, len(result.owned), result.delivered) == (Outcome.BOUNCED, 2, "delivered to maildir")


async def test_a_lists_command_gets_its_owner_as_the_sender_and_no_original_recipient(scripts, tmp_path, transport):
    """local(8) replaces the sender of a list with an owner- alias for its commands too, and drops the original
    recipient: SENDER, the From_ line and Return-Path name the owner; no ORIGINAL_RECIPIENT, no X-Original-To."""
    s = scripts.script("record.sh", RECORD.format(out=scripts.out))
    t = transport(tmp_path, f'list: "|{s}"\nowner-list: alice\n')
    [result] = (await t.deliver(request("list@example.test"))).results
    assert result.outcome is Outcome.SENT, result
    env = environment(scripts.read("env"))
    assert env["SENDER"] == "owner-list@example.test" and "ORIGINAL_RECIPIENT" not in env
    assert scripts.read("stdin").startswith("From owner-list@example.test  ")
    assert scripts.read("stdin").split("\n", 1)[1].startswith(
        "Return-Path: <owner-list@example.test>\nDelivered-To: list@example.test\nFrom: sender@remote.test\n")

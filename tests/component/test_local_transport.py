"""The local transport (mailflow.transports.local.LocalTransport) with real Maildirs and alias files in tmp_path.

Covered: a mailbox copy (Return-Path, X-Original-To, Delivered-To, LF line ends, in Maildir/new); an alias to two users
and a remote address (both Maildirs written, one forwarded copy with Delivered-To prepended, SENT); a Delivered-To
loop (5.4.6, nothing written); an unknown user (5.1.1); a command target (deferred 4.3.5 before anything is
written); a refused part next to a delivered one (BOUNCED, the delivered part written); a Maildir that
cannot be written (4.2.0); a /dir/ destination (a Maildir written as default_privs, its permission error, size
limit and time limit); a forward that fails (4.3.0); one copy per local part per request; a local part that is a
path never leaves maildir_base. The forwarder is a recording fake with the
signature of mailflow.app's `forwarder`.
"""
from __future__ import annotations

import asyncio
import contextlib
import concurrent.futures
import ctypes
import errno
import importlib
import logging
import mailbox
import re

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import pytest

from mailflow.clock import VirtualClock
from mailflow.config import Config
from mailflow.content import MEMORY_LIMIT, Content
from mailflow.errors import TemporaryError
from mailflow.model import DeliveryRequest, Outcome, Recipient
from mailflow.transports.local import aliasing
from mailflow.transports.local.aliasing import LocalExpander
from mailflow.routing.rewrite import Rewriter
from mailflow.transports import maildir
from mailflow.transports.local import agent, maildir_file, mbox
from mailflow.transports.local.agent import LocalTransport
from mailflow.transports.maildir import MaildirWriter
from tests.support import big_message, spooled
from tests.support.inchild import patched_in_child

SENDER = "sender@remote.test"
CONTENT = b"From: sender@remote.test\r\nSubject: hello\r\n\r\nline one\r\nline two\r\n"


@dataclass
class FakeForward:
    """Records each call of `forward(request, rcpt, addresses, content)`; answers a queue id or raises."""

    error: Exception | None = None
    calls: list[tuple[DeliveryRequest, Recipient, tuple[str, ...], bytes]] = field(default_factory=list)
    senders: list[str | None] = field(default_factory=list)

    async def __call__(self, request: DeliveryRequest, rcpt: Recipient, addresses: tuple[str, ...],
                       content, sender: str | None = None) -> str:
        self.calls.append((request, rcpt, addresses, content))
        self.senders.append(sender)
        if self.error is not None:
            raise self.error
        return f"FWD{len(self.calls)}"


def transport(tmp_path: Path, aliases: str = "", forward: FakeForward | None = None,
              anyone_is_local: bool = False, close_wait: float = 8.0, **local_settings) -> LocalTransport:
    """Local users alice, bob, carol in example.test (or anyone); `aliases` is an aliases(5) file."""
    (tmp_path / "users").write_text("alice x\nbob x\ncarol x\n")
    (tmp_path / "aliases").write_text(aliases)
    base = tmp_path / "mail"
    config = Config(myhostname="mx.example.test", myorigin="example.test", mydestination=("example.test",),
                    local_recipient_maps=() if anyone_is_local else (f"texthash:{tmp_path / 'users'}",),
                    alias_maps=(f"texthash:{tmp_path / 'aliases'}",),
                    local={"maildir_base": str(base), **local_settings})
    return LocalTransport(LocalExpander(config, Rewriter(config)), local=config.local,
                          writer=MaildirWriter(VirtualClock()), clock=VirtualClock(), forward=forward or FakeForward(),
                          close_wait=close_wait)


def request(*rcpts: str, content: bytes = CONTENT) -> DeliveryRequest:
    return DeliveryRequest("Q1", SENDER, tuple(Recipient(i, r, r.upper()) for i, r in enumerate(rcpts)),
                           "mx.example.test", Content.of(content))


def delivered(tmp_path: Path, user: str) -> list[bytes]:
    """The messages in the user's Maildir/new."""
    return delivered_in(tmp_path / "mail" / user)


def delivered_in(home: Path) -> list[bytes]:
    """The messages in Maildir/new of a home."""
    new = home / "Maildir" / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def mailbox_copy(rcpt: str, original: str = "") -> bytes:
    """A mailbox copy of a message for `rcpt` (the recipient local delivery was given: an alias's own address in
    its members' copies, as Postfix's Delivered-To), sent to `original` (as the client gave it; default `rcpt`)."""
    return (f"Return-Path: <{SENDER}>\nX-Original-To: {original or rcpt}\nDelivered-To: {rcpt}\n".encode()
            + b"From: sender@remote.test\nSubject: hello\n\nline one\nline two\n")


async def test_mailbox_delivery_writes_the_maildir(tmp_path):
    report = await transport(tmp_path).deliver(request("alice@example.test"))
    [result] = report.results
    assert (result.outcome, result.dsn, result.relay) == (Outcome.SENT, "2.0.0", "local")
    assert result.text == "delivered to maildir"  # local(8)'s words, the path not named
    assert delivered(tmp_path, "alice") == [mailbox_copy("alice@example.test", "ALICE@EXAMPLE.TEST")]
    maildir = tmp_path / "mail" / "alice" / "Maildir"
    assert list((maildir / "tmp").iterdir()) == []
    assert (maildir / "cur").is_dir()


async def test_each_recipient_gets_its_own_result(tmp_path):
    report = await transport(tmp_path).deliver(request("alice@example.test", "nobody@example.test"))
    assert [(r.recipient.address, r.outcome) for r in report.results] == [
        ("alice@example.test", Outcome.SENT), ("nobody@example.test", Outcome.BOUNCED)]


async def test_alias_to_two_users_and_a_remote_address(tmp_path):
    fwd = FakeForward()
    t = transport(tmp_path, "team: alice, bob, carol@remote.test\n", forward=fwd)
    req = request("team@example.test")
    [result] = (await t.deliver(req)).results
    assert result.outcome is Outcome.SENT
    assert "FWD1" in result.text
    assert delivered(tmp_path, "alice") == [mailbox_copy("team@example.test", "TEAM@EXAMPLE.TEST")]
    assert delivered(tmp_path, "bob") == [mailbox_copy("team@example.test", "TEAM@EXAMPLE.TEST")]
    [(fwd_request, fwd_rcpt, addresses, content)] = fwd.calls
    assert fwd_request is req
    assert fwd_rcpt == req.recipients[0]
    assert addresses == ("carol@remote.test",)
    assert content.to_bytes() == b"Delivered-To: team@example.test\r\n" + CONTENT


async def test_a_value_mailflow_cannot_take_defers_its_alias_only(tmp_path, caplog):
    """Postfix reads a value when its alias is expanded: `./mbox` (no address mailflow can take) defers a3 with a
    reason naming the table and the key; a0 in the same table is delivered, and `files/rel` is an address."""
    fwd = FakeForward()
    t = transport(tmp_path, "a0: alice\na3: bob, ./mbox\na4: files/rel@remote.test\n", forward=fwd)
    [a0, a3, a4] = (await t.deliver(request("a0@example.test", "a3@example.test", "a4@example.test"))).results
    assert a0.outcome is Outcome.SENT and len(delivered(tmp_path, "alice")) == 1
    assert (a3.outcome, a3.dsn) == (Outcome.DEFERRED, "4.3.5")
    assert "'a3'" in a3.text and str(tmp_path / "aliases") in a3.text and delivered(tmp_path, "bob") == []
    assert a4.outcome is Outcome.SENT and [c[2] for c in fwd.calls] == [("files/rel@remote.test",)]
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"Q1: texthash:{tmp_path / 'aliases'}: bad value for key 'a3': bad address './mbox'")


async def test_several_remote_addresses_go_in_one_forward(tmp_path):
    fwd = FakeForward()
    t = transport(tmp_path, "team: x@remote.test, y@remote.test\n", forward=fwd)
    [result] = (await t.deliver(request("team@example.test"))).results
    assert result.outcome is Outcome.SENT
    assert [call[2] for call in fwd.calls] == [("x@remote.test", "y@remote.test")]


async def test_a_forwarded_mailbox_form_name_holding_an_at_is_logged_with_the_address_the_copy_goes_to(tmp_path):
    """`"\\\\\\\\x@remote.test"` with myorigin local is queued as `"\\\\x@remote.test"@example.test`, which qmgr's
    resolve (as Postfix's) takes apart: the copy goes to `"\\\\x"@remote.test`. The result line named the queued
    form; it names where the copy goes (Postfix's line is only `forwarded as ID`)."""
    fwd = FakeForward()
    t = transport(tmp_path, 'team: "\\\\\\\\x@remote.test", y@remote.test\n', forward=fwd)
    [result] = (await t.deliver(request("team@example.test"))).results
    assert [call[2] for call in fwd.calls] == [('"\\\\\\\\x@remote.test"@example.test', "y@remote.test")]
    assert result.text == 'forwarded as FWD1 to "\\\\\\\\x"@remote.test, y@remote.test'


async def test_a_list_with_an_owner_is_resubmitted_from_the_owner(tmp_path):
    """local(8): members of a list that has an owner- alias get a new message from owner-list@myorigin (local
    ones too, so that cleanup's maps apply to them); the owner's address gets the bounces."""
    fwd = FakeForward()
    t = transport(tmp_path, "list: alice, x@remote.test\nowner-list: bob\n", forward=fwd)
    [result] = (await t.deliver(request("list@example.test"))).results
    assert result.outcome is Outcome.SENT
    assert [call[2] for call in fwd.calls] == [("alice@example.test", "x@remote.test")]
    assert fwd.senders == ["owner-list@example.test"]
    assert delivered(tmp_path, "alice") == []


async def test_delivered_to_loop_bounces_and_writes_nothing(tmp_path):
    fwd = FakeForward()
    content = b"Delivered-To: alice@example.test\r\n" + CONTENT
    [result] = (await transport(tmp_path, forward=fwd).deliver(request("alice@example.test", content=content))).results
    assert (result.outcome, result.dsn) == (Outcome.BOUNCED, "5.4.6")
    assert delivered(tmp_path, "alice") == []
    assert fwd.calls == []


async def test_an_alias_whose_expansion_comes_to_nothing_is_done_with_no_line(tmp_path):
    """`a4: :include:i1`, i1 naming only itself, and `a1: a4`: nothing to deliver, forward nor refuse. local(8)
    returns success for such a recipient and logs no line (seed 7012): sent, and qmgr logs no line for it; a
    recipient given something to deliver keeps its line."""
    from mailflow.stages.qmgr import _owned_lines
    (tmp_path / "i1").write_text(f":include:{tmp_path / 'i1'}\n")
    t = transport(tmp_path, f"a4: :include:{tmp_path / 'i1'}\na1: a4\n")
    results = (await t.deliver(request("a1@example.test", "a4@example.test", "alice@example.test"))).results
    assert [(r.outcome, len(_owned_lines(r))) for r in results] == [(Outcome.SENT, 0), (Outcome.SENT, 0),
                                                                      (Outcome.SENT, 1)]


async def test_unknown_user_bounces(tmp_path):
    [result] = (await transport(tmp_path).deliver(request("nobody@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.BOUNCED, "5.1.1")


async def test_without_command_settings_a_command_part_defers(tmp_path):
    fwd = FakeForward()
    t = transport(tmp_path, "run: alice, |/usr/bin/filter, x@remote.test\n", forward=fwd)
    [run, bob] = (await t.deliver(request("run@example.test", "bob@example.test"))).results
    assert (run.outcome, run.dsn) == (Outcome.DEFERRED, "4.3.5") and "|/usr/bin/filter" in run.text
    assert len(delivered(tmp_path, "alice")) == 1  # the other parts went (local(8) too)
    assert fwd.calls == []  # but no new message: local(8)'s forward_finish cancels those of a deferred recipient
    assert bob.outcome is Outcome.SENT  # other recipients are not held back


@pytest.fixture
def public_dir():
    """A directory `nobody` can write in (pytest's tmp_path is root's, 0700): as root, /file destinations are
    written by default_privs, as Postfix does."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="mailflow-files-"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_file_targets_get_mbox_entries_and_dev_null_discards(tmp_path, public_dir):
    archive = public_dir / "mail.mbox"
    t = transport(tmp_path, f"keep: {archive}, /dev/null\n")
    for _ in range(2):
        [result] = (await t.deliver(request("keep@example.test"))).results
        assert result.outcome is Outcome.SENT, result.text
    entries = archive.read_bytes().split(b"\n\nFrom ")
    assert len(entries) == 2 and archive.read_bytes().startswith(b"From sender@remote.test  ")
    assert b"Delivered-To: keep@example.test\n" in entries[0] and b"\nline two\n" in entries[1]
    if os.geteuid() == 0:  # written by the unprivileged child process
        assert archive.stat().st_uid == pwd.getpwnam("nobody").pw_uid


async def test_a_file_target_in_a_missing_folder_defers_and_makes_no_folder(tmp_path, public_dir):
    """An alias names a file, not folders to make (local(8) creates none either; it bounces 5.2.0 where mailflow
    defers, as for any OS error writing a mailbox)."""
    t = transport(tmp_path, f"keep: {public_dir / 'archive' / 'mail.mbox'}\n")
    [result] = (await t.deliver(request("keep@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.2.0"), result.text
    assert "No such file or directory" in result.text and not (public_dir / "archive").exists()


async def test_an_executable_file_target_bounces_untouched(tmp_path, public_dir):
    """local(8): "file is executable" (5.7.1), in its words: mail is never appended to a program."""
    program = public_dir / "program"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o777)
    t = transport(tmp_path, f"keep: {program}\n")
    [result] = (await t.deliver(request("keep@example.test"))).results
    assert (result.outcome, result.dsn, result.text) == (
        Outcome.BOUNCED, "5.7.1", f"cannot append message to file {program}: file is executable")
    assert program.read_text() == "#!/bin/sh\n"


async def test_a_symlinked_file_target_bounces(tmp_path, public_dir):
    (public_dir / "real").write_text("")
    (public_dir / "link").symlink_to(public_dir / "real")
    t = transport(tmp_path, f"keep: {public_dir / 'link'}\n")
    [result] = (await t.deliver(request("keep@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.BOUNCED, "5.2.0")
    assert (public_dir / "real").read_text() == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches to default_privs")
async def test_as_root_a_file_target_is_written_with_default_privs_only(tmp_path):
    """A file only root may write (here: in root's 0700 tmp_path) is refused: nothing runs as root."""
    t = transport(tmp_path, f"keep: {tmp_path / 'secret.mbox'}\n")
    [result] = (await t.deliver(request("keep@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.2.0") and "Permission denied" in result.text
    assert not (tmp_path / "secret.mbox").exists()


async def test_a_directory_target_is_a_maildir_written_with_default_privs(tmp_path, public_dir):
    """local(8)'s file.c hands a name ending in "/" to deliver_maildir: tmp/ new/ cur/ made (0700, and the missing
    directory above them), the copy (Return-Path, X-Original-To, Delivered-To, as a /file's) in new/, 0600. As
    root all of it is default_privs', written by a child as that user: nothing made as root and given away."""
    box = public_dir / "archive" / "box"
    t = transport(tmp_path, f"keep: {box}/\n")
    for _ in range(2):
        [result] = (await t.deliver(request("keep@example.test"))).results
        assert (result.outcome, result.dsn, result.text) == (Outcome.SENT, "2.0.0", "delivered to maildir")
    messages = sorted((box / "new").iterdir())
    assert [m.read_bytes() for m in messages] == [mailbox_copy("keep@example.test", "KEEP@EXAMPLE.TEST")] * 2
    assert not list((box / "tmp").iterdir()) and not list((box / "cur").iterdir())
    writer = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()
    made = [public_dir / "archive", box, box / "tmp", box / "new", box / "cur"]
    assert {(p.stat().st_uid, p.stat().st_mode & 0o7777) for p in made} == {(writer, 0o700)}
    assert {(m.stat().st_uid, m.stat().st_mode & 0o7777) for m in messages} == {(writer, 0o600)}


async def test_a_directory_target_its_writer_may_not_write_defers_in_local8s_words(tmp_path, public_dir):
    """local(8): "maildir delivery failed: create maildir file DIR/tmp/NAME: Permission denied" (Postfix bounces it
    5.2.0; mailflow defers it, as every OS error writing a mailbox). Nothing is written there."""
    closed = public_dir / "closed"
    closed.mkdir(mode=0o555)
    if os.geteuid() != 0 and os.access(closed, os.W_OK):
        pytest.skip("this user may write any directory")
    t = transport(tmp_path, f"keep: {closed}/box/\n")
    [result] = (await t.deliver(request("keep@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.2.0"), result.text
    assert re.fullmatch(rf"maildir delivery failed: create maildir file {re.escape(str(closed))}/box/tmp/[^/]+: "
                        r"Permission denied", result.text), result.text
    assert not list(closed.iterdir())


async def test_a_directory_target_past_mailbox_size_limit_bounces_and_keeps_nothing(tmp_path, public_dir):
    """mailbox_size_limit is local(8)'s file size limit, its Maildir files' too: 5.2.2, tmp/ left empty."""
    box = public_dir / "box"
    t = transport(tmp_path, f"keep: {box}/\n", mailbox_size_limit=100)
    [result] = (await t.deliver(request("keep@example.test"))).results
    assert (result.outcome, result.dsn, result.text) == (
        Outcome.BOUNCED, "5.2.2", "maildir delivery failed: error writing message: File too large")
    assert not list((box / "tmp").iterdir()) and not list((box / "new").iterdir())


async def test_home_mailbox_as_an_mbox_file(tmp_path):
    t = transport(tmp_path, home_mailbox="Mailbox")
    [result] = (await t.deliver(request("alice@example.test"))).results
    assert (result.outcome, result.text) == (Outcome.SENT, "delivered to mailbox")
    mbox = (tmp_path / "mail" / "alice" / "Mailbox").read_bytes()
    assert mbox.startswith(b"From sender@remote.test  ") and mbox.endswith(b"line two\n\n")


async def test_a_delivery_past_mailbox_size_limit_bounces_5_2_2_and_the_file_keeps_what_it_had(tmp_path, public_dir):
    """Postfix's mailbox_size_limit is a file size limit on local(8): the mbox file, /file destination or Maildir
    file a delivery would make bigger is not written (5.2.2, in local(8)'s words), what was there stays."""
    archive = public_dir / "archive.mbox"
    t = transport(tmp_path, f"keep: {archive}\n", home_mailbox="Mailbox", mailbox_size_limit=400)
    mbox = tmp_path / "mail" / "alice" / "Mailbox"
    said = {mbox: f"cannot update mailbox {mbox} for user alice. ",
            archive: f"cannot append message to file {archive}: "}
    for path, rcpt in ((mbox, "alice@example.test"), (archive, "keep@example.test")):
        [result] = (await t.deliver(request(rcpt))).results
        assert result.outcome is Outcome.SENT and 200 < len(first := path.read_bytes()) <= 400, result
        [result] = (await t.deliver(request(rcpt))).results
        assert (result.outcome, result.dsn) == (Outcome.BOUNCED, "5.2.2"), result
        assert result.text == said[path] + "error writing message: File too large"
        assert path.read_bytes() == first
    maildirs = transport(tmp_path, mailbox_size_limit=100)
    [result] = (await maildirs.deliver(request("bob@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.BOUNCED, "5.2.2"), result
    assert result.text == "maildir delivery failed: error writing message: File too large"
    assert delivered(tmp_path, "bob") == [] and list((tmp_path / "mail" / "bob" / "Maildir" / "tmp").iterdir()) == []


async def test_refused_part_bounces_and_delivered_part_is_written(tmp_path):
    t = transport(tmp_path, "team: alice, nobody\n")
    [result] = (await t.deliver(request("team@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.BOUNCED, "5.1.1")
    # reported about the member that does not exist, as Postfix's "<member> (expanded from <recipient>)"
    assert result.expanded == "nobody@example.test" and "nobody@example.test" not in result.text
    assert (result.named.address, result.named.original) == ("nobody@example.test", "TEAM@EXAMPLE.TEST")
    assert "also: delivered to maildir" in result.text
    assert delivered(tmp_path, "alice") == [mailbox_copy("team@example.test", "TEAM@EXAMPLE.TEST")]


async def test_two_missing_members_are_reported_about_the_recipient(tmp_path):
    t = transport(tmp_path, "team: alice, nobody, ghost\n")
    [result] = (await t.deliver(request("team@example.test"))).results
    assert (result.outcome, result.expanded) == (Outcome.BOUNCED, "")
    assert "nobody@example.test: " in result.text and "ghost@example.test: " in result.text


async def test_maildir_that_cannot_be_written_defers(tmp_path):
    home = tmp_path / "mail" / "alice"
    home.mkdir(parents=True)
    (home / "Maildir").write_text("not a directory")
    [result] = (await transport(tmp_path).deliver(request("alice@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.2.0")


@pytest.mark.parametrize("error, outcome, dsn", [
    (errno.EDQUOT, Outcome.BOUNCED, "5.2.2"), (errno.EFBIG, Outcome.BOUNCED, "5.2.2"),
    (errno.ENOSPC, Outcome.DEFERRED, "4.3.0"), (errno.EIO, Outcome.DEFERRED, "4.2.0"),
])
async def test_a_maildir_over_its_file_system_quota_bounces_mailbox_full(tmp_path, monkeypatch, error, outcome, dsn):
    """Postfix's local(8) maps EDQUOT and EFBIG to 5.2.2 (mbox_dsn) and bounces, as mailflow's own mbox delivery
    does; a Maildir write used to defer 4.2.0 for them, retrying until the queue lifetime ran out."""
    async def full(self, maildir, prefix, content, owner=None, size_limit=0, **_):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(MaildirWriter, "write", full)
    [result] = (await transport(tmp_path).deliver(request("alice@example.test"))).results
    assert (result.outcome, result.dsn) == (outcome, dsn)
    assert result.text == f"maildir delivery failed: {os.strerror(error)}"


async def test_forward_that_fails_defers(tmp_path):
    fwd = FakeForward(error=RuntimeError("cleanup is gone"))
    t = transport(tmp_path, "team: carol@remote.test\n", forward=fwd)
    [result] = (await t.deliver(request("team@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.3.0")
    assert len(fwd.calls) == 1


async def test_a_forward_local8_would_not_use_is_logged_with_the_queue_id_and_the_mailbox_gets_the_mail(
        tmp_path, caplog):
    (tmp_path / "mail" / "bob" / ".forward").mkdir(parents=True)
    [result] = (await transport(tmp_path).deliver(request("bob@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.SENT, "2.0.0")
    assert len(delivered(tmp_path, "bob")) == 1
    assert f"Q1: file {tmp_path / 'mail' / 'bob' / '.forward'} is not a regular file" in caplog.messages


async def test_a_forward_that_cannot_be_read_defers(tmp_path):
    (tmp_path / "mail" / "bob").mkdir(parents=True)
    (tmp_path / "mail" / "bob" / ".forward").write_bytes(b"\xff\xfe not text\n")
    [result] = (await transport(tmp_path).deliver(request("bob@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.3.0")
    assert delivered(tmp_path, "bob") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches to default_privs")
async def test_as_root_an_include_file_named_in_a_forward_is_read_with_default_privs_only(tmp_path, public_dir):
    """Postfix reads a .forward's :include: file with the user's rights ("cannot open include file ...:
    Permission denied"); read as root, a file only root may read came back line by line in the defer text."""
    (public_dir / "secret").write_text("root:$6$SECRET:19000:0:99999:7:::\n")
    (public_dir / "secret").chmod(0o600)
    (public_dir / "team").write_text("carol@remote.test\n")
    home = tmp_path / "mail" / "bob"
    home.mkdir(parents=True)
    (home / ".forward").write_text(f":include:{public_dir / 'secret'}\n")
    t = transport(tmp_path, forward=(fwd := FakeForward()))
    [result] = (await t.deliver(request("bob@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.3.0"), result
    assert "Permission denied" in result.text and "SECRET" not in result.text
    (home / ".forward").write_text(f":include:{public_dir / 'team'}\n")  # one nobody may read
    [result] = (await t.deliver(request("bob@example.test"))).results
    assert result.outcome is Outcome.SENT and [c[2] for c in fwd.calls] == [("carol@remote.test",)], result



def threads_calling(monkeypatch, owner, name: str) -> list[threading.Thread]:
    """The thread of each call of `owner.name` (a module's function or a class's method), in order."""
    threads: list[threading.Thread] = []
    called = getattr(owner, name)

    def watched(*args, **kw):
        threads.append(threading.current_thread())
        return called(*args, **kw)

    monkeypatch.setattr(owner, name, watched)
    return threads


async def test_a_big_forward_is_parsed_off_the_event_loop_and_a_small_one_on_it(tmp_path, monkeypatch):
    """A user's .forward of up to 1 MB (SMALL_FILE_LIMIT) was parsed on the event loop before the leaf budget could
    stop it: 0.4 s for 1 MB, every session and delivery waiting. Past INLINE_FILE_BYTES it is parsed in a thread."""
    parsed = threads_calling(monkeypatch, aliasing, "parse_lines")
    t = transport(tmp_path, anyone_is_local=True, forward=(fwd := FakeForward()))
    for user, members in (("carol", 1000), ("dave", 2)):
        home = tmp_path / "mail" / user
        home.mkdir(parents=True)
        (home / ".forward").write_text(", ".join(f"{user}{i}@remote.test" for i in range(members)) + "\n")
    assert (tmp_path / "mail" / "carol" / ".forward").stat().st_size > 16_384  # (INLINE_FILE_BYTES)
    [result] = (await t.deliver(request("carol@example.test"))).results
    assert result.outcome is Outcome.SENT and len(fwd.calls[-1][2]) == 1000
    assert parsed and threading.main_thread() not in parsed
    parsed.clear()
    [result] = (await t.deliver(request("dave@example.test"))).results
    assert result.outcome is Outcome.SENT and parsed == [threading.main_thread()]


async def test_a_long_alias_value_is_parsed_off_the_event_loop_and_a_short_one_on_it(tmp_path, monkeypatch):
    """An alias of 10 000 members (a 150 KB value) was parsed on the event loop before the leaf budget could stop
    it: 0.2 s, every session and delivery waiting. Past INLINE_FILE_BYTES characters it is parsed in a thread."""
    parsed = threads_calling(monkeypatch, aliasing, "parse_value")
    members = ", ".join(f"m{i}@remote.test" for i in range(1000))
    assert len(members) > 16_384  # (INLINE_FILE_BYTES)
    t = transport(tmp_path, f"big: {members}\nsmall: m1@remote.test, m2@remote.test\n", forward=(fwd := FakeForward()))
    [result] = (await t.deliver(request("big@example.test"))).results
    assert result.outcome is Outcome.SENT and len(fwd.calls[-1][2]) == 1000
    assert parsed and threading.main_thread() not in parsed
    parsed.clear()
    [result] = (await t.deliver(request("small@example.test"))).results
    assert result.outcome is Outcome.SENT and parsed == [threading.main_thread()]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root reads a .forward with its user's rights")
async def test_a_forward_read_with_its_users_rights_is_read_off_the_event_loop(tmp_path, public_dir, monkeypatch):
    """A system user's .forward and its :include: files are read as the user, by a forked child: on the event loop
    each fork held every session and delivery 4 ms (a process of 86 MB) to 64 ms (1.1 GB), and an alias of 200
    such users was expanded there. An expansion that forks is made in a worker thread."""
    (public_dir / "team").write_text("carol@remote.test\n")
    home = public_dir / "mail" / "nobody"
    home.mkdir(parents=True)
    (home / ".forward").write_text(f"\\nobody, :include:{public_dir / 'team'}\n")
    forks = threads_calling(monkeypatch, aliasing, "call_as")
    t = transport(tmp_path, anyone_is_local=True, forward=(fwd := FakeForward()), maildir_base=str(public_dir / "mail"))
    [result] = (await t.deliver(request("nobody@example.test"))).results
    assert result.outcome is Outcome.SENT, result
    assert [c[2] for c in fwd.calls] == [("carol@remote.test",)] and len(delivered_in(home)) == 1
    assert len(forks) == 2 and threading.main_thread() not in forks


@pytest.mark.skipif(os.geteuid() != 0, reason="only root reads a .forward with its user's rights")
async def test_a_forward_is_read_once_an_expansion_however_often_its_user_is_met(tmp_path, public_dir, monkeypatch):
    """A .forward was read (a fork as its user) at each visit of its user, before the look at whether it was
    expanded already: the user named in it (its mailbox) and met again through an alias read it three times."""
    home = public_dir / "mail" / "nobody"
    home.mkdir(parents=True)
    (home / ".forward").write_text("nobody, carol@remote.test\n")
    forks = threads_calling(monkeypatch, aliasing, "call_as")
    t = transport(tmp_path, "team: nobody, twice\ntwice: nobody\n", anyone_is_local=True,
                  forward=(fwd := FakeForward()), maildir_base=str(public_dir / "mail"))
    [result] = (await t.deliver(request("team@example.test"))).results
    assert result.outcome is Outcome.SENT, result
    assert [c[2] for c in fwd.calls] == [("carol@remote.test",)] and len(delivered_in(home)) == 1
    assert len(forks) == 1


async def test_local_part_with_a_path_is_not_written_outside_maildir_base(tmp_path):
    outside = tmp_path / "outside"
    await transport(tmp_path, anyone_is_local=True).deliver(request(f"{outside}@example.test"))
    assert not outside.exists()


async def test_one_copy_per_local_part_however_many_recipients_lead_there(tmp_path):
    """One copy per local part and its extension (local(8)'s been_here "mailbox <local part>"): alice once for
    alice and team, alice+x a copy of its own."""
    report = await transport(tmp_path, "team: alice, bob\n").deliver(
        request("alice@example.test", "team@example.test", "Alice+x@example.test", "alice+X@example.test"))
    assert [r.outcome for r in report.results] == [Outcome.SENT] * 4
    assert len(delivered(tmp_path, "alice")) == 2 and len(delivered(tmp_path, "bob")) == 1


async def test_a_recipient_beginning_with_a_dash_bounces_unless_allow_min_user(tmp_path):
    local = transport(tmp_path, anyone_is_local=True)
    report = await local.deliver(request("-oQ@example.test"))
    assert [(r.outcome, r.dsn) for r in report.results] == [(Outcome.BOUNCED, "5.1.3")]
    assert not (tmp_path / "mail" / "-oQ").exists()


# ---------------------------------------------------------------------------------------------- big messages

async def test_a_spooled_message_reaches_maildir_mbox_and_forward_byte_exact(tmp_path):
    """Bigger than the in-memory limit and read from a file in chunks: the Maildir copy, the mbox entry (mboxrd
    quoting across chunk boundaries) and the forwarded copy are what the whole-message rules make of it."""
    data = big_message()
    content = spooled(tmp_path, data)
    assert not content.in_memory and content.size > MEMORY_LIMIT
    fwd = FakeForward()
    t = transport(tmp_path, "team: alice, carol@remote.test\n", forward=fwd)
    req = DeliveryRequest("Q1", SENDER, (Recipient(0, "team@example.test", "team@example.test"),), "x", content)
    [result] = (await t.deliver(req)).results
    assert result.outcome is Outcome.SENT
    prefix = mailbox_copy("team@example.test").split(b"From: ")[0]
    assert delivered(tmp_path, "alice") == [prefix + data.replace(b"\r\n", b"\n")]
    [(_, _, _, forwarded)] = fwd.calls
    assert forwarded.to_bytes() == b"Delivered-To: team@example.test\r\n" + data

    t = transport(tmp_path, home_mailbox="Mailbox")
    await t.deliver(DeliveryRequest("Q2", SENDER, (Recipient(0, "bob@example.test", "bob@example.test"),), "x",
                                    content))
    mbox = (tmp_path / "mail" / "bob" / "Mailbox").read_bytes()
    text = (mailbox_copy("bob@example.test").split(b"From: ")[0] + data).replace(b"\r\n", b"\n")
    assert mbox.split(b"\n", 1)[1] == re.sub(rb"(?m)^(>*From )", rb">\1", text) + b"\n"


async def test_an_alias_of_more_than_a_thousand_members_is_forwarded_as_one_message(tmp_path):
    """Postfix's local(8) forwards an alias of 1200 remote members as one message (seen against a private
    Postfix 3.7); a limit of 1000 destinations deferred it 4.6.0 at every attempt. The success text names the
    first ten addresses only."""
    members = [f"m{i}@remote.test" for i in range(1200)]
    fwd = FakeForward()
    t = transport(tmp_path, f"big: {', '.join(members)}\n", forward=fwd)
    [result] = (await t.deliver(request("big@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.SENT, "2.0.0"), result.text
    assert [call[2] for call in fwd.calls] == [tuple(members)]
    assert result.text == f"forwarded as FWD1 to {', '.join(members[:10])} and 1190 more"


async def test_an_alias_of_many_mailboxes_and_ghosts_gives_a_short_result_text(tmp_path):
    """1200 local members each delivered to a Maildir give one text, counted ("delivered to maildir (1200
    times)"), not 1200 copies of it (~25 KB; 2 MB at 100 000 members) in the log line, the recipient row and its
    notices; different texts (members that do not exist) are named up to ten, then counted."""
    users = [f"u{i}" for i in range(1200)]
    t = transport(tmp_path, f"many: {', '.join(users)}\n", anyone_is_local=True)
    [result] = (await t.deliver(request("many@example.test"))).results
    assert (result.outcome, result.text) == (Outcome.SENT, "delivered to maildir (1200 times)")
    t = transport(tmp_path, f"ghosts: alice, {', '.join(f'g{i}' for i in range(30))}\n")
    [result] = (await t.deliver(request("ghosts@example.test"))).results
    assert result.outcome is Outcome.BOUNCED and len(result.text) < 1000, result.text
    assert result.text.startswith('g0@example.test: ') and "; and 20 more (also: delivered to maildir)" in result.text


async def test_an_alias_of_thousands_of_local_members_is_expanded_off_the_event_loop(tmp_path, monkeypatch):
    """Each local member costs a lookup and a look for its .forward (~67 us): 10 000 held the event loop ~0.7 s,
    100 000 ~7 s, at every attempt. Past INLINE_LEAVES the expansion is made in a worker thread; a small one
    stays inline (the tables answer from memory: nothing to wait for)."""
    t = transport(tmp_path, f"many: {', '.join(f'u{i}' for i in range(300))}\nfew: alice, bob\n",
                  anyone_is_local=True)
    threads = threads_calling(monkeypatch, LocalExpander, "unknown_user")  # one a member
    [result] = (await t.deliver(request("few@example.test"))).results
    assert result.outcome is Outcome.SENT and set(threads) == {threading.main_thread()}
    threads.clear()
    [result] = (await t.deliver(request("many@example.test"))).results
    assert (result.outcome, result.text) == (Outcome.SENT, "delivered to maildir (300 times)")
    assert threads[-1] is not threading.main_thread()
    assert len(delivered(tmp_path, "u299")) == 1


async def test_an_alias_of_the_same_members_over_and_over_is_expanded_off_the_event_loop_too(tmp_path, monkeypatch):
    """The budget counts the members met, duplicates too (the work), not the leaves kept: 300 lists of the same two
    users are 600 members to look at for 2 mailboxes (3 000 such lists held the loop 0.6 s before)."""
    lists = "".join(f"team{i}: alice, bob\n" for i in range(300))
    t = transport(tmp_path, f"staff: {', '.join(f'team{i}' for i in range(300))}\n{lists}")
    threads = threads_calling(monkeypatch, LocalExpander, "unknown_user")  # one a member
    [result] = (await t.deliver(request("staff@example.test"))).results
    assert result.outcome is Outcome.SENT and threads and threads[-1] is not threading.main_thread()
    assert len(delivered(tmp_path, "alice")) == 1 and len(delivered(tmp_path, "bob")) == 1


def off_loop(work):
    """An expand_recipient whose inline attempt gives up (as before a fork): the expansion is `work`, made in a
    worker thread."""
    def expand(address, *, leaf_budget=None, **kw):
        if leaf_budget is not None:
            raise aliasing.ExpansionTooBig()
        return work(address, **kw)
    return expand


class HeldThreads:
    """Calls that each hold their thread until `release` is set, counted: `most` the most at once; `reached` is set
    (on the event loop) when `count` are held at once."""

    def __init__(self, count: int):
        self.release, self.reached = threading.Event(), asyncio.Event()
        self.running = self.most = 0
        self._count, self._lock, self._loop = count, threading.Lock(), asyncio.get_running_loop()

    def hold(self, answer: Callable[[], object]):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
            if self.running == self._count:
                self._loop.call_soon_threadsafe(self.reached.set)
        try:
            assert self.release.wait(timeout=30)
            return answer()
        finally:
            with self._lock:
                self.running -= 1


async def slow_expansions_all_sent(t) -> None:
    """Thirty deliveries, each expansion 0.1 s in a worker thread (two threads: 1.5 s in all, a call ending every
    0.1 s): all are delivered."""
    real = t._expander.expand_recipient

    def slow(address, **kw):
        time.sleep(0.1)
        return real(address, **kw)

    t._expander.expand_recipient = off_loop(slow)
    reports = await asyncio.wait_for(
        asyncio.gather(*(t.deliver(request("alice@example.test")) for _ in range(30))), 10)
    assert [r.results[0].outcome for r in reports] == [Outcome.SENT] * 30, [r.results[0].text for r in reports]


async def test_expansions_made_in_worker_threads_leave_the_shared_pool_free(tmp_path, monkeypatch):
    """An expansion that forks per .forward (an alias of 200 users: 1-13 s) or is too big for the loop is made in a
    worker thread of the default executor, which the queue's fsyncs, the mailbox writes and smtpd share: eight at
    once held every thread. At most OFF_LOOP_EXPANSIONS run at once; an unrelated to_thread call is not held."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    t = transport(tmp_path)
    held = HeldThreads(1)
    real = t._expander.expand_recipient
    monkeypatch.setattr(t._expander, "expand_recipient",
                        off_loop(lambda address, **kw: held.hold(lambda: real(address, **kw))))
    deliveries = [asyncio.ensure_future(t.deliver(request("alice@example.test"))) for _ in range(8)]
    try:
        await asyncio.wait_for(held.reached.wait(), 10)
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 10)  # (all four threads held: never done)
    finally:
        held.release.set()
        reports = await asyncio.gather(*deliveries)
    assert all(r.results[0].outcome is Outcome.SENT for r in reports)
    assert held.most == agent.OFF_LOOP_EXPANSIONS


async def test_an_expansion_whose_delivery_stopped_waiting_still_holds_its_thread(tmp_path, monkeypatch):
    """A cancelled delivery (shutdown) or a sqlite table's deadline stops the wait, not the thread: the semaphore
    was released at once and each retry added a thread (the review counted 6 against the bound of 2). The threads
    stay counted until their expansions end; another expansion waits OFF_LOOP_WAIT at most, then defers 4.3.0."""
    monkeypatch.setattr(agent, "OFF_LOOP_WAIT", 0.3, raising=False)
    t = transport(tmp_path)
    held = HeldThreads(agent.OFF_LOOP_EXPANSIONS)
    monkeypatch.setattr(t._expander, "expand_recipient", off_loop(lambda address, **kw: held.hold(lambda: ([], ""))))
    stopped = [asyncio.ensure_future(t.deliver(request("alice@example.test"))) for _ in range(2)]
    try:
        await asyncio.wait_for(held.reached.wait(), 10)
        for delivery in stopped:
            delivery.cancel()
        await asyncio.gather(*stopped, return_exceptions=True)
        [result] = (await asyncio.wait_for(t.deliver(request("bob@example.test")), 10)).results
        assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.3.0"), result
        assert result.text == "no worker free for local expansion within 0.3s: 2 busy"
        assert held.most == agent.OFF_LOOP_EXPANSIONS
    finally:
        held.release.set()
        await t.close()


async def test_a_burst_of_slow_expansions_that_progress_is_queued_not_deferred(tmp_path, monkeypatch):
    """OFF_LOOP_WAIT bounded each waiter's own wait: thirty expansions of 0.1 s on two threads (1.5 s) with a wait
    of 1 s deferred the last ones "no worker free" though every thread was working. A waiter gives up only when no
    thread finished anything for the whole wait (hung threads: the test above)."""
    monkeypatch.setattr(agent, "OFF_LOOP_WAIT", 1.0)
    t = transport(tmp_path)
    try:
        await slow_expansions_all_sent(t)
    finally:
        await t.close()


async def test_file_appends_that_never_answer_hold_threads_of_their_own_not_the_shared_pool(tmp_path, public_dir,
                                                                                             monkeypatch):
    """A /file append (as the user, in a forked child) ran in the default executor's threads without limit: six to
    a file that never answers (a FUSE file the user serves) held every thread the queue's fsyncs, the Maildir
    writes and smtpd share. They run in FILE_WRITERS threads of the agent's own; an unrelated to_thread call runs."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    monkeypatch.setattr(agent, "OFF_LOOP_WAIT", 30.0)
    t = transport(tmp_path, f"keep: {public_dir / 'never.mbox'}\n")
    held = HeldThreads(agent.FILE_WRITERS)

    def hung(*args, **kw):
        return held.hold(lambda: None)

    monkeypatch.setattr(mbox, "_append_once", hung)
    monkeypatch.setattr(mbox, "_append_once_as", hung)
    deliveries = [asyncio.ensure_future(t.deliver(request("keep@example.test"))) for _ in range(6)]
    try:
        await asyncio.wait_for(held.reached.wait(), 10)
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 5)  # (before: all four threads held, never done)
    finally:
        held.release.set()
        reports = await asyncio.wait_for(asyncio.gather(*deliveries), 10)
        await t.close()
    assert all(r.results[0].outcome is Outcome.SENT for r in reports)
    assert held.most == agent.FILE_WRITERS


async def test_a_sqlite_deadline_firing_adds_no_expansion_thread(tmp_path, monkeypatch):
    """A sqlite table's deadline (asyncio.timeout) ends the wait, the thread goes on: with the semaphore each
    deferred retry added one (the review: 6 threads after 3 rounds of 2 deliveries against a bound of 2)."""
    from mailflow.tables import cache
    monkeypatch.setattr(cache, "RUN_GRACE", 0.0)
    monkeypatch.setattr(agent, "OFF_LOOP_WAIT", 0.3)  # (rounds 2 and 3 wait for a thread, outside the deadline)
    t = transport(tmp_path)
    monkeypatch.setattr(t._expander.tables, "_blocking", [type("SlowTable", (), {"timeout": 0.1})()])
    held = HeldThreads(agent.OFF_LOOP_EXPANSIONS)
    monkeypatch.setattr(t._expander, "expand_recipient", off_loop(lambda address, **kw: held.hold(lambda: ([], ""))))
    try:
        for _ in range(3):
            reports = await asyncio.wait_for(
                asyncio.gather(*(t.deliver(request("alice@example.test")) for _ in range(2))), 10)
            assert all(r.results[0].outcome is Outcome.DEFERRED for r in reports)
        assert held.most == agent.OFF_LOOP_EXPANSIONS
    finally:
        held.release.set()
        await t.close()


async def test_the_wait_for_an_expansion_thread_is_not_charged_to_a_sqlite_tables_deadline(tmp_path, monkeypatch):
    """Thirty expansions of 0.1 s, two threads (1.5 s), a table deadline of 1 s: the deadline covered the wait for a
    free thread too, so the later ones deferred "table lookup took longer than 1s" with no slow table at all."""
    from mailflow.tables import cache
    monkeypatch.setattr(cache, "RUN_GRACE", 0.0)
    t = transport(tmp_path)
    monkeypatch.setattr(t._expander.tables, "_blocking", [type("SlowTable", (), {"timeout": 1.0})()])
    try:
        await slow_expansions_all_sent(t)
    finally:
        await t.close()


async def test_an_include_file_is_measured_in_bytes_for_the_event_loop(tmp_path, public_dir, monkeypatch):
    """INLINE_FILE_BYTES is bytes, as for a .forward: an :include: file of 6 000 three-byte characters (18 KB) was
    counted 6 000 and parsed on the event loop."""
    team = public_dir / "team"
    team.write_text("# " + "日本語" * 2000 + "\ncarol@remote.test\n")
    assert len(team.read_text()) < 16_384 < team.stat().st_size  # (INLINE_FILE_BYTES)
    parsed = threads_calling(monkeypatch, aliasing, "parse_lines")
    t = transport(tmp_path, f"team: :include:{team}\n", forward=(fwd := FakeForward()))
    [result] = (await t.deliver(request("team@example.test"))).results
    assert result.outcome is Outcome.SENT and [c[2] for c in fwd.calls] == [("carol@remote.test",)], result
    assert parsed and threading.main_thread() not in parsed


@pytest.mark.skipif(os.geteuid() != 0, reason="a /file is written by a child as the user only as root")
async def test_a_file_append_whose_open_never_answers_is_stopped_and_defers(tmp_path, public_dir, monkeypatch):
    """A /file append as the user had no time limit: a file whose open never answers (a FUSE file the user serves)
    held its thread for ever. Its child stops itself when it has not started writing within FILE_START_TIMEOUT (and
    is killed when even that does not end it: tests/component/test_asuser.py)."""
    monkeypatch.setattr(mbox, "FILE_START_TIMEOUT", 0.5)
    monkeypatch.setattr(mbox, "_appended", patched_in_child(mbox, "_appended", (mbox, "_open_mailbox", _sleeps)))
    t = transport(tmp_path, f"keep: {public_dir / 'hung.mbox'}\n")
    try:
        [result] = (await asyncio.wait_for(t.deliver(request("keep@example.test")), 10)).results
    finally:
        await t.close()
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.3.0"), result
    assert result.text.endswith(": cannot write as nobody: not started writing within 0.5s"), result


def _sleeps(*args):  # (in call_as's child, sent by name)
    time.sleep(3600)


def _stops_mid_line(*args, **kwargs):  # (consumed in call_as's child, as it writes: sent by name)
    yield next(iter(mbox.mbox_entry(*args, **kwargs)))  # the From_ line
    yield b"Return-Path: <half"
    time.sleep(3600)  # (a write that never returns)


_real_encode = maildir.encode  # (in the child too: its import of this module comes before the patch)


def _stops_mid_message(*args, **kwargs):  # (consumed in call_as's child, as it writes: sent by name)
    yield next(iter(_real_encode(*args, **kwargs)))
    time.sleep(3600)  # (a write that never returns)


def _fails_mid_line(*args, **kwargs):  # (consumed in call_as's child, as it writes: sent by name)
    yield next(iter(mbox.mbox_entry(*args, **kwargs)))
    yield b"Return-Path: <half"
    raise OSError(errno.EIO, os.strerror(errno.EIO))


_real_truncate = mbox._truncate  # (in the child too: its import of this module comes before the patch)


def _slow_truncate(*args):  # (in call_as's child: a roll back that takes longer than the limit)
    time.sleep(0.8)
    _real_truncate(*args)


async def test_close_waits_within_its_bound_for_a_file_append_whose_delivery_was_cancelled(tmp_path, public_dir,
                                                                                            monkeypatch):
    """At the stop a /file append's delivery is cancelled after the grace, but its thread goes on writing; local's
    close did not wait, so the store closed and the process exited under it (an entry cut between two writes). close
    waits for it, `close_wait` s at most: one that ends is waited for, one that never does is left at the bound."""
    t = transport(tmp_path, f"keep: {public_dir / 'keep.mbox'}\n", close_wait=5)
    started, release, ended = threading.Event(), threading.Event(), threading.Event()

    def writing(*args, **kw):
        started.set()
        release.wait(10)
        ended.set()

    monkeypatch.setattr(mbox, "_append_once", writing)
    monkeypatch.setattr(mbox, "_append_once_as", writing)
    delivery = asyncio.ensure_future(t.deliver(request("keep@example.test")))
    assert await asyncio.to_thread(started.wait, 10)
    delivery.cancel()
    threading.Timer(0.1, release.set).start()  # (the write ends soon after the cancel: a bound of 0.5 s left
    await t.close()  # 0.4 s of slack on a loaded 2-core runner; 5 s leaves 4.9, and costs only when it fails)
    assert ended.is_set()

    stuck = transport(tmp_path, f"keep: {public_dir / 'keep.mbox'}\n", close_wait=0.2)
    started.clear(), release.clear()
    delivery = asyncio.ensure_future(stuck.deliver(request("keep@example.test")))
    assert await asyncio.to_thread(started.wait, 10)
    delivery.cancel()
    began = time.monotonic()
    try:
        await stuck.close()
        assert 0.2 <= time.monotonic() - began < 3
    finally:
        release.set()


async def test_a_file_append_that_stops_mid_write_is_rolled_back_and_the_retry_writes_one_copy(tmp_path, public_dir,
                                                                                              monkeypatch):
    """A /file append's child hung after it started writing held one of the two file-writer threads until a
    restart; then it was killed after command_time_limit, which left its partial entry (the retry's From_ line glued
    onto it: that message lost inside another's body) and its dotlock (every retry 4.2.0 for 500 s). Its own timer
    now stops it: the file is truncated back and the dotlock removed, as Postfix's mail_copy does on a failure;
    each of three such deliveries (more than the threads) defers at the limit, and the retry writes one copy."""
    archive = public_dir / "keep.mbox"
    archive.write_bytes(b"From old@example.test  Sun Dec  6 10:00:00 2026\nSubject: old\n\nold\n\n")
    archive.chmod(0o666)
    before = archive.read_bytes()
    real_entry = agent.mbox_entry
    monkeypatch.setattr(agent, "mbox_entry", _stops_mid_line)
    t = transport(tmp_path, f"keep: {archive}\n", command_time_limit=0.5)  # (default locks: fcntl, dotlock)
    try:
        for _ in range(3):  # (more than the FILE_WRITERS threads)
            started = time.monotonic()
            [result] = (await asyncio.wait_for(t.deliver(request("keep@example.test")), 10)).results
            assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.3.0"), result
            assert result.text.endswith(": cannot write as nobody: writing made no progress for 0.5s"), result
            assert time.monotonic() - started < 5
            assert archive.read_bytes() == before
            assert not mbox.dotlock_path(archive).exists()
        monkeypatch.setattr(agent, "mbox_entry", real_entry)
        [result] = (await asyncio.wait_for(t.deliver(request("keep@example.test")), 10)).results
        assert result.outcome is Outcome.SENT, result
    finally:
        await t.close()
    messages = [m["Subject"] for m in mailbox.mbox(archive)]
    assert messages == ["old", "hello"]


@pytest.mark.skipif(os.geteuid() != 0, reason="a /dir/ is written by a child as the user only as root")
async def test_a_maildir_file_write_that_stops_is_removed_from_tmp_and_the_retry_writes_one_copy(tmp_path, public_dir,
                                                                                                monkeypatch):
    """A /dir/ destination's child is a /file append's: hung mid-write, its own timer stops it after
    command_time_limit (4.3.0), the partial file is removed from tmp/, nothing reaches new/; the retry delivers."""
    box = public_dir / "box"
    real_written = maildir_file._written
    monkeypatch.setattr(maildir_file, "_written", patched_in_child(maildir_file, "_written",
                                                                   (maildir, "encode", _stops_mid_message)))
    t = transport(tmp_path, f"keep: {box}/\n", command_time_limit=0.5)
    try:
        started = time.monotonic()
        [result] = (await asyncio.wait_for(t.deliver(request("keep@example.test")), 10)).results
        assert (result.outcome, result.dsn, result.text) == (
            Outcome.DEFERRED, "4.3.0", "cannot write as nobody: writing made no progress for 0.5s"), result
        assert time.monotonic() - started < 5
        assert not list((box / "tmp").iterdir()) and not list((box / "new").iterdir())
        monkeypatch.setattr(maildir_file, "_written", real_written)
        [result] = (await asyncio.wait_for(t.deliver(request("keep@example.test")), 10)).results
        assert result.outcome is Outcome.SENT, result
    finally:
        await t.close()
    assert [m.read_bytes() for m in (box / "new").iterdir()] == [mailbox_copy("keep@example.test", "KEEP@EXAMPLE.TEST")]


@pytest.mark.skipif(os.geteuid() != 0, reason="a /file is written by a child as the user only as root")
async def test_a_failed_file_append_is_rolled_back_whole_even_past_the_write_limit(tmp_path, public_dir, monkeypatch):
    """A write that failed near the limit: the child's timer, still armed, interrupted its roll back (the file kept
    part of the entry) and the recipient got the limit's text instead of the failure's. (The failure is the entry's
    own: an OSError reading the queued message, told as mail_copy's read error.)"""
    archive = public_dir / "keep.mbox"
    archive.write_bytes(b"")
    archive.chmod(0o666)
    monkeypatch.setattr(agent, "mbox_entry", _fails_mid_line)
    monkeypatch.setattr(mbox, "_appended", patched_in_child(mbox, "_appended", (mbox, "_truncate", _slow_truncate)))
    t = transport(tmp_path, f"keep: {archive}\n", command_time_limit=0.5)
    try:
        [result] = (await asyncio.wait_for(t.deliver(request("keep@example.test")), 10)).results
    finally:
        await t.close()
    assert (result.outcome, result.dsn, result.text) == (
        Outcome.DEFERRED, "4.3.0",
        f"cannot append message to file {archive}: error reading message: Input/output error"), result
    assert archive.read_bytes() == b""
    assert not mbox.dotlock_path(archive).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="a /file is written by a child as the user only as root")
async def test_a_write_failing_after_the_limit_passed_is_rolled_back(public_dir):
    """A write blocked past the limit in a wait SIGALRM does not interrupt (NFS), then failing (EIO): the pending
    alarm's handler raised inside the roll back's progress.ended(), so the truncation never ran and the partial
    entry stayed (the next From_ line glued onto it). Here a C call stands for that write: libc sleep(500), ended
    early by the alarm, its result handed to os.close (EBADF) with no Python bytecode between them."""
    archive = public_dir / "keep.mbox"
    before = b"From old@x  Sun Dec  6 10:00:00 2026\nSubject: old\n\nold\n\n"
    archive.write_bytes(before)
    archive.chmod(0o666)

    with pytest.raises(TemporaryError) as failed:
        await asyncio.wait_for(mbox.append_mbox(archive, _BlockedEntry(), user="nobody", write_limit=0.3,
                                                create_parents=False), 20)
    assert (failed.value.dsn, failed.value.text) == (
        "4.3.0", "cannot write as nobody: writing made no progress for 0.3s")
    assert archive.read_bytes() == before
    assert not mbox.dotlock_path(archive).exists()


class _BlockedEntry:
    """An entry consumed in call_as's child (sent pickled, by its class's name) whose third write blocks."""

    def __iter__(self):
        yield b"From a@x  Sun Dec  6 10:00:00 2026\n"
        yield b"Return-Path: <half"
        blocked = ctypes.CDLL(None).sleep
        blocked.argtypes, blocked.restype = [ctypes.c_uint], os.close
        blocked(500)


@pytest.mark.skipif(os.geteuid() != 0, reason="a /file is written by a child as the user only as root")
async def test_a_file_append_hung_after_its_dotlock_before_writing_removes_the_dotlock(public_dir, monkeypatch):
    """The child's timer was armed only at its first write: one hung between the dotlock and the write (the stat
    of _check_still_the_mailbox on a hung NFS) was SIGKILLed and left the dotlock for stale_lock_time (500 s),
    holding off every other writer. Now its own timer runs from the fork and its failure path removes it."""
    archive = public_dir / "keep.mbox"
    archive.write_bytes(b"")
    archive.chmod(0o666)

    monkeypatch.setattr(mbox, "_appended", patched_in_child(mbox, "_appended",
                                                            (mbox, "_check_still_the_mailbox", _sleeps)))
    monkeypatch.setattr(mbox, "FILE_START_TIMEOUT", 0.3)
    started = time.monotonic()
    with pytest.raises(TemporaryError) as failed:
        await asyncio.wait_for(mbox.append_mbox(archive, b"From a@x  Sun Dec  6 10:00:00 2026\n\n", user="nobody",
                                                write_limit=30, locks=("dotlock",), create_parents=False), 20)
    assert time.monotonic() - started < 10  # (not the parent's SIGKILL, 30 s later)
    assert (failed.value.dsn, failed.value.text) == ("4.3.0", "cannot write as nobody: not started writing within 0.3s")
    assert not mbox.dotlock_path(archive).exists()
    assert archive.read_bytes() == b""


@pytest.mark.skipif(os.geteuid() != 0, reason="a /file is written by a child as the user only as root")
async def test_a_file_append_hung_closing_its_new_dotlock_removes_the_dotlock(public_dir, monkeypatch):
    """The dotlock was noted as made only once its new file was closed: a close that hung (NFS flushes at close)
    until the start timer stopped the child left the dotlock for stale_lock_time (500 s). It is noted as soon as it
    is created: the child's failure path removes it."""
    archive = public_dir / "keep.mbox"
    archive.write_bytes(b"")
    archive.chmod(0o666)
    monkeypatch.setattr(mbox, "_appended", patched_in_child(mbox, "_appended", (mbox, "os", _HangingLockClose())))
    monkeypatch.setattr(mbox, "FILE_START_TIMEOUT", 0.3)
    started = time.monotonic()
    with pytest.raises(TemporaryError) as failed:
        await asyncio.wait_for(mbox.append_mbox(archive, b"From a@x  Sun Dec  6 10:00:00 2026\n\n", user="nobody",
                                                write_limit=30, locks=("dotlock",), create_parents=False), 20)
    assert time.monotonic() - started < 10
    assert (failed.value.dsn, failed.value.text) == ("4.3.0", "cannot write as nobody: not started writing within 0.3s")
    assert not mbox.dotlock_path(archive).exists()
    assert archive.read_bytes() == b""


class _HangingLockClose:
    """In call_as's child, mbox's `os` (sent pickled, by its class's name): the close of a new lock file never
    returns."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def close(fd):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
                time.sleep(3600)
        os.close(fd)


async def test_an_expansion_stuck_in_a_read_does_not_keep_the_stopped_server_alive(tmp_path):
    """Expansions only read: their threads are daemon ones, so one stuck in a hung sqlite or NFS read does not keep
    the process from exiting after the stop (the /file writers' are joined: test_workers)."""
    t = transport(tmp_path, "a: b\n")
    try:
        assert await t._workers.run(lambda: threading.current_thread().daemon) is True
        assert await t._file_writers.run(lambda: threading.current_thread().daemon) is False
    finally:
        await t.close()


def test_a_mailbox_close_that_fails_still_removes_the_dotlock(tmp_path, monkeypatch):
    """The mailbox's close raising (EIO at NFS write-back) left the dotlock for stale_lock_time (500 s): every
    delivery to the file deferred "busy" meanwhile. Postfix's mbox_release removes it whatever the close did."""
    target = tmp_path / "file"
    target.write_bytes(b"")
    opened: set[int] = set()
    real_open, real_close = mbox._open_mailbox, os.close

    def recorded_open(*args, **kw):
        fd = real_open(*args, **kw)
        opened.add(fd)
        return fd

    def failing_close(fd):
        real_close(fd)
        if fd in opened:
            raise OSError(errno.EIO, "EIO at close")

    monkeypatch.setattr(mbox, "_open_mailbox", recorded_open)
    monkeypatch.setattr(mbox.os, "close", failing_close)
    with pytest.raises(Exception):
        asyncio.run(mbox.append_mbox(target, b"From x\n\nhi\n\n", locks=("dotlock", "fcntl")))
    monkeypatch.undo()
    assert not (tmp_path / "file.lock").exists()



@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches to default_privs")
@pytest.mark.parametrize("size", [300_000, 2_000_000])
async def test_as_root_a_big_message_in_a_root_only_spool_file_is_written_to_a_file_as_default_privs(tmp_path,
                                                                                                   public_dir, size):
    """A message over MEMORY_LIMIT lives in the queue's content file (root's, 0700: here in root's tmp_path), which
    `nobody` cannot open: the child writing the /file as `nobody` reads it through a descriptor its root parent
    opened. The entry is the same, byte for byte, as that of the same message held in memory."""
    data = big_message(size, seed=size)
    assert len(data) > MEMORY_LIMIT
    content = spooled(tmp_path, data)
    assert not content.in_memory
    t = transport(tmp_path, f"big: {public_dir / 'big.mbox'}\nsmall: {public_dir / 'small.mbox'}\n")
    for rcpt, message in (("big@example.test", content), ("small@example.test", Content.of(data))):
        sent = replace(request(rcpt), content=message)
        [result] = (await t.deliver(sent)).results
        assert result.outcome is Outcome.SENT, result.text
    written = (public_dir / "big.mbox").read_bytes()
    assert written.replace(b"Delivered-To: big@", b"Delivered-To: small@").replace(b"X-Original-To: BIG@",
                                                                                 b"X-Original-To: SMALL@") \
        == (public_dir / "small.mbox").read_bytes()
    assert mbox.mboxrd_unquote(written).endswith(data.replace(b"\r\n", b"\n") + b"\n")
    assert (public_dir / "big.mbox").stat().st_uid == pwd.getpwnam("nobody").pw_uid


_SERVER = """import asyncio, sys
from pathlib import Path
from mailflow.transports.local import mbox
from tests.support.inchild import SlowEntry
asyncio.run(mbox.append_mbox(Path(sys.argv[1]), SlowEntry(sys.argv[2]), user="nobody", write_limit=30,
                             create_parents=False))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a /file is written by a child as the user only as root")
def test_a_kill_of_the_servers_process_group_mid_append_leaves_the_file_whole_or_as_it_was(public_dir):
    """systemd and docker stop a server with SIGTERM to its whole process group: the child appending a /file as
    the user, forked from the server, was in it and died mid-write (the partial entry stayed, the next From_ line
    glued onto it). The helper and its children ignore it: the child, its caller gone, rolls its append back (or
    had finished it), removes its dotlock and ends; then the helper ends too."""
    archive = public_dir / "keep.mbox"
    before = b"From old@x  Sun Dec  6 10:00:00 2026\nSubject: old\n\nold\n\n"
    archive.write_bytes(before)
    archive.chmod(0o666)
    marker = public_dir / "marker"
    repo = str(Path(__file__).resolve().parents[2])  # (the child imports tests.*, which "" on its path no longer finds)
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(archive), str(marker)], start_new_session=True,
                              env={**os.environ, "PYTHONPATH": repo})
    try:
        for _ in range(1200):  # (two interpreters start: seconds on a loaded machine)
            if marker.exists() and marker.read_text():
                break
            time.sleep(0.025)
        else:
            pytest.fail("the child never started writing")
        child, parent = (int(pid) for pid in marker.read_text().split())
        time.sleep(0.5)  # (mid-append: a piece or two written)
        os.killpg(server.pid, signal.SIGTERM)
        assert server.wait(10) != 0
        for pid in (child, parent):  # (each ended: the child within its work, the helper once it had)
            for _ in range(1200):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.025)
            else:
                pytest.fail(f"{pid} outlived the server")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
    written = archive.read_bytes()
    assert written == before or (written.startswith(before) and written.endswith(b"9" * 200_000 + b"\n\n")), \
        written[len(before):len(before) + 200]
    assert not mbox.dotlock_path(archive).exists()


def _logs_a_line_then(module: str, name: str, *args, **kwargs):
    """(in call_as's child, sent pickled by name) a warning logged, then the real module.name(*args)"""
    logging.getLogger("mailflow.local").warning("a line of the child's")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


@pytest.mark.skipif(os.geteuid() != 0, reason="files are read by a child as the user only as root")
@pytest.mark.parametrize("read", ["forward", "include"])
async def test_as_root_the_lines_of_a_child_reading_a_forward_or_include_file_are_keyed_by_the_queue_id(
        tmp_path, public_dir, monkeypatch, caplog, read):
    """A .forward of a system user (nobody) and an :include: file a .forward names are read by call_as's children;
    the lines they logged came without the queue id."""
    if read == "forward":
        monkeypatch.setattr(aliasing, "read_forward", partial(_logs_a_line_then, aliasing.__name__, "read_forward"))
        (tmp_path / "mail" / "nobody").mkdir(parents=True)
        (tmp_path / "mail" / "nobody" / ".forward").write_text("carol@remote.test\n")
        rcpt = "nobody@example.test"
    else:
        monkeypatch.setattr(aliasing, "_file_or_nothing",
                            partial(_logs_a_line_then, aliasing.__name__, "_file_or_nothing"))
        (public_dir / "team").write_text("carol@remote.test\n")
        (tmp_path / "mail" / "bob").mkdir(parents=True)
        (tmp_path / "mail" / "bob" / ".forward").write_text(f":include:{public_dir / 'team'}\n")
        rcpt = "bob@example.test"
    t = transport(tmp_path, anyone_is_local=True)
    try:
        with caplog.at_level(logging.WARNING, "mailflow.local"):
            await asyncio.wait_for(t.deliver(request(rcpt)), 30)
    finally:
        await t.close()
    assert "Q1: a line of the child's" in caplog.messages, caplog.messages


@pytest.mark.skipif(os.geteuid() != 0, reason="a /file is written by a child as the user only as root")
async def test_as_root_the_warning_of_a_file_append_s_child_is_keyed_by_the_queue_id(tmp_path, public_dir, caplog):
    """A /file in a directory its writer (default_privs) may not write: local(8) appends without the dotlock and
    warns; the child's warning came without the queue id."""
    closed = public_dir / "closed"
    closed.mkdir(mode=0o755)
    archive = closed / "archive"
    archive.touch(mode=0o666)
    archive.chmod(0o666)
    t = transport(tmp_path, f"keep: {archive}\n")
    try:
        with caplog.at_level(logging.WARNING, "mailflow.local"):
            [result] = (await asyncio.wait_for(t.deliver(request("keep@example.test")), 30)).results
    finally:
        await t.close()
    assert result.outcome is Outcome.SENT, result
    assert f"Q1: unable to create lock file {archive}.lock: Permission denied" in caplog.messages, caplog.messages

"""The maildrop file format, sendmail's option and header handling, and the pickup stage in a real server."""
from __future__ import annotations

import dataclasses
import email
import io
import json
import os
import pwd
import socket
import stat
import threading
import time

import pytest

from mailflow import maildrop
from mailflow.config import config_from_dict
from mailflow.errors import TemporaryError
from mailflow.maildrop import (CorruptMaildrop, MaildropError, MaildropMessage, maildrop_content, maildrop_names,
                               read_maildrop, wake_pickup, write_maildrop)
from mailflow.message import LINE_LENGTH
from mailflow.sendmail import (LINE_PIECE, UsageError, header_recipients, may_submit, may_use_sender, parse_args,
                               read_message, split_input)
from mailflow.sendmail import identity
from mailflow.stages import pickup
from mailflow.syntax import is_utf8_text
from tests.support import big_message, eventually, maildir_messages, queue_becomes

MESSAGE = MaildropMessage(sender="alice@local.test", recipients=("bob@local.test",), uid=1000, user="alice",
                          fullname="Alice A", time=1.5, notify="SUCCESS,FAILURE", ret="HDRS", envid="e1",
                          body_type="7BIT")
CONTENT = b"Subject: x\r\n\r\nhi\r\n"


def drop(directory, message=MESSAGE, content=CONTENT, **kwargs) -> str:
    return write_maildrop(directory, message, [content], **kwargs)


# ---------------------------------------------------------------------------------------------- the file


def test_written_file_reads_back_equal_in_a_directory_others_may_write_but_not_list(tmp_path):
    """The directory is made 1733 (sticky, writable by all, listable by none: Postfix's maildrop/ is 1730 group
    postdrop) and the file 0644, whatever the writer's umask: pickup, the queue's owner, reads the files of others."""
    directory = tmp_path / "q" / "maildrop"
    old = os.umask(0o077)
    try:
        name = drop(directory)
    finally:
        os.umask(old)
    assert maildrop_names(directory) == [name]  # no temporary file left behind
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o1733
    assert stat.S_IMODE(os.stat(directory / name).st_mode) == 0o644
    back = read_maildrop(directory / name)
    assert back == dataclasses.replace(MESSAGE, size=len(CONTENT)) and back.owner_uid == os.getuid()
    assert maildrop_content(directory / name, back).to_bytes() == CONTENT


def test_roots_sendmail_makes_a_missing_maildrop_the_queue_owners(tmp_path):
    """Root's sendmail before the server's first start made it root's: the server (another user) could not list it,
    nor remove the files of others from it once sticky."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    queue = tmp_path / "q"
    queue.mkdir()
    os.chown(queue, 4242, 4343)
    drop(queue / "maildrop")
    st = os.stat(queue / "maildrop")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4242, 4343, 0o1733)


@pytest.mark.parametrize("swap", ["symlink", "directory"])
def test_a_maildrop_swapped_between_mkdir_and_chmod_is_refused_and_its_stand_in_left_alone(tmp_path, monkeypatch,
                                                                                         swap):
    """The queue's owner may write in the queue directory: it can rename the maildrop root's sendmail has just made
    and put a symbolic link to root's directories (or a directory of its own) in its place before the chown and
    chmod. Those go through the directory opened, so the stand-in keeps its owner and mode and nothing is written."""
    queue = tmp_path / "q"
    queue.mkdir()
    target = tmp_path / "roots"
    target.mkdir(mode=0o755)
    os.chmod(target, 0o755)
    real_mkdir = os.mkdir

    def mkdir_then_swap(path, mode=0o777):
        real_mkdir(path, mode)
        os.rename(path, tmp_path / "moved")
        if swap == "symlink":
            os.symlink(target, path)
        else:
            real_mkdir(path, 0o755)
            os.chmod(path, 0o755)

    monkeypatch.setattr(maildrop.os, "mkdir", mkdir_then_swap)
    with pytest.raises(MaildropError) as info:
        drop(queue / "maildrop")
    assert info.value.code == 73 and "replaced while it was made" in str(info.value)
    stand_in = target if swap == "symlink" else queue / "maildrop"
    assert stat.S_IMODE(os.stat(stand_in).st_mode) == 0o755 and os.listdir(stand_in) == []


def test_a_maildrop_made_under_a_setgid_queue_directory_is_made_1733(tmp_path):
    """A setgid queue directory passes its bit on to the new maildrop (mode 2700 after mkdir): that is still the
    directory just made, not a stand-in; it was refused, and root's sendmail stored mail in a directory left root's
    0700 (and pickup's start failed)."""
    queue = tmp_path / "q"
    queue.mkdir()
    os.chmod(queue, 0o2755)
    name = drop(queue / "maildrop")
    st = os.stat(queue / "maildrop")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.stat(queue).st_uid, 0o1733)
    assert read_maildrop(queue / "maildrop" / name).recipients == MESSAGE.recipients


def test_a_maildrop_made_on_a_filesystem_giving_directories_one_link_is_made_1733(tmp_path, monkeypatch):
    """btrfs (and ceph, many FUSE filesystems) report one link for a directory: the link count is no test of a
    directory just made."""
    real_fstat = os.fstat

    def fstat_one_link(fd):
        st = real_fstat(fd)
        return os.stat_result((*st[:3], 1, *st[4:10])) if stat.S_ISDIR(st.st_mode) else st

    monkeypatch.setattr(maildrop.os, "fstat", fstat_one_link)
    drop(tmp_path / "q" / "maildrop")
    assert stat.S_IMODE(os.stat(tmp_path / "q" / "maildrop").st_mode) == 0o1733


@pytest.mark.parametrize("owner, mode", [(0, 0o2700), (4242, 0o700)])
def test_roots_sendmail_refuses_a_maildrop_pickup_could_not_take_from(tmp_path, owner, mode):
    """A maildrop that is not the queue owner's (root's 2700, as a failed make left it), or, for another writer, not
    1733: refused (73, saying why) rather than storing mail the server would never see."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    queue = tmp_path / "q"
    (queue / "maildrop").mkdir(parents=True)
    os.chown(queue, 4242, 4343)
    os.chown(queue / "maildrop", owner, owner)
    os.chmod(queue / "maildrop", mode)
    with pytest.raises(MaildropError) as info:
        drop(queue / "maildrop")
    assert info.value.code == 73
    assert ("belongs to uid 0, not to the queue directory's owner" in str(info.value) if owner == 0
            else "has mode 0700, not 1733" in str(info.value))
    assert os.listdir(queue / "maildrop") == []
    os.chmod(queue / "maildrop", 0o1733)
    os.chown(queue / "maildrop", 4242, 4343)
    name = drop(queue / "maildrop")
    assert os.listdir(queue / "maildrop") == [name]


def test_a_message_into_an_existing_maildrop_looks_it_up_by_name_once(tmp_path, monkeypatch):
    """The directory is opened once by name and everything else goes through that descriptor: its owner and mode,
    its parent's owner, the directory fsynced (it was also stat()ed twice by name, its parent twice, and reopened
    by name for the fsync)."""
    directory = tmp_path / "q" / "maildrop"
    drop(directory)  # (made)
    named = []
    for name in ("stat", "lstat", "open", "mkdir"):
        def recording(path, *args, real=getattr(os, name), label=name, **kwargs):
            if kwargs.get("dir_fd") is None and str(path) in (str(directory), str(directory.parent)):
                named.append(label)
            return real(path, *args, **kwargs)
        monkeypatch.setattr(os, name, recording)
    drop(directory)
    assert named == ["mkdir", "open"]  # (the mkdir finds it there: nothing to make)
    assert len(maildrop_names(directory)) == 2


def test_per_recipient_dsn_reads_back_and_is_written_only_when_given(tmp_path):
    """-bs's RCPT NOTIFY and ORCPT, one per recipient, and an ENVID longer than -V takes (Postfix's smtpd takes
    any length): read back as written; a file without them has no such keys, as before."""
    message = dataclasses.replace(MESSAGE, recipients=("bob@local.test", "carol@local.test"), envid="e" * 150,
                                  rcpt_notify=("SUCCESS,DELAY", ""), rcpt_orcpt=("", "utf-8;\u00e9t\u00e9@x.test"))
    back = read_maildrop(tmp_path / drop(tmp_path, message))
    assert back == dataclasses.replace(message, size=len(CONTENT))
    assert back.recipient_notify() == ("SUCCESS,DELAY", "")
    assert dataclasses.replace(MESSAGE, recipients=("a@x", "b@x")).recipient_notify() == ("SUCCESS,FAILURE",) * 2
    plain = (tmp_path / drop(tmp_path)).read_bytes().split(b"\n", 1)[0]
    assert b"rcpt_notify" not in plain and b"rcpt_orcpt" not in plain


def test_a_full_name_not_utf8_is_text_for_an_older_pickup_and_its_bytes_for_this_one(tmp_path):
    """A Latin-1 GECOS name (`-F`, $NAME): every string of the envelope line stays UTF-8 text, the rule of every
    older pickup's reader (it set aside, and for another user's file removed, a file with a surrogate escape in
    `fullname`) and the one that reads it gets U+FFFD for the byte; this reader gets the byte back from
    `fullname_bytes`, which the older one ignores. A UTF-8 name has no such key, as before."""
    message = dataclasses.replace(MESSAGE, fullname="Jos\udce9 M\u00fcller")
    name = drop(tmp_path, message)
    line = (tmp_path / name).read_bytes().split(b"\n", 1)[0]
    header = json.loads(line)  # the older reader's rules: JSON, each string (alone or in a list) UTF-8 text
    strings = [s for v in header.values() for s in (v if isinstance(v, list) else [v]) if isinstance(s, str)]
    assert all(is_utf8_text(s) for s in strings)
    line.decode("utf-8")  # (strict)
    assert header["fullname"] == "Jos\ufffd M\u00fcller"
    assert read_maildrop(tmp_path / name).fullname == "Jos\udce9 M\u00fcller"
    assert b"fullname_bytes" not in (tmp_path / drop(tmp_path)).read_bytes().split(b"\n", 1)[0]
    # the short-lived writer's form (the byte in `fullname`, as JSON's escape) is still read
    (tmp_path / "F1").write_bytes(b'{"version": 1, "sender": "a@b", "recipients": ["c@d"], "uid": 1, "user": "a", '
                                  b'"size": 0, "fullname": "Jos\\udce9"}\n')
    assert read_maildrop(tmp_path / "F1").fullname == "Jos\udce9"


def test_content_is_streamed_in_and_its_body_type_found_at_the_end(tmp_path):
    chunks = [b"Subject: x\r\n\r\n", b"a" * 100_000, b"caf\xc3\xa9\r\n"]
    name = write_maildrop(tmp_path, dataclasses.replace(MESSAGE, body_type=""), iter(chunks))
    back = read_maildrop(tmp_path / name)
    assert (back.size, back.body_type) == (sum(map(len, chunks)), "8BITMIME")
    assert maildrop_content(tmp_path / name, back).to_bytes() == b"".join(chunks)
    name = write_maildrop(tmp_path, dataclasses.replace(MESSAGE, body_type=""), [b"ascii\r\n"])
    assert read_maildrop(tmp_path / name).body_type == ""  # (as Postfix's sendmail without -B: no BODY passed on)


def test_content_over_the_size_limit_is_refused_and_leaves_no_file(tmp_path):
    def endless():
        while True:
            yield b"x" * 65536

    with pytest.raises(MaildropError, match="too big") as info:
        write_maildrop(tmp_path, MESSAGE, endless(), size_limit=1_000_000)
    assert info.value.code == 65  # EX_DATAERR
    assert os.listdir(tmp_path) == []
    assert read_maildrop(tmp_path / drop(tmp_path, size_limit=len(CONTENT))).size == len(CONTENT)


def test_names_sort_in_submission_order(tmp_path):
    names = [drop(tmp_path) for _ in range(5)]
    assert maildrop_names(tmp_path) == names


@pytest.mark.parametrize("raw, reason", [
    (b"", "no envelope line"),
    (b'{"version": 1, "sender": "a@b"', "no envelope line"),
    (b"not json\nbody", "not JSON"),
    (b'{"version": 2}\n', "unknown version '2'$"),  # as JSON writes it: repr was applied twice ("'2'")
    (b'{"version": "1"}\n', "unknown version '\"1\"'$"),
    (b'{"version": 1, "sender": "a@b", "recipients": [], "uid": 1, "user": "a", "size": 0}\n', "recipients"),
    (b'{"version": 1, "sender": "a@b", "recipients": ["c@d"], "uid": "1", "user": "a", "size": 0}\n', "uid"),
    (b'{"version": 1, "sender": "a@b", "recipients": ["c\\r\\nX: y"], "uid": 1, "user": "a", "size": 0}\n',
     "control character"),
    (b'{"version": 1, "sender": "a@b", "recipients": ["c@d"], "uid": 1, "user": "a", "size": 0, '
     b'"envid": "x\\r\\nX-Injected: y"}\n', "envid"),
    (b'{"version": 1, "sender": "a@b", "recipients": ["c@d"], "uid": 1, "user": "a", "size": 0, '
     b'"notify": "SUCCESS,SOMETIMES"}\n', "notify"),
    (b'{"version": 1, "sender": "a@b", "recipients": ["c@d"], "uid": 1, "user": "a", "size": 0, "ret": "ALL"}\n',
     "ret"),
    (b'{"version": 1, "sender": "a@b", "recipients": ["c@d"], "uid": 1, "user": "a", "size": 0, '
     b'"rcpt_notify": ["SUCCESS", "NEVER"]}\n', "rcpt_notify"),  # one per recipient
    (b'{"version": 1, "sender": "a@b", "recipients": ["c@d"], "uid": 1, "user": "a", "size": 0, '
     b'"rcpt_notify": ["NEVER,SUCCESS"]}\n', "rcpt_notify"),
    (b'{"version": 1, "sender": "a@b", "recipients": ["c@d"], "uid": 1, "user": "a", "size": 0, '
     b'"rcpt_orcpt": ["c@d"]}\n', "rcpt_orcpt"),  # no type
    (b'{"version": 1, "sender": "a@b", "recipients": ["c@d"], "uid": 1, "user": "a", "size": 0, '
     b'"rcpt_orcpt": ["rfc822;"]}\n', "rcpt_orcpt"),  # no address (smtpd keeps none)
    (b'{"version": 1, "sender": "a@b", "recipients": ["c@d"], "uid": 1, "user": "a", "size": 0, '
     b'"rcpt_orcpt": "rfc822;c@d"}\n', "rcpt_orcpt"),
    (b'{"version": 1, "sender": "a@b", "recipients": ["c@d"], "uid": 1, "user": "a", "size": 0, '
     b'"body_type": "BINARYMIME"}\n', "body_type"),
    # JSON's escape of a lone surrogate: a file written by hand (pickup retried it at every scan, logging each)
    (b'{"version": 1, "sender": "a@b", "recipients": ["\\udce9@d"], "uid": 1, "user": "a", "size": 0}\n',
     "'recipients': not UTF-8"),
    (b'{"version": 1, "sender": "\\ud800@b", "recipients": ["c@d"], "uid": 1, "user": "a", "size": 0}\n',
     "'sender': not UTF-8"),
    (b'{"version": 1, "sender": "a@b", "recipients": ["c@d"], "uid": 1, "user": "a", "size": 0, '
     b'"fullname": "\\ud800"}\n', "'fullname': not UTF-8"),  # (a surrogate escape, `\\udce9`, is a byte: kept)
    (b'{"version": 1, "sender": "a@b", "recipients": ["c@d"], "uid": 1, "user": "a", "size": 0, '
     b'"fullname_bytes": "Jos\xc3\xa9"}\n', "fullname_bytes: not base64"),
    (b'{"version": 1, "sender": "a@b", "recipients": ["c@d"], "uid": 1, "user": "a", "size": 0, '
     b'"fullname_bytes": 1}\n', "fullname_bytes: must be"),
])
def test_malformed_files_are_corrupt(tmp_path, raw, reason):
    path = tmp_path / "F1"
    path.write_bytes(raw)
    with pytest.raises(CorruptMaildrop, match=reason):
        read_maildrop(path)


def test_a_long_key_or_version_is_echoed_cut_to_100_characters(tmp_path):
    """A local user's 16 MB JSON key (or version) was written whole into the corrupt reason, and so the log."""
    for field in (b'"%s": "\\udce9"' % (b"k" * 100_000), b'"version": "%s"' % (b"v" * 100_000)):
        path = tmp_path / "f"
        path.write_bytes(b'{"version": 1, ' + field + b', "sender": "a@b", "recipients": ["c@d"], "uid": 1, '
                         b'"user": "a", "size": 0}\n')
        with pytest.raises(CorruptMaildrop) as info:
            read_maildrop(path)
        assert 100 < len(str(info.value)) < 200, str(info.value)


def test_truncated_content_is_corrupt(tmp_path):
    name = drop(tmp_path)
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[:-3])
    with pytest.raises(CorruptMaildrop, match="truncated"):
        read_maildrop(tmp_path / name)


def test_forty_thousand_recipients_read_back_and_an_envelope_over_the_limit_is_refused(tmp_path, monkeypatch):
    """An envelope line longer than read_maildrop reads used to be written (sendmail exit 0), then set aside by
    pickup as corrupt: 40,000 recipients on a command line were silently lost."""
    many = dataclasses.replace(MESSAGE, recipients=tuple(f"user{i}@some-longer-domain.example.org"
                                                         for i in range(40_000)))
    name = drop(tmp_path, many)
    assert len(read_maildrop(tmp_path / name).recipients) == 40_000
    monkeypatch.setattr(maildrop, "HEADER_LIMIT", 100_000)
    with pytest.raises(MaildropError) as info:
        drop(tmp_path / "other", many)
    assert info.value.code == 64 and "too many recipients (40000)" in str(info.value)
    assert not (tmp_path / "other").exists()


def test_unwritable_maildrop_is_cantcreat(tmp_path):
    (tmp_path / "q").write_text("a file where the queue directory should be")
    with pytest.raises(MaildropError) as info:
        drop(tmp_path / "q" / "maildrop")
    assert info.value.code == 73


def test_waking_without_a_server_is_not_an_error(tmp_path):
    assert wake_pickup(tmp_path) is False


def test_the_wake_up_goes_only_to_a_socket_of_the_queue_owner_never_through_a_link(tmp_path):
    """The queue's owner may write in public/: a symbolic link there to another datagram socket root may write to
    is not followed (nor a socket of another user); pickup's scan finds the file."""
    public = tmp_path / "q" / "public"
    public.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as target, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as pickup_socket:
        target.bind(str(tmp_path / "elsewhere"))
        target.setblocking(False)
        os.symlink(tmp_path / "elsewhere", public / "pickup")
        assert wake_pickup(public.parent) is False
        with pytest.raises(BlockingIOError):
            target.recv(16)
        os.unlink(public / "pickup")
        pickup_socket.bind(str(public / "pickup"))
        assert wake_pickup(public.parent) is True and pickup_socket.recv(16) == b"W"
        if os.geteuid() == 0:
            os.chown(public / "pickup", 4242, 4242)
            assert wake_pickup(public.parent) is False


# ---------------------------------------------------------------------------------------------- options


def test_options_cluster_attach_and_separate():
    o = parse_args(["-ti", "-fbob@x.test", "-F", "Bob B", "-N", "success,Delay", "-v", "carol"])
    assert (o.extract, o.ignore_dots, o.sender, o.fullname, o.notify, o.verbose) == \
        (True, True, "bob@x.test", "Bob B", "SUCCESS,DELAY", 1)
    assert o.recipients == ["carol"]
    assert parse_args(["-r", "s@x"]).sender == "s@x"
    assert parse_args(["-oi"]).ignore_dots


def test_options_modes():
    assert [parse_args([a]).mode for a in ("-bs", "-bp", "-bv", "-bi", "-I", "-q", "-bm")] == \
        ["smtp", "mailq", "verify", "newaliases", "newaliases", "flush", "deliver"]
    assert parse_args(["-qRexample.org"]).flush_site == "example.org"
    assert parse_args(["-qI4F2A9C"]).flush_id == "4F2A9C"
    # as Postfix's sendmail: -bh, -bH and a queue runner's interval exit 0 at once, reading nothing
    assert [parse_args([a]).mode for a in ("-bh", "-bH", "-q30m")] == ["ignore"] * 3


def test_double_dash_ends_options():
    assert parse_args(["-t", "--", "-odd@x.test"]).recipients == ["-odd@x.test"]


def test_sendmail_only_options_are_ignored_with_a_note():
    o = parse_args(["-oem", "-odb", "-O", "DeliveryMode=b", "-L", "label", "-h", "5", "-U", "-A", "c", "-e", "x",
                    "a@b"])
    assert o.recipients == ["a@b"] and o.mode == "deliver"  # (-A and -e take a value, as in Postfix's getopt list)
    assert "-Ac ignored" in o.notes


def test_verp_is_ignored_with_a_warning():
    assert parse_args(["-XV", "a@b"]).warnings == ["-XV (VERP) is not supported -- ignored"]
    o = parse_args(["-V", "+=", "a@b"])  # Postfix takes a two-character -V value for VERP, not an envelope id
    assert o.envid == "" and o.warnings == ["-V+= (VERP) is not supported -- ignored"]


@pytest.mark.parametrize("argv, problem", [
    (["-f"], "requires an argument"), (["-bd"], "daemon"), (["-bz"], "unsupported: -bz"), (["-B", "binary"], "-B"),
    (["-Z", "a@b"], "invalid option -- 'Z'"), (["-n"], "-n option not supported"), (["-XQ"], "unsupported: -XQ"),
    (["-qS"], "-qS is not implemented"), (["-qR"], "specify: -qRsitename"), (["-qI"], "specify: -qIqueueid"),
    (["-t", "-bs"], "-t can be used only in delivery mode"), (["-bv", "-t"], "-t option cannot be used with -bv"),
    (["-bp", "a@b"], "display queue mode requires no recipient"), (["-qRx", "a@b"], "flush site requires no"),
])
def test_bad_options_are_usage_errors(argv, problem):
    with pytest.raises(UsageError, match=problem):
        parse_args(argv)


def test_notify_never_alone():
    assert parse_args(["-N", "never"]).notify == "NEVER"
    o = parse_args(["-N", "success", "-N", "never,success"])
    assert o.notify == "" and o.warnings == ["bad -N option value -- ignored"]


def test_bad_dsn_values_are_ignored_with_a_warning_as_postfix_does():
    o = parse_args(["-N", "sometimes", "-R", "most", "-V", "x" * 101, "a@b"])
    assert (o.notify, o.ret, o.envid) == ("", "", "")
    assert o.warnings == ["bad -N option value -- ignored", "bad -R option value -- ignored",
                          "too long -V option value -- ignored"]
    assert parse_args(["-V", "caf\u00e9"]).warnings == ["bad syntax in -V option value -- ignored"]
    assert parse_args(["-V", ""]).warnings == ["bad syntax in -V option value -- ignored"]  # Postfix 3.7's words too
    assert parse_args(["-V", "a b+c=d"]).envid == "a b+c=d"  # printable ASCII: written as xtext on the wire


# ---------------------------------------------------------------------------------------------- the message


def test_lone_dot_ends_input_unless_i():
    text = b"Subject: s\n\nline\n.\nafter\n"
    assert message(text, ignore_dots=False) == b"Subject: s\r\n\r\nline\r\n"
    assert message(text, ignore_dots=True) == b"Subject: s\r\n\r\nline\r\n.\r\nafter\r\n"


def test_a_lone_dot_as_the_last_line_without_its_line_end_ends_input_too():
    """Postfix's sendmail drops a final "." that has no line end (checked against a private Postfix 3.7); it
    used to stay in the body as a line of its own."""
    assert message(b"Subject: s\n\nbody\n.", ignore_dots=False) == b"Subject: s\r\n\r\nbody\r\n"
    assert message(b"Subject: s\n\nbody\n.", ignore_dots=True) == b"Subject: s\r\n\r\nbody\r\n.\r\n"
    assert message(b"Subject: s\n\nbody\n.x", ignore_dots=False) == b"Subject: s\r\n\r\nbody\r\n.x\r\n"


def message(text: bytes, ignore_dots: bool) -> bytes:
    return b"".join(read_message(io.BytesIO(text), ignore_dots))


def test_mbox_from_line_is_dropped_and_line_ends_become_crlf():
    assert message(b"From me Mon Jan 1\nA: b\r\n\nx", False) == b"A: b\r\n\r\nx\r\n"
    assert message(b"A: b\r\r\n\r\nbody\r", False) == b"A: b\r\n\r\nbody\r\n"


def test_every_leading_mbox_from_line_is_dropped_as_postfix_drops_them():
    """Postfix's sendmail skips the lines its input starts with while they start with `From ` after any `>`s; only
    the first `From ` line was dropped, the next taken for the first line of the body."""
    assert message(b"From me Mon Jan 1\n>From you\n>>From them\nA: b\n\nFrom body\n", False) == \
        b"A: b\r\n\r\nFrom body\r\n"
    assert message(b"A: b\nFrom me\n", False) == b"A: b\r\nFrom me\r\n"


def test_a_from_line_of_line_length_limit_bytes_or_more_is_kept_as_postfix_keeps_it():
    """Postfix's sendmail skips a From line only when it is one record (REC_TYPE_NORM: at most 2047 bytes before its
    LF, line_length_limit 2048), and stops skipping at a longer one: it is kept, and what follows it (mailflow
    dropped it, keeping the Subject after it as a header; checked against Postfix 3.7.11:
    tests/interop/test_cleanup_content_vs_postfix.py)."""
    for length in (LINE_LENGTH, 3000, LINE_PIECE + 10):
        line = b"From " + b"a" * (length - 5)
        assert message(line + b"\nFrom b\nSubject: s\n\nx\n", False) == \
            line + b"\r\nFrom b\r\nSubject: s\r\n\r\nx\r\n"
    line = b"From " + b"a" * (LINE_LENGTH - 6)  # 2047 bytes: one record, dropped
    assert message(line + b"\nSubject: s\n\nx\n", False) == b"Subject: s\r\n\r\nx\r\n"


def test_a_long_line_comes_in_pieces_with_its_line_end_whole():
    line = b"x" * (LINE_PIECE - 1) + b"\r"  # the CR is the last byte of the first piece
    pieces = list(read_message(io.BytesIO(b"A: b\n\n" + line + b"\nnext\n"), False))
    assert b"".join(pieces) == b"A: b\r\n\r\n" + line[:-1] + b"\r\nnext\r\n"
    assert max(map(len, pieces)) <= LINE_PIECE + 2


def test_only_the_header_section_is_kept_apart():
    lines = [b"A: 1\r\n", b"B: 2\r\n", b"\r\n", b"body\r\n"]
    head, rest = split_input(iter(lines), limit=1000)
    assert (head, list(rest)) == (b"A: 1\r\nB: 2\r\n", [b"\r\n", b"body\r\n"])
    head, rest = split_input(iter(lines), limit=3)  # too long a header section: cut, the rest goes on as it is
    assert (head, list(rest)) == (b"A: 1\r\n", lines[1:])


def test_header_recipients_and_bcc_removal():
    content = (b"To: A <a@x.test>, b@x.test\r\nCc: c@x.test\r\nBcc: hidden@x.test,\r\n\tother@x.test\r\n"
               b"Subject: s\r\n\r\nBcc: not a header\r\n")
    assert header_recipients(content) == ["a@x.test", "b@x.test", "c@x.test", "hidden@x.test", "other@x.test"]


def test_a_display_name_that_looks_like_an_address_is_no_recipient():
    """`To: a@x <b@y>` goes to b@y alone with Postfix's sendmail -t (checked against a private Postfix 3.7); the
    phrase was taken for a second recipient."""
    content = b"To: a@x.test <b@y.test>, \"c@x.test\" <d@y.test>\r\nCc: team: e@y.test (f@x.test);\r\n\r\n"
    assert header_recipients(content) == ["b@y.test", "d@y.test", "e@y.test"]


def test_resent_headers_take_precedence():
    content = b"Resent-To: r@x.test\r\nResent-Bcc: rb@x.test\r\nTo: orig@x.test\r\n\r\n"
    assert header_recipients(content) == ["r@x.test", "rb@x.test"]


def test_a_resent_field_postfix_does_not_know_does_not_make_a_resent_message():
    """Postfix's cleanup takes Resent-To/Cc/Bcc under -t only when the message has a Resent- field of its
    header_opts (HDR_OPT_RR): `Resent-Comment` is none, and the To was dropped for the Resent-To there is not
    (no recipient)."""
    content = b"Resent-Comment: c\r\nTo: orig@x.test\r\n\r\n"
    assert header_recipients(content) == ["orig@x.test"]


@pytest.mark.parametrize("resent", [b"Resent-From: r@x.test", b"Resent-Date: Fri, 04 Dec 2026 12:00:00 +0000",
                                    b"Resent-Message-ID: <m@x.test>", b"Resent-Reply-To: rr@x.test",
                                    b"Resent-Sender: s@x.test"])
def test_only_a_resent_recipient_field_switches_to_the_resent_recipients(resent):
    """Postfix's sendmail (output_header) takes the Resent- recipients only once it sees a Resent-To, -Cc or -Bcc:
    a message with another Resent- field of cleanup's list goes to its To (mailflow refused it, exit 64, no
    recipient addresses found)."""
    assert header_recipients(resent + b"\r\nTo: a@x.test\r\n\r\n") == ["a@x.test"]


# ---------------------------------------------------------------------------------------------- who may


@pytest.mark.parametrize("gecos, name", [
    ("Bob Smith,Room 4,555-1234", "Bob Smith"), ("& Smith;ext 12", "Bob Smith"), ("Backup %robot", "Backup"),
])
def test_the_gecos_full_name_is_read_as_postfix_reads_it(monkeypatch, gecos, name):
    """Postfix's fullname() (global/fullname.c): the GECOS field up to the first ',', ';' or '%', each '&' the
    login name capitalized. mailflow stopped only at ',' and left '&' as it was (`From: & Smith <bob@...>`)."""
    entry = pwd.struct_passwd(("bob", "x", 1000, 1000, gecos, "/home/bob", "/bin/sh"))
    monkeypatch.setattr(identity.pwd, "getpwuid", lambda uid: entry)
    assert identity.current_identity().gecos == name


def test_authorized_submit_users():
    assert may_submit("alice", ("static:anyone",))
    assert not may_submit("alice", ("!alice", "static:anyone"))
    assert may_submit("bob", ("!alice", "static:anyone"))
    assert may_submit("alice", ("alice",)) and not may_submit("bob", ("alice",))
    assert not may_submit("alice", ())


def test_local_login_sender_maps():
    config = config_from_dict({"myhostname": "h.test",
                               "sendmail": {"local_login_sender_maps": ["inline:{ {www = @web.test, <>, info} }"]}})
    assert may_use_sender("alice", "alice@h.test", config)  # one's own address, always
    assert not may_use_sender("alice", "bob@h.test", config)
    assert may_use_sender("www", "x@web.test", config)
    assert may_use_sender("www", "", config)
    assert may_use_sender("www", "info@h.test", config)
    assert not may_use_sender("www", "x@other.test", config)
    default = config_from_dict({})
    assert may_use_sender("root", "anyone@else.test", default)
    assert not may_use_sender("alice", "", default)


# ---------------------------------------------------------------------------------------------- pickup


def _drop(mf, content: bytes = b"Subject: picked\r\n\r\nbody\r\n", **changes) -> str:
    fields = {"sender": "alice@local.test", "recipients": ("bob@local.test",), "uid": os.getuid(), "user": "alice",
              "fullname": "Alice Liddell", **changes}
    return write_maildrop(mf.config.queue_path / "maildrop", MaildropMessage(**fields), [content])


async def test_pickup_delivers_a_dropped_file_on_wake_up_with_local_headers(mailflow_server, tmp_path):
    mf = await mailflow_server()
    name = _drop(mf)
    assert wake_pickup(mf.config.queue_path)
    maildir = tmp_path / "mail" / "bob" / "Maildir"
    await eventually(lambda: maildir_messages(maildir), timeout=5)
    text = maildir_messages(maildir)[0].decode()
    assert f"Received: by mx.mailflow.test (mailflow, from userid {os.getuid()})" in text
    assert "From: Alice Liddell <alice@local.test>" in text
    assert "Message-ID: <" in text and "Date: " in text
    assert not (mf.config.queue_path / "maildrop" / name).exists()


async def test_without_so_passcred_pickup_still_starts_and_is_woken(mailflow_server, tmp_path, monkeypatch, caplog):
    """Where socket.SO_PASSCRED does not exist (not Linux), start() raised AttributeError; where it was refused,
    the socket was closed and no wake-up came (mail waited for the periodic scan, a minute)."""
    monkeypatch.delattr(socket, "SO_PASSCRED", raising=False)
    mf = await mailflow_server()
    assert "no sender credentials" in caplog.text
    _drop(mf)
    assert wake_pickup(mf.config.queue_path, maildrop.REQUEUED)
    await eventually(lambda: maildir_messages(tmp_path / "mail" / "bob" / "Maildir"), timeout=5)


async def test_a_flood_of_wake_ups_is_read_a_bounded_number_at_a_time(mailflow_server):
    """The wake-up reader drained the socket to the end in one callback: local users sending datagrams as fast as
    they can (the socket refilled as it is read) held the event loop for as long as they kept up. It reads
    WAKE_READS at most per turn now. (A socket that is never empty stands for them: the kernel queues only a few
    datagrams, net.unix.max_dgram_qlen.)"""
    mf = await mailflow_server()
    reads = []

    class Flooded:
        def recvmsg(self, size: int, ancillary_size: int):
            reads.append(1)
            if len(reads) > 100 * pickup.WAKE_READS:
                raise BlockingIOError
            return b"W", [], 0, None

    mf.pickup._read_wake_ups(Flooded())
    assert len(reads) == pickup.WAKE_READS


async def test_a_submission_gets_its_header_addresses_qualified(mailflow_server, tmp_path):
    mf = await mailflow_server(myorigin="local.test")
    _drop(mf, b"From: alice\r\nTo: Bob <bob>, carol@x.test\r\nSubject: bob\r\n\r\nbob\r\n")
    assert wake_pickup(mf.config.queue_path)
    maildir = tmp_path / "mail" / "bob" / "Maildir"
    await eventually(lambda: maildir_messages(maildir), timeout=5)
    text = maildir_messages(maildir)[0].decode()
    assert "\nFrom: alice@local.test\n" in text and "\nTo: Bob <bob@local.test>, carol@x.test\n" in text
    assert "\nSubject: bob\n" in text and text.endswith("\n\nbob\n")


async def test_corrupt_file_is_set_aside_and_the_next_is_delivered(mailflow_server, tmp_path, caplog):
    mf = await mailflow_server()
    drop = mf.config.queue_path / "maildrop"
    (drop / "00000000000000BAD").write_bytes(b'{"version": 1}\n')  # sorts first
    _drop(mf)
    mf.pickup.wake()
    maildir = tmp_path / "mail" / "bob" / "Maildir"
    await eventually(lambda: maildir_messages(maildir), timeout=5)
    assert (mf.config.queue_path / "corrupt" / "00000000000000BAD").exists()
    assert maildrop_names(drop) == []
    assert any("00000000000000BAD: corrupt" in r.getMessage() for r in caplog.records)


async def test_a_fifo_or_a_deeply_nested_envelope_is_set_aside_and_does_not_stop_pickup(mailflow_server, tmp_path):
    """A FIFO in the maildrop used to block pickup's open (and the whole event loop) for good; JSON nested too
    deep raised RecursionError, which backed every scan off at that file: the mail behind it never left."""
    mf = await mailflow_server()
    drop = mf.config.queue_path / "maildrop"
    fifo = drop / "00000000000000FIFO"
    os.mkfifo(fifo)
    (drop / "00000000000000DEEP").write_bytes(b"[" * 200_000 + b"\n")
    _drop(mf)
    mf.pickup.wake()
    released = threading.Event()

    def release_a_blocked_reader() -> None:  # so that a regression fails here instead of hanging the test run
        time.sleep(2)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # succeeds only while a reader has it open
            released.set()
        except OSError:
            pass

    threading.Thread(target=release_a_blocked_reader, daemon=True).start()
    await eventually(lambda: maildir_messages(tmp_path / "mail" / "bob" / "Maildir"), timeout=5)
    assert sorted(os.listdir(mf.config.queue_path / "corrupt")) == ["00000000000000DEEP", "00000000000000FIFO"]
    assert maildrop_names(drop) == [] and not released.is_set()


def test_the_content_is_read_from_the_file_opened_never_by_its_name_again(tmp_path):
    """The writer owns its file and may swap it, after pickup's checks, for a symbolic link to a file only the
    server may read, of the same size: pickup read the content by name again, and so sent that file as mail."""
    directory = tmp_path / "maildrop"
    name = drop(directory)
    secret = tmp_path / "secret"
    secret.write_bytes(b"S" * os.stat(directory / name).st_size)
    with maildrop.open_maildrop(directory / name) as opened:
        os.replace(directory / name, tmp_path / "moved")
        (directory / name).symlink_to(secret)
        assert b"".join(opened.chunks()) == CONTENT and opened.unchanged()
    with pytest.raises(CorruptMaildrop, match="a symbolic link"):
        read_maildrop(directory / name)


async def test_pickup_queues_the_content_of_the_file_it_opened_though_its_name_now_links_elsewhere(
        mailflow_server, tmp_path, monkeypatch):
    """The writer swaps its file, once pickup has opened and checked it (here: as pickup asks for a spool), for a
    symbolic link to a file of the same size only the server may read: pickup read the content by name again
    (e706ed1a), and so queued that file as mail."""
    mf = await mailflow_server()
    content = b"Subject: picked\r\n\r\nthe writer's own\r\n"
    name = _drop(mf, content=content)
    path = mf.config.queue_path / "maildrop" / name
    secret = tmp_path / "secret"
    secret.write_bytes(b"Subject: secret\r\n\r\n" + b"S" * (path.stat().st_size - 21))
    cleanup = mf.pickup._cleanup
    new_spool = cleanup.new_spool

    def swapped_then_spool(*args, **kwargs):
        if path.exists() and not path.is_symlink():
            path.rename(tmp_path / "moved")
            path.symlink_to(secret)
        return new_spool(*args, **kwargs)

    monkeypatch.setattr(cleanup, "new_spool", swapped_then_spool)
    mf.pickup.wake()
    maildir = tmp_path / "mail" / "bob" / "Maildir"
    await eventually(lambda: maildir_messages(maildir), timeout=5)
    [message] = maildir_messages(maildir)
    assert b"the writer's own" in message and b"secret" not in message


def test_a_file_with_a_second_link_is_not_taken(tmp_path):
    """A hard link a user made to a file of another owner (where fs.protected_hardlinks allows one) would pass
    for that owner's."""
    directory = tmp_path / "maildrop"
    name = drop(directory)
    os.link(directory / name, tmp_path / "elsewhere")
    with pytest.raises(CorruptMaildrop, match="file has 2 links"):
        read_maildrop(directory / name)


def test_a_directory_in_the_maildrop_is_corrupt_and_holds_no_descriptor(tmp_path):
    (tmp_path / "00000000000000DIRX").mkdir()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(CorruptMaildrop, match="not a regular file"):
            read_maildrop(tmp_path / "00000000000000DIRX")
    assert len(os.listdir("/proc/self/fd")) == before


async def test_a_temporary_file_left_by_a_dead_sendmail_is_removed_after_a_day(mailflow_server):
    mf = await mailflow_server()
    drop = mf.config.queue_path / "maildrop"
    for name, age in ((".tmp.OLD", 2 * 86400), (".tmp.NEW", 3600)):
        (drop / name).write_bytes(b"      \nhalf a mess")
        os.utime(drop / name, (time.time() - age, time.time() - age))
    await mf.pickup.scan()
    assert sorted(os.listdir(drop)) == [".tmp.NEW"]


async def test_a_file_owned_by_another_user_than_it_claims_is_corrupt_and_removed(mailflow_server, caplog):
    """Another user's junk is removed, as Postfix's pickup removes a malformed file: kept in corrupt/, out of
    their reach, it filled the disk for good."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file another owner")
    mf = await mailflow_server()
    name = _drop(mf, uid=4242)
    os.chown(mf.config.queue_path / "maildrop" / name, 4343, -1)
    mf.pickup.wake()
    await eventually(lambda: any(f"{name}: corrupt" in r.getMessage() and "removed (uid 4343)" in r.getMessage()
                                 for r in caplog.records), timeout=5)
    assert not (mf.config.queue_path / "maildrop" / name).exists()
    assert os.listdir(mf.config.queue_path / "corrupt") == []


async def test_corrupt_files_of_the_same_name_are_all_kept_in_corrupt(mailflow_server):
    """A second corrupt file of a name corrupt/ already holds replaced the first (the evidence lost)."""
    mf = await mailflow_server()
    drop, corrupt = mf.config.queue_path / "maildrop", mf.config.queue_path / "corrupt"
    for content in (b"first\n", b"second\n"):
        (drop / "00000000000000BAD").write_bytes(content)
        await mf.pickup.scan()
    assert sorted(os.listdir(corrupt)) == ["00000000000000BAD", "00000000000000BAD.1"]
    assert (corrupt / "00000000000000BAD").read_bytes() == b"first\n"


async def test_a_looping_message_is_returned_to_its_sender(mailflow_server, tmp_path):
    mf = await mailflow_server(hopcount_limit=2)
    loop = b"Received: a\r\nReceived: b\r\nReceived: c\r\nSubject: loop\r\n\r\nx\r\n"
    name = _drop(mf, sender="alice@local.test", recipients=("bob@local.test",), content=loop)
    mf.pickup.wake()
    notice_box = tmp_path / "mail" / "alice" / "Maildir"
    await eventually(lambda: maildir_messages(notice_box), timeout=5)
    notice = maildir_messages(notice_box)[0]
    # cleanup's code, as Postfix
    assert b"5.4.0" in notice and b"Subject: Undelivered Mail Returned to Sender" in notice
    assert not (mf.config.queue_path / "maildrop" / name).exists()
    assert maildir_messages(tmp_path / "mail" / "bob" / "Maildir") == []


LOOP = b"Received: a\r\nReceived: b\r\nReceived: c\r\nSubject: loop\r\n\r\nthe loop's body\r\n"
TEMPLATE = """failure_template = <<EOF
From: Returns <returns>
Subject: Your local mail came back

This is $myhostname: your mail could not be taken.
EOF
"""


def _header(message: bytes, name: str) -> str:
    return email.message_from_bytes(message)[name]


async def test_a_refused_file_is_returned_in_the_words_of_bounce_template_file_after_a_reload(
        mailflow_server, tmp_path):
    """pickup's notice is bounce(8)'s: the failure template's From (qualified), Subject and text, as a reload
    sets them."""
    path = tmp_path / "bounce.cf"
    path.write_text(TEMPLATE)
    os.chmod(tmp_path, 0o755)
    os.chmod(path, 0o644)
    mf = await mailflow_server(hopcount_limit=2)
    settings = mf.config.model_dump()
    settings["queue"]["bounce_template_file"] = str(path)
    await mf.reload(config_from_dict(settings))
    _drop(mf, content=LOOP)
    mf.pickup.wake()
    alice = tmp_path / "mail" / "alice" / "Maildir"
    await eventually(lambda: maildir_messages(alice), timeout=5)
    [notice] = maildir_messages(alice)
    assert _header(notice, "From") == "Returns <returns@mx.mailflow.test>"
    assert _header(notice, "Subject") == "Your local mail came back"
    assert b"This is mx.mailflow.test: your mail could not be taken." in notice and b"5.4.0" in notice


async def test_notify_classes_bounce_gives_the_postmaster_a_headers_only_copy_of_a_refused_files_notice(
        mailflow_server, tmp_path, caplog):
    caplog.set_level("INFO", logger="mailflow")
    mf = await mailflow_server(hopcount_limit=2, queue={"notify_classes": ["bounce"],
                                                        "bounce_notice_recipient": "bob@local.test"})
    name = _drop(mf, content=LOOP)
    mf.pickup.wake()
    alice, bob = (tmp_path / "mail" / user / "Maildir" for user in ("alice", "bob"))
    await eventually(lambda: maildir_messages(alice) and maildir_messages(bob), timeout=5)
    [notice], [copy] = maildir_messages(alice), maildir_messages(bob)
    assert b"the loop's body" in notice  # the sender's: the whole original
    assert _header(copy, "Subject") == "Postmaster Copy: Undelivered Mail"
    assert b"Subject: loop" in copy and b"the loop's body" not in copy  # the postmaster's: its header section
    assert b"Return-Path: <double-bounce@mx.mailflow.test>" in copy
    assert _header(copy, "Message-ID") != _header(notice, "Message-ID")  # (a mailbox may keep one of two alike)
    assert f"maildrop/{name}: postmaster non-delivery notification" in caplog.text


async def test_a_refused_file_of_the_null_sender_goes_whole_to_the_double_bounce_recipient(mailflow_server, tmp_path):
    """A refused notice cannot be returned: with the class 2bounce (the default's) the postmaster gets it, whole."""
    mf = await mailflow_server(hopcount_limit=2, queue={"double_bounce_recipient": "bob@local.test"})
    _drop(mf, sender="", content=LOOP)
    mf.pickup.wake()
    bob = tmp_path / "mail" / "bob" / "Maildir"
    await eventually(lambda: maildir_messages(bob), timeout=5)
    [copy] = maildir_messages(bob)
    assert _header(copy, "Subject") == "Postmaster Copy: Undelivered Mail"
    assert b"the loop's body" in copy and b"5.4.0" in copy
    await queue_becomes(mf.store, {})
    assert maildir_messages(tmp_path / "mail" / "alice" / "Maildir") == []


async def test_a_postmaster_copy_that_cannot_be_queued_neither_keeps_the_file_nor_repeats_the_senders_notice(
        mailflow_server, tmp_path, caplog, monkeypatch):
    """Postfix's bounce_notify_service: the postmaster's copy is not critical, a warning and on. Keeping the file
    for it queued the sender's notice again at every scan."""
    mf = await mailflow_server(hopcount_limit=2, queue={"notify_classes": ["bounce"],
                                                        "bounce_notice_recipient": "pm@local.test"})
    cleanup = mf.pickup._cleanup
    submit = cleanup.submit

    async def refusing_the_postmaster(submission, **kwargs):
        if submission.envelope.recipients == ("pm@local.test",):
            raise TemporaryError("4.3.0", "queue file write error")
        return await submit(submission, **kwargs)

    monkeypatch.setattr(cleanup, "submit", refusing_the_postmaster)
    name = _drop(mf, content=LOOP)
    mf.pickup.wake()
    await eventually(lambda: not (mf.config.queue_path / "maildrop" / name).exists(), timeout=5,
                     what="the refused file removed")
    mf.pickup.wake()  # (a scan after it finds nothing more to return)
    alice = tmp_path / "mail" / "alice" / "Maildir"
    await eventually(lambda: maildir_messages(alice), timeout=5)
    await queue_becomes(mf.store, {})
    assert len(maildir_messages(alice)) == 1
    assert f"maildrop/{name}: the postmaster copy of the non-delivery notification" in caplog.text


async def test_a_refused_file_whose_content_cannot_be_read_is_returned_without_quote_not_retried(
        mailflow_server, tmp_path, caplog, monkeypatch):
    """Reading the content to drop message_drop_headers from the quote fails (EIO, a vanished file): the notice
    goes without a quote. The error escaping the fallback left the file to be tried again at every scan."""
    mf = await mailflow_server(hopcount_limit=2)

    def unreadable(content):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(mf.pickup._cleanup, "without_dropped_fields", unreadable)
    name = _drop(mf, content=LOOP)
    mf.pickup.wake()
    alice = tmp_path / "mail" / "alice" / "Maildir"
    await eventually(lambda: maildir_messages(alice), timeout=5)
    [notice] = maildir_messages(alice)
    assert b"5.4.0" in notice and b"the loop's body" not in notice and b"Subject: loop" not in notice
    assert f"maildrop/{name}: cannot read the message to quote it" in caplog.text
    assert not (mf.config.queue_path / "maildrop" / name).exists()


async def test_content_a_check_refused_goes_back_as_its_header_section_only(mailflow_server, tmp_path):
    """Postfix's cleanup_bounce: a message its checks refused (or too big) is returned without its body, whatever
    RET says, so that sendmail -f someone-else cannot have refused content delivered to a third party."""
    checks = tmp_path / "header_checks"
    checks.write_text("/^Subject: forbidden/ REJECT not here\n")
    mf = await mailflow_server(checks={"header_checks": [f"regexp:{checks}"]})
    _drop(mf, content=b"Subject: forbidden\r\n\nthe refused body\r\n", ret="FULL")
    mf.pickup.wake()
    alice = tmp_path / "mail" / "alice" / "Maildir"
    await eventually(lambda: maildir_messages(alice), timeout=5)
    [notice] = maildir_messages(alice)
    assert b"Subject: forbidden" in notice and b"the refused body" not in notice
    assert b"text/rfc822-headers" in notice


async def test_without_the_classes_a_refused_file_gets_no_postmaster_notice(mailflow_server, tmp_path, caplog):
    postmaster = {"double_bounce_recipient": "bob@local.test", "bounce_notice_recipient": "bob@local.test"}
    mf = await mailflow_server(hopcount_limit=2, queue={"notify_classes": [], **postmaster})
    _drop(mf, content=LOOP)
    null = _drop(mf, sender="", content=LOOP)
    mf.pickup.wake()
    alice = tmp_path / "mail" / "alice" / "Maildir"
    await eventually(lambda: maildir_messages(alice), timeout=5)
    await eventually(lambda: f"maildrop/{null}: null sender or NOTIFY=NEVER: dropped" in caplog.text, timeout=5)
    await queue_becomes(mf.store, {})
    assert len(maildir_messages(alice)) == 1 and maildir_messages(tmp_path / "mail" / "bob" / "Maildir") == []


async def test_a_file_over_the_size_limit_is_returned_unread_and_a_big_one_under_it_is_delivered(
        mailflow_server, tmp_path):
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "message_size_limit": 700_000})
    too_big = _drop(mf, content=b"Subject: too big\r\n\r\n" + b"x" * 78 * 10_000 + b"\r\n")
    data = big_message(size=600_000)
    _drop(mf, content=data, recipients=("carol@relay.test",))  # deferred (no DNS): stays queued to be looked at
    mf.pickup.wake()
    notice_box = tmp_path / "mail" / "alice" / "Maildir"
    await eventually(lambda: maildir_messages(notice_box), timeout=5)
    [notice] = maildir_messages(notice_box)
    assert b"5.3.4" in notice and b"message file too big" in notice
    assert b"Subject: too big" in notice and b"x" * 78 not in notice  # its header section only
    assert not (mf.config.queue_path / "maildrop" / too_big).exists()
    await eventually(lambda: not maildrop_names(mf.config.queue_path / "maildrop"), timeout=5)
    [row] = await mf.store.message_page(queues=("incoming", "active", "deferred"),
                                        sender="alice@local.test")  # not the notice, maybe still there
    content = await mf.store.content(row.queue_id)
    assert not content.in_memory and content.to_bytes().endswith(data.split(b"\r\n\r\n", 1)[1])


async def test_per_recipient_notify_and_orcpt_travel_with_the_message(mailflow_server, tmp_path):
    """What -bs's RCPT commands gave reaches the queue per recipient: bob's success notice goes to the sender
    (alice), naming bob's ORCPT as its Original-Recipient; alice, the other recipient, asked for none."""
    mf = await mailflow_server()
    _drop(mf, recipients=("bob@local.test", "alice@local.test"), envid="B" * 120,
          rcpt_notify=("SUCCESS", "NEVER"), rcpt_orcpt=("rfc822;first@x.test", ""))
    mf.pickup.wake()
    alice = tmp_path / "mail" / "alice" / "Maildir"
    await eventually(lambda: len(maildir_messages(alice)) == 2, timeout=5)  # the message and bob's notice
    [notice] = [m for m in maildir_messages(alice) if b"Action: delivered" in m]
    assert b"Final-Recipient: rfc822; bob@local.test\nOriginal-Recipient: rfc822;first@x.test\n" in notice
    assert b"rfc822;alice@local.test" not in notice and b"Original-Envelope-Id: " + b"B" * 120 in notice
    await queue_becomes(mf.store, {})  # and no other notice


async def test_notify_and_envid_travel_with_the_message(mailflow_server, tmp_path):
    mf = await mailflow_server()
    _drop(mf, notify="SUCCESS", envid="ENV-77", ret="HDRS")
    mf.pickup.wake()
    alice = tmp_path / "mail" / "alice" / "Maildir"
    await eventually(lambda: maildir_messages(alice), timeout=5)  # the success notice NOTIFY asked for
    notice = maildir_messages(alice)[0]
    assert b"Original-Envelope-Id: ENV-77" in notice and b"Action: delivered" in notice
    assert maildir_messages(tmp_path / "mail" / "bob" / "Maildir")

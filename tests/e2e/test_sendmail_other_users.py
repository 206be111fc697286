"""`mailflow sendmail` run by a user other than the queue's owner (www-data's PHP mail(), a user's cron job), and
that user writing the maildrop directly, bypassing sendmail's checks: the maildrop (1733) lets them create files,
pickup holds each file to what its owner (the kernel's word) may do.

The server is the in-process `mailflow_server` fixture (root: the tests need root to run a process as another
user); the other user is `nobody` (uid 65534), its processes real children started by setpriv. The queue is in a
directory of /tmp others may traverse, as a queue directory must be for local users (docs/operations.md).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import pwd
import shutil
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailflow.content import Spool
from mailflow.sendmail import identity
from mailflow.stages import pickup
from mailflow.maildrop import REQUEUED, MaildropMessage, maildrop_names, wake_pickup, write_maildrop
from tests.support import eventually, maildir_messages, rcpt_reply
from tests.support.tools import require_tool

NOBODY = 65534
ORIGIN = "mx.mailflow.test"  # myorigin: base_settings' myhostname


@dataclass(frozen=True)
class OtherUser:
    login: str
    queue: Path  # the queue directory (0755, as an installation's), in a directory others may traverse
    config: Path  # where the tests write the configuration sendmail reads (readable by all)

    def settings(self, **overrides) -> dict:
        return {"queue_directory": str(self.queue), **overrides}


@pytest.fixture
def other_user():
    """Root is needed to run as nobody: skip otherwise (fail under MAILFLOW_REQUIRE_TOOLS=1). The queue and the
    configuration are in a directory of /tmp others may traverse (not list): tmp_path's parents are 0700, and
    every pytest session makes /tmp/pytest-of-root 0700 again."""
    if os.geteuid() != 0:
        if os.environ.get("MAILFLOW_REQUIRE_TOOLS") == "1":
            pytest.fail("running a process as another user needs root")
        pytest.skip("running a process as another user needs root")
    top = Path(tempfile.mkdtemp(prefix="mailflow-other-user-"))
    try:
        os.chmod(top, 0o711)
        (top / "queue").mkdir()
        os.chmod(top / "queue", 0o755)
        yield OtherUser(pwd.getpwuid(NOBODY).pw_name, top / "queue", top / "mailflow.toml")
    finally:
        shutil.rmtree(top)


# Lets nobody read (and search) what root can, never write: the interpreter, the checkout and its venv may sit in
# directories only root may enter (pyenv under /root, a CI checkout in a 0700 temporary directory). What nobody
# writes, owns and sends is still nobody's; a test of what nobody may read runs without it (read_all=False).
READ_ALL = ("--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search")


async def as_nobody(*argv: str, stdin: bytes = b"", read_all: bool = True) -> tuple[int, str, str]:
    """`argv` run as nobody (setpriv: real and effective ids, no supplementary groups; READ_ALL unless `read_all`
    is false): exit code, stdout, stderr."""
    setpriv = require_tool("setpriv")
    ids = (f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *(READ_ALL if read_all else ()))
    proc = await asyncio.create_subprocess_exec(setpriv, *ids, *argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/",
                                                env={**os.environ, "HOME": "/"})
    out, err = await asyncio.wait_for(proc.communicate(stdin), 20)
    return proc.returncode, out.decode(), err.decode()


async def sendmail(config: Path, *args: str, stdin: bytes) -> tuple[int, str]:
    rc, _, err = await as_nobody(sys.executable, "-m", "mailflow", "sendmail", "-C", str(config), *args, stdin=stdin)
    return rc, err


# What sendmail loads, loaded by root before it becomes nobody (`sendmail_without_capabilities`); the encodings a
# message file and the terminal need too.
SENDMAIL_MODULES = ("mailflow.cli", "mailflow.config", "mailflow.config.load", "mailflow.logs", "mailflow.cli.common",
                    "mailflow.sendmail.stdio_smtp", "encodings.idna", "encodings.ascii", "encodings.latin_1")


async def sendmail_without_capabilities(config: Path, *args: str, stdin: bytes) -> tuple[int, str, str]:
    """`mailflow sendmail` as nobody with no capability at all (READ_ALL hides what nobody may not search): the
    interpreter may be where nobody may not read (pyenv under /root), so root's process loads sendmail's modules
    first and then becomes nobody (setresuid from root to another user clears every capability)."""
    code = (f"import os, sys\nfor name in {SENDMAIL_MODULES!r}: __import__(name)\n"
            f"os.setgroups([])\nos.setresgid(*[{NOBODY}] * 3)\nos.setresuid(*[{NOBODY}] * 3)\n"
            f"sys.argv = ['mailflow', 'sendmail', '-C', {str(config)!r}, *{args!r}]\n"
            "from mailflow.cli import main\nmain()\n")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd="/",
                                                env={**os.environ, "HOME": "/"})
    out, err = await asyncio.wait_for(proc.communicate(stdin), 20)
    return proc.returncode, out.decode(), err.decode()


async def write_directly(mf, **envelope) -> str:
    """A maildrop file written by nobody without sendmail (its checks skipped), and pickup woken: its name."""
    queue = mf.config.queue_path
    message = MaildropMessage(**{"sender": f"nobody@{ORIGIN}", "recipients": ("alice@local.test",), "uid": NOBODY,
                                 "user": "nobody", **envelope})
    content = b"Subject: direct\r\n\r\nx\r\n"
    code = (f"from mailflow.maildrop import *\nimport pathlib\nm = {message!r}\n"
            f"print(write_maildrop(pathlib.Path({str(queue / 'maildrop')!r}), m, [{content!r}]))")
    rc, out, err = await as_nobody(sys.executable, "-c", code)
    assert rc == 0, err
    mf.pickup.wake()
    return out.strip()


def inbox(tmp_path: Path, user: str) -> list[bytes]:
    return maildir_messages(tmp_path / "mail" / user / "Maildir")


def logged(caplog, *words: str) -> bool:
    return any(all(w in r.getMessage() for w in words) for r in caplog.records)


async def test_another_user_submits_and_is_delivered_at_once_named_by_its_uid(mailflow_server, write_config,
                                                                              other_user, tmp_path, caplog):
    """As with Postfix's setgid postdrop: delivered, logged `uid=65534` once (pickup logged a second line of its
    own), Received naming that uid; the wake-up reaches pickup (well before its periodic scan, a minute)."""
    caplog.set_level(logging.INFO)
    hourly = other_user.settings(sendmail={"pickup_interval": 3600})  # only the wake-up can deliver within the wait
    await mailflow_server(**hourly)
    config = write_config(other_user.config, **hourly)
    rc, err = await sendmail(config, "-t", stdin=b"To: alice@local.test\nSubject: from nobody\n\nhi\n")
    assert rc == 0 and err == "", err
    await eventually(lambda: inbox(tmp_path, "alice"), what="delivered on the wake-up")
    [message] = inbox(tmp_path, "alice")
    assert f"(mailflow, from userid {NOBODY})".encode() in message
    login = other_user.login
    assert f"From: {login} <{login}@{ORIGIN}>".encode() in message  # (its GECOS field is its name)
    assert len([r for r in caplog.records if r.levelno >= logging.INFO
                and f"uid={NOBODY} from=<{other_user.login}@{ORIGIN}>" in r.getMessage()]) == 1
    drop = other_user.queue / "maildrop"
    assert stat.S_IMODE(os.stat(drop).st_mode) == 0o1733 and maildrop_names(drop) == []


async def test_a_server_started_under_umask_077_is_still_woken_by_other_users(mailflow_server, write_config,
                                                                              other_user, tmp_path):
    """The wake-up socket's directory, public/, was made 0700 then: sendmail's wake-up failed silently and the mail
    waited for pickup's periodic scan (a minute)."""
    old = os.umask(0o077)
    try:
        await mailflow_server(**other_user.settings())
    finally:
        os.umask(old)
    config = write_config(other_user.config, **other_user.settings())
    rc, err = await sendmail(config, "alice@local.test", stdin=b"Subject: s\n\nx\n")
    assert rc == 0 and err == "", err
    await eventually(lambda: inbox(tmp_path, "alice"), timeout=5)
    assert stat.S_IMODE(os.stat(other_user.queue / "maildrop").st_mode) == 0o1733


async def test_a_private_maildrop_of_an_older_mailflow_is_opened_to_local_users_at_start(
        mailflow_server, write_config, other_user, tmp_path, caplog):
    config = write_config(other_user.config, **other_user.settings())
    drop = other_user.queue / "maildrop"
    drop.mkdir(mode=0o700)  # as mailflow made it before other users could submit
    rc, err = await sendmail(config, "alice@local.test", stdin=b"Subject: later\n\nwaiting\n")
    assert rc == 73 and "has mode 0700, not 1733 (the server makes it so at its start)" in err  # not theirs to write
    await mailflow_server(**other_user.settings())
    assert stat.S_IMODE(os.stat(drop).st_mode) == 0o1733
    assert logged(caplog, str(drop), "mode 0700 changed to 1733")
    rc, err = await sendmail(config, "alice@local.test", stdin=b"Subject: now\n\nwaiting\n")
    assert rc == 0, err
    await eventually(lambda: inbox(tmp_path, "alice"), timeout=5)


@pytest.mark.parametrize("mode", [0o700, 0o730, 0o1730], ids=oct)
async def test_a_maildrop_nobody_may_not_search_is_refused_with_73_and_said_why(write_config, other_user, mode):
    """A maildrop of the wrong mode (an older mailflow's 0700, Postfix's 1730): sendmail exits 73 saying so, -bs
    replies 451 to DATA, for a user with no capability (it was an uncaught PermissionError: a traceback, exit 1,
    and -bs ended without a reply)."""
    config = write_config(other_user.config, **other_user.settings())
    drop = other_user.queue / "maildrop"
    drop.mkdir()
    os.chmod(drop, mode)
    rc, _, err = await sendmail_without_capabilities(config, "alice@local.test", stdin=b"Subject: x\n\nx\n")
    assert rc == 73 and f"has mode {mode:04o}, not 1733 (the server makes it so at its start)" in err, err
    session = (f"HELO x\r\nMAIL FROM:<nobody@{ORIGIN}>\r\nRCPT TO:<alice@local.test>\r\nDATA\r\n"
               "Subject: x\r\n\r\nx\r\n.\r\nQUIT\r\n").encode()
    rc, out, err = await sendmail_without_capabilities(config, "-bs", stdin=session)
    assert rc == 0 and "Traceback" not in err, err
    assert out.splitlines()[-2:] == ["451 4.3.0 Error: queue file write error", "221 2.0.0 Bye"], out
    assert os.listdir(drop) == []


async def test_a_user_with_no_capability_leaves_mail_in_a_1733_maildrop(write_config, other_user):
    config = write_config(other_user.config, **other_user.settings())
    (other_user.queue / "maildrop").mkdir()
    os.chmod(other_user.queue / "maildrop", 0o1733)  # as the server makes it
    rc, _, err = await sendmail_without_capabilities(config, "alice@local.test", stdin=b"Subject: x\n\nx\n")
    assert rc == 0 and "no mailflow server is running" in err, err
    assert [os.stat(other_user.queue / "maildrop" / name).st_uid
            for name in maildrop_names(other_user.queue / "maildrop")] == [NOBODY]


async def test_a_file_left_while_the_server_is_down_is_delivered_at_its_start(mailflow_server, write_config,
                                                                              other_user, tmp_path):
    mf = await mailflow_server(**other_user.settings())
    await mf.stop()
    config = write_config(other_user.config, **other_user.settings())
    rc, err = await sendmail(config, "alice@local.test", stdin=b"Subject: later\n\nwaiting\n")
    assert rc == 0 and "no mailflow server is running" in err
    assert len(maildrop_names(other_user.queue / "maildrop")) == 1
    await mailflow_server(**other_user.settings())
    await eventually(lambda: inbox(tmp_path, "alice"), timeout=5)


async def test_a_user_not_authorized_is_refused_by_sendmail_and_its_own_file_dropped_by_pickup(
        mailflow_server, write_config, other_user, tmp_path, caplog):
    settings = other_user.settings(sendmail={"authorized_submit_users": ["root"]})
    mf = await mailflow_server(**settings)
    config = write_config(other_user.config, **settings)
    rc, err = await sendmail(config, "alice@local.test", stdin=b"Subject: no\n\nno\n")
    assert rc == 77 and "not allowed to submit mail (authorized_submit_users)" in err
    name = await write_directly(mf)
    await eventually(lambda: logged(caplog, f"maildrop/{name}: uid={NOBODY}", "refused", "authorized_submit_users"),
                     timeout=5)
    assert not (other_user.queue / "maildrop" / name).exists()
    assert not (other_user.queue / "corrupt" / name).exists()
    await asyncio.sleep(0.5)
    assert inbox(tmp_path, "alice") == [] and inbox(tmp_path, "bob") == []  # not delivered, nor bounced


async def test_a_forged_sender_is_refused_by_sendmail_and_its_direct_file_dropped_by_pickup(
        mailflow_server, write_config, other_user, tmp_path, caplog):
    mf = await mailflow_server(**other_user.settings())
    config = write_config(other_user.config, **other_user.settings())
    rc, err = await sendmail(config, "-f", "bob@local.test", "alice@local.test", stdin=b"Subject: forged\n\nx\n")
    assert rc == 77 and "local_login_sender_maps" in err
    name = await write_directly(mf, sender="bob@local.test")
    await eventually(lambda: logged(caplog, f"maildrop/{name}: uid={NOBODY} from=<bob@local.test>", "refused",
                                    "local_login_sender_maps"), timeout=5)
    assert not (other_user.queue / "maildrop" / name).exists()
    await asyncio.sleep(0.5)
    assert inbox(tmp_path, "alice") == [] and inbox(tmp_path, "bob") == []  # not delivered, no notice to bob
    # its own address it may use, even written by hand
    await write_directly(mf, user="root", fullname="Root Himself")
    await eventually(lambda: inbox(tmp_path, "alice"), timeout=5)
    [message] = inbox(tmp_path, "alice")
    assert f"from userid {NOBODY}".encode() in message


async def test_authorized_submit_users_checks_the_owners_login_never_the_user_the_file_claims(
        mailflow_server, other_user, tmp_path, caplog):
    """A file of nobody claiming `"user": "root"` is held to nobody's rights (passwd's login for its owner's
    uid): root alone may submit here; had pickup taken the login from the file, it would pass."""
    mf = await mailflow_server(**other_user.settings(sendmail={"authorized_submit_users": ["root"]}))
    name = await write_directly(mf, user="root")
    await eventually(lambda: logged(caplog, f"maildrop/{name}: uid={NOBODY}", "refused: user nobody",
                                    "authorized_submit_users"), timeout=5)
    assert not (other_user.queue / "maildrop" / name).exists()
    await asyncio.sleep(0.3)
    assert inbox(tmp_path, "alice") == []


async def test_local_login_sender_maps_checks_the_owners_login_never_the_user_the_file_claims(
        mailflow_server, other_user, tmp_path, caplog):
    """Root may send as anyone here; nobody's file claiming to be root's may not send as bob."""
    mf = await mailflow_server(**other_user.settings(sendmail={"local_login_sender_maps": ["inline:{root=*}"]}))
    name = await write_directly(mf, user="root", sender="bob@local.test")
    await eventually(lambda: logged(caplog, f"maildrop/{name}: uid={NOBODY} from=<bob@local.test>",
                                    "refused: user nobody", "local_login_sender_maps"), timeout=5)
    assert not (other_user.queue / "maildrop" / name).exists()
    await asyncio.sleep(0.3)
    assert inbox(tmp_path, "alice") == [] and inbox(tmp_path, "bob") == []


async def test_a_file_claiming_another_uid_is_never_mail(mailflow_server, write_config, other_user, tmp_path, caplog):
    mf = await mailflow_server(**other_user.settings())
    name = await write_directly(mf, uid=0, user="root", sender="root@local.test")
    await eventually(lambda: logged(caplog, name, f"owner uid {NOBODY} differs from the submitting uid 0",
                                    f"removed (uid {NOBODY})"), timeout=5)
    assert not (other_user.queue / "maildrop" / name).exists() and os.listdir(other_user.queue / "corrupt") == []
    await asyncio.sleep(0.3)
    assert inbox(tmp_path, "alice") == []


async def test_a_spool_the_queue_may_not_write_keeps_another_users_mail_until_it_can(mailflow_server, other_user,
                                                                                      tmp_path, caplog, monkeypatch):
    """The queue's own spool failing with EACCES (its directory's permissions) was taken for the user's file being
    unreadable: a well-formed file sendmail had accepted was removed as "corrupt". Postfix's pickup keeps a file
    its cleanup could not write; so does mailflow now, and takes it once the spool works again."""
    mf = await mailflow_server(**other_user.settings())
    cleanup = mf.pickup._cleanup
    new_spool = cleanup.new_spool

    def unwritable_spool(max_size=None):
        spool = Spool(other_user.queue, max_size=max_size, memory_limit=0)  # (a file at once)

        def denied() -> None:
            raise PermissionError(errno.EACCES, "Permission denied", str(other_user.queue / "content"))
        spool._open = denied
        return spool

    monkeypatch.setattr(cleanup, "new_spool", unwritable_spool)
    name = await write_directly(mf)
    await eventually(lambda: logged(caplog, "Permission denied"), timeout=5)
    await asyncio.sleep(0.3)
    assert maildrop_names(other_user.queue / "maildrop") == [name] and not logged(caplog, "corrupt")
    monkeypatch.setattr(cleanup, "new_spool", new_spool)
    await eventually(lambda: inbox(tmp_path, "alice"), timeout=15)  # (at the end of the scans' backoff)
    assert maildrop_names(other_user.queue / "maildrop") == []


async def test_a_passwd_database_that_cannot_answer_keeps_another_users_mail_for_a_retry(
        mailflow_server, other_user, tmp_path, caplog, monkeypatch):
    """NSS down (LDAP, SSSD): pwd.getpwuid raises the KeyError of a uid without an entry; the owner was named
    `uid65534`, refused by local_login_sender_maps and the file removed, though sendmail had accepted it under its
    login a moment before. It stays for the next scan now (the rule for a table that cannot answer), for a day
    after it was written (its mtime: a direct write's envelope may give no time)."""
    mf = await mailflow_server(**other_user.settings())
    getpwuid = pwd.getpwuid

    def nss_down(uid: int):
        if uid == NOBODY:
            raise KeyError(f"getpwuid(): uid not found: {uid}")
        return getpwuid(uid)

    monkeypatch.setattr(identity.pwd, "getpwuid", nss_down)
    await write_directly(mf)  # (its envelope without a time: the file's mtime tells its age)
    await eventually(lambda: logged(caplog, f"no passwd entry for uid {NOBODY}", "they stay for a retry"), timeout=5)
    await asyncio.sleep(0.3)
    assert len(maildrop_names(other_user.queue / "maildrop")) == 1 and not logged(caplog, "refused")
    monkeypatch.setattr(identity.pwd, "getpwuid", getpwuid)
    mf.pickup.wake()
    await eventually(lambda: inbox(tmp_path, "alice"), timeout=5)


async def test_checks_that_cannot_answer_are_logged_once_however_many_files_and_scans(mailflow_server, other_user,
                                                                                       caplog):
    """A table that could not answer made a line per file of another user per scan, and any user may leave any
    number of files and send wake-ups (a scan every WAKE_GAP): an unbounded flood. Now one line (then a count once
    a minute); the files stay for the scans after."""
    mf = await mailflow_server(**other_user.settings(sendmail={"authorized_submit_users": ["fail:down"]}))
    names = [await write_directly(mf) for _ in range(4)]
    for _ in range(5):
        await mf.pickup.scan()
    lines = [r.getMessage() for r in caplog.records if "fail: table" in r.getMessage()]
    assert len(lines) == 1, lines
    assert maildrop_names(other_user.queue / "maildrop") == sorted(names) and not logged(caplog, "refused")


async def test_an_unexpected_error_checking_another_users_file_keeps_it_and_the_scan_goes_on(
        mailflow_server, other_user, tmp_path, caplog, monkeypatch):
    """Anything but the expected refusals (a bug, a table raising what it should not) ended the whole scan: the
    same file came first again at each scan, and root's files after it were never reached."""
    mf = await mailflow_server(**other_user.settings())

    def broken(*args):
        raise ValueError("a bug in a table")

    monkeypatch.setattr(pickup, "submit_problem", broken)
    foreign = await write_directly(mf)
    await eventually(lambda: logged(caplog, "a bug in a table"), timeout=5)
    roots = MaildropMessage(sender="root@local.test", recipients=("alice@local.test",), uid=0, user="root")
    write_maildrop(other_user.queue / "maildrop", roots, [b"Subject: r\r\n\r\nx\r\n"])  # (a later name)
    mf.pickup.wake()
    await eventually(lambda: inbox(tmp_path, "alice"), timeout=5)
    assert maildrop_names(other_user.queue / "maildrop") == [foreign]


async def test_links_and_fifos_planted_by_a_user_are_never_read_and_do_not_stop_pickup(
        mailflow_server, write_config, other_user, tmp_path, caplog):
    """A symbolic link to a root-only file in maildrop format (root's own mail, say), a hard link to it (where
    the kernel allows one: root makes it here, as fs.protected_hardlinks=0 would let any user) and a FIFO: none is
    read as mail; nobody's link and FIFO are removed, root's hard link is kept in corrupt/ for inspection, and
    nobody's own mail behind them is delivered."""
    mf = await mailflow_server(**other_user.settings())
    secret_dir = tmp_path / "root-only"
    secret_dir.mkdir(mode=0o711)
    secret = secret_dir / write_maildrop(secret_dir, MaildropMessage(
        sender="root@local.test", recipients=("bob@local.test",), uid=0, user="root"), [b"Subject: secret\r\n\r\n"])
    os.chmod(secret, 0o600)
    drop = other_user.queue / "maildrop"
    code = (f"import os\nos.symlink({str(secret)!r}, {str(drop / '00000000000000LINK')!r})\n"
            f"os.mkfifo({str(drop / '00000000000000FIFO')!r})\n")
    assert (await as_nobody(sys.executable, "-c", code))[0] == 0
    os.link(secret, drop / "00000000000000HARD")
    await write_directly(mf)
    await eventually(lambda: inbox(tmp_path, "alice"), timeout=5)
    await eventually(lambda: maildrop_names(drop) == [], timeout=5)
    assert os.listdir(other_user.queue / "corrupt") == ["00000000000000HARD"]
    assert logged(caplog, "00000000000000LINK", "a symbolic link") and logged(caplog, "HARD", "file has 2 links")
    assert inbox(tmp_path, "bob") == [] and secret.exists()
    assert maildrop_names(drop) == []


async def test_the_queue_database_stays_private_in_a_directory_local_users_traverse(mailflow_server, other_user,
                                                                                    tmp_path):
    """The queue directory is traversable by all (else they cannot reach the maildrop), so its files of known names
    must not be readable: queue.db holds the small messages themselves. It was 0644 under a umask of 022."""
    queue = other_user.queue
    (queue / "queue.db").write_bytes(b"")
    os.chmod(queue / "queue.db", 0o644)  # an older server's, made under umask 022
    await mailflow_server(**other_user.settings())
    rc, _, err = await as_nobody(require_tool("cat"), str(queue / "queue.db"), read_all=False)
    assert rc == 1 and "Permission denied" in err
    assert [name for name in os.listdir(queue) if name.startswith("queue.db")
            and stat.S_IMODE(os.stat(queue / name).st_mode) & 0o077] == []


async def test_another_users_junk_is_removed_or_logged_once_however_often_pickup_is_woken(
        mailflow_server, other_user, tmp_path, caplog):
    """A directory (that pickup can neither take nor remove) made an error line at every scan, and any user's
    wake-ups made that a flood; a junk file went to corrupt/ for good, out of its owner's reach. Now: the file is
    removed (as Postfix's pickup removes a malformed one), an empty directory too (it stayed for good, one more
    entry each scan passed by), one that is not empty logged once and left alone."""
    mf = await mailflow_server(**other_user.settings())
    drop = other_user.queue / "maildrop"
    code = (f"import os\nos.mkdir({str(drop / '0000000000000ZDIR')!r})\n"
            f"os.mkdir({str(drop / '0000000000000ZEMPTY')!r})\n"
            f"open({str(drop / '0000000000000ZDIR' / 'x')!r}, 'w').close()\n"
            f"open({str(drop / '0000000000000ZJUNK')!r}, 'w').write('junk')\n")
    assert (await as_nobody(sys.executable, "-c", code))[0] == 0
    for scan in range(5):
        mf.pickup._periodic = scan in (2, 3)  # (periodic scans try what stays again, silently)
        await mf.pickup.scan()
        mf.pickup.wake()
        await asyncio.sleep(0.05)
    await write_directly(mf)
    await eventually(lambda: inbox(tmp_path, "alice"), timeout=5)
    lines = [r.getMessage() for r in caplog.records if "0000000000000Z" in r.getMessage()]
    assert len(lines) == 3, lines
    assert logged(caplog, "maildrop/0000000000000ZJUNK: corrupt", f"removed (uid {NOBODY})")
    assert logged(caplog, "maildrop/0000000000000ZEMPTY: corrupt", f"removed (an empty directory of uid {NOBODY})")
    assert logged(caplog, "maildrop/0000000000000ZDIR: corrupt", "left in place")
    assert maildrop_names(drop) == ["0000000000000ZDIR"] and os.listdir(other_user.queue / "corrupt") == []


async def test_a_scan_past_many_entries_lets_the_other_tasks_run(mailflow_server, other_user, monkeypatch):
    """A user's directories (not empty: they stay, passed by at each wake-up scan) held the event loop, SMTP
    sessions and all, for the whole pass (0.33 s at 200,000 of them, every WAKE_GAP under a wake-up stream). The
    scan now lets the other tasks run every SCAN_TURN entries."""
    mf = await mailflow_server(**other_user.settings())
    drop = other_user.queue / "maildrop"
    code = (f"import os\nfor i in range(3 * {pickup.SCAN_TURN}):\n"
            f"    os.mkdir(f'{drop}/0000000000{{i:05d}}D')\n    open(f'{drop}/0000000000{{i:05d}}D/x', 'w').close()\n")
    assert (await as_nobody(sys.executable, "-c", code))[0] == 0
    await mf.pickup.scan()  # (each logged once, kept aside from the wake-up scans)
    turns = [0]
    listed = []

    class Kept(set):
        def intersection_update(self, *others) -> None:  # (on the loop, once the listing is done)
            listed.append(turns[0])
            super().intersection_update(*others)

    async def ticker():
        while True:
            turns[0] += 1
            await asyncio.sleep(0)

    monkeypatch.setattr(mf.pickup, "_kept", Kept())
    task = asyncio.create_task(ticker())
    await mf.pickup.scan()
    task.cancel()
    assert turns[0] - listed[0] >= 2, (turns, listed)  # 3 at SCAN_TURN


async def test_no_file_in_the_queue_directory_is_readable_by_local_users_but_the_public_ones(mailflow_server,
                                                                                             other_user):
    """Under umask 022: greylist.db (who mails whom) and its -wal and -shm were 0644, in the directory every local
    user traverses; only the maildrop, public/ (and its socket) and the pid file are for them."""
    old = os.umask(0o022)
    try:
        mf = await mailflow_server(**other_user.settings(smtpd={"recipient_restrictions": ["check_greylist"]},
                                                         greylist={"delay": "1h"}))
        assert (await rcpt_reply(mf.smtp_addresses[0][1], "alice@local.test")).code == 450  # greylist.db in use
    finally:
        os.umask(old)
    queue = other_user.queue
    public = {"maildrop", "public", "mailflow.pid"}
    assert (queue / "greylist.db").exists() and (queue / "greylist.db-wal").exists()
    readable = [name for name in os.listdir(queue) if name not in public
                and stat.S_IMODE(os.lstat(queue / name).st_mode) & 0o044]
    assert readable == []


async def test_a_symlinked_maildrop_or_public_directory_is_never_followed(mailflow_server, other_user, tmp_path,
                                                                          caplog):
    """Whoever can write the queue directory could point maildrop/ at a directory of root's mail (it was scanned:
    each file taken, or moved to corrupt/) and public/ at a private directory (made 0755, its `pickup` replaced by
    the socket). Each is refused, logged once."""
    victim, private = tmp_path / "victim", tmp_path / "private"
    victim.mkdir(mode=0o700)
    private.mkdir(mode=0o700)
    kept = write_maildrop(victim, MaildropMessage(sender="root@local.test", recipients=("alice@local.test",), uid=0,
                                                  user="root"), [b"Subject: root's\r\n\r\nx\r\n"])
    (victim / "0000000000000ZJUNK").write_bytes(b"junk\n")
    (private / "pickup").write_bytes(b"private")
    (other_user.queue / "maildrop").symlink_to(victim)
    (other_user.queue / "public").symlink_to(private)
    mf = await mailflow_server(**other_user.settings())
    for _ in range(3):
        await mf.pickup.scan()
    await asyncio.sleep(0.3)
    assert sorted(os.listdir(victim)) == sorted([kept, "0000000000000ZJUNK"]) and inbox(tmp_path, "alice") == []
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700 and (private / "pickup").read_bytes() == b"private"
    refusals = [r.getMessage() for r in caplog.records if "is not a directory (a symbolic link" in r.getMessage()]
    assert len(refusals) == 2 and any("/maildrop" in m for m in refusals) and any("/public" in m for m in refusals)


async def test_a_stream_of_wake_ups_from_any_user_costs_a_bounded_number_of_scans(mailflow_server, other_user,
                                                                                    monkeypatch):
    """Any user may write to public/pickup: a datagram loop kept pickup rescanning (about 87 % of a CPU), and made
    a log flood of any per-scan line. Wake-up scans are WAKE_GAP (0.1 s) apart at least."""
    mf = await mailflow_server(**other_user.settings())
    scans = []
    scan = mf.pickup.scan

    async def counted() -> int:
        scans.append(time.monotonic())
        return await scan()

    monkeypatch.setattr(mf.pickup, "scan", counted)
    code = ("import socket, time\ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\nend = time.monotonic() + 1\n"
            "while time.monotonic() < end:\n"
            f"    try: s.sendto(b'W', {str(other_user.queue / 'public' / 'pickup')!r})\n"
            "    except BlockingIOError: pass\n")
    rc, _, err = await as_nobody(sys.executable, "-c", code)
    assert rc == 0, err
    assert 3 <= len(scans) <= 13, len(scans)  # woken all along; ~10 at 0.1 s apart (thousands without the gap)


async def test_a_requeued_wake_up_counts_only_from_root_or_the_server(mailflow_server, other_user, monkeypatch):
    """"R" ("look at the store's requeued mail too") made every scan query the store, whoever sent it; only root
    and the server's user can requeue mail. Another user's "R" is a plain wake-up (SO_PASSCRED names them)."""
    mf = await mailflow_server(**other_user.settings())
    await eventually(lambda: not mf.pickup._store_due, timeout=5)  # (the start's scan queried the store)
    await asyncio.sleep(0.1)
    queries = []
    store = mf.pickup._store
    requeued_messages = store.requeued_messages

    async def counted(**kwargs):
        queries.append(kwargs)
        return await requeued_messages(**kwargs)

    monkeypatch.setattr(store, "requeued_messages", counted)
    scans = []
    scan = mf.pickup.scan

    async def counted_scan() -> int:
        scans.append(1)
        return await scan()

    monkeypatch.setattr(mf.pickup, "scan", counted_scan)
    code = ("import socket, time\ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\nfor _ in range(3):\n"
            f"    s.sendto(b'R', {str(other_user.queue / 'public' / 'pickup')!r}); time.sleep(0.15)\n")
    rc, _, err = await as_nobody(sys.executable, "-c", code)
    assert rc == 0, err
    await eventually(lambda: len(scans) >= 2, timeout=5)  # woken all the same
    await asyncio.sleep(0.2)
    assert queries == []
    assert wake_pickup(other_user.queue, REQUEUED)  # root's (the queue tools')
    await eventually(lambda: queries, timeout=5)

"""`mailflow sendmail` run by a user other than the queue's owner (www-data's PHP mail(), a user's cron job), and
that user writing the maildrop directly, bypassing sendmail's checks: the maildrop (1733) lets them create files,
pickup holds each file to what its owner (the kernel's word) may do.

The server is the in-process `mailflow_server` fixture (root: the tests need root to run a process as another
user); the other user is `nobody` (uid 65534), its processes real children made with setuid. The test directory
and its parents are opened for traversal (o+x) for the test's length, as a queue directory must be for local users.
"""
from __future__ import annotations

import asyncio
import logging
import os
import pwd
import stat
import sys
import time
from pathlib import Path

import pytest

from mailflow.maildrop import MaildropMessage, maildrop_names, write_maildrop
from tests.support import eventually, maildir_messages
from tests.support.tools import require_tool

NOBODY = 65534
ORIGIN = "mx.mailflow.test"  # myorigin: base_settings' myhostname


@pytest.fixture
def other_user(tmp_path):
    """Root is needed to run as nobody: skip otherwise (fail under MAILFLOW_REQUIRE_TOOLS=1). The directories from
    tmp_path up are made traversable (not listable) by others, and put back."""
    if os.geteuid() != 0:
        if os.environ.get("MAILFLOW_REQUIRE_TOOLS") == "1":
            pytest.fail("running a process as another user needs root")
        pytest.skip("running a process as another user needs root")
    login = pwd.getpwuid(NOBODY).pw_name
    opened = []
    for directory in (tmp_path, *tmp_path.parents):
        mode = stat.S_IMODE(os.stat(directory).st_mode)
        if not mode & 0o001:
            os.chmod(directory, mode | 0o001)
            opened.append((directory, mode))
    (tmp_path / "queue").mkdir(mode=0o755)
    os.chmod(tmp_path / "queue", 0o755)
    yield login
    for directory, mode in opened:
        os.chmod(directory, mode)


async def as_nobody(*argv: str, stdin: bytes = b"") -> tuple[int, str, str]:
    """`argv` run as nobody (setpriv: real and effective ids, no supplementary groups): exit code, stdout, stderr."""
    setpriv = require_tool("setpriv")
    proc = await asyncio.create_subprocess_exec(setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, cwd="/",
                                                env={**os.environ, "HOME": "/"})
    out, err = await asyncio.wait_for(proc.communicate(stdin), 20)
    return proc.returncode, out.decode(), err.decode()


async def sendmail(config: Path, *args: str, stdin: bytes) -> tuple[int, str]:
    rc, _, err = await as_nobody(sys.executable, "-m", "mailflow", "sendmail", "-C", str(config), *args, stdin=stdin)
    return rc, err


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
    """As with Postfix's setgid postdrop: delivered, logged `uid=65534`, Received naming that uid; the wake-up
    reaches pickup (well before its periodic scan, a minute)."""
    caplog.set_level(logging.INFO, "mailflow.pickup")
    await mailflow_server()
    config = write_config(tmp_path / "mailflow.toml")
    started = time.monotonic()
    rc, err = await sendmail(config, "-t", stdin=b"To: alice@local.test\nSubject: from nobody\n\nhi\n")
    assert rc == 0 and err == "", err
    await eventually(lambda: inbox(tmp_path, "alice"), timeout=5)
    assert time.monotonic() - started < 5
    [message] = inbox(tmp_path, "alice")
    assert f"(mailflow, from userid {NOBODY})".encode() in message
    assert f"From: {other_user} <{other_user}@{ORIGIN}>".encode() in message  # (its GECOS field is its name)
    assert logged(caplog, f"uid={NOBODY} from=<{other_user}@{ORIGIN}>")
    drop = tmp_path / "queue" / "maildrop"
    assert stat.S_IMODE(os.stat(drop).st_mode) == 0o1733 and maildrop_names(drop) == []


async def test_a_server_started_under_umask_077_is_still_woken_by_other_users(mailflow_server, write_config,
                                                                              other_user, tmp_path):
    """The wake-up socket's directory, public/, was made 0700 then: sendmail's wake-up failed silently and the mail
    waited for pickup's periodic scan (a minute)."""
    old = os.umask(0o077)
    try:
        await mailflow_server()
    finally:
        os.umask(old)
    rc, err = await sendmail(write_config(tmp_path / "mailflow.toml"), "alice@local.test", stdin=b"Subject: s\n\nx\n")
    assert rc == 0 and err == "", err
    await eventually(lambda: inbox(tmp_path, "alice"), timeout=5)
    assert stat.S_IMODE(os.stat(tmp_path / "queue" / "maildrop").st_mode) == 0o1733


async def test_a_private_maildrop_of_an_older_mailflow_is_opened_to_local_users_at_start(
        mailflow_server, write_config, other_user, tmp_path, caplog):
    config = write_config(tmp_path / "mailflow.toml")
    drop = tmp_path / "queue" / "maildrop"
    drop.mkdir(mode=0o700)  # as mailflow made it before other users could submit
    rc, err = await sendmail(config, "alice@local.test", stdin=b"Subject: later\n\nwaiting\n")
    assert rc == 73 and "cannot create a file" in err  # not theirs to write
    await mailflow_server()
    assert stat.S_IMODE(os.stat(drop).st_mode) == 0o1733
    assert logged(caplog, str(drop), "mode 0700 changed to 1733")
    rc, err = await sendmail(config, "alice@local.test", stdin=b"Subject: now\n\nwaiting\n")
    assert rc == 0, err
    await eventually(lambda: inbox(tmp_path, "alice"), timeout=5)


async def test_a_file_left_while_the_server_is_down_is_delivered_at_its_start(mailflow_server, write_config,
                                                                              other_user, tmp_path):
    mf = await mailflow_server()
    await mf.stop()
    config = write_config(tmp_path / "mailflow.toml")
    rc, err = await sendmail(config, "alice@local.test", stdin=b"Subject: later\n\nwaiting\n")
    assert rc == 0 and "no mailflow server is running" in err
    assert len(maildrop_names(tmp_path / "queue" / "maildrop")) == 1
    await mailflow_server()
    await eventually(lambda: inbox(tmp_path, "alice"), timeout=5)


async def test_a_user_not_authorized_is_refused_by_sendmail_and_its_own_file_dropped_by_pickup(
        mailflow_server, write_config, other_user, tmp_path, caplog):
    settings = {"sendmail": {"authorized_submit_users": ["root"]}}
    mf = await mailflow_server(**settings)
    config = write_config(tmp_path / "mailflow.toml", **settings)
    rc, err = await sendmail(config, "alice@local.test", stdin=b"Subject: no\n\nno\n")
    assert rc == 77 and "not allowed to submit mail (authorized_submit_users)" in err
    name = await write_directly(mf)
    await eventually(lambda: logged(caplog, f"maildrop/{name}: uid={NOBODY}", "refused", "authorized_submit_users"),
                     timeout=5)
    assert not (tmp_path / "queue" / "maildrop" / name).exists()
    assert not (tmp_path / "queue" / "corrupt" / name).exists()
    await asyncio.sleep(0.5)
    assert inbox(tmp_path, "alice") == [] and inbox(tmp_path, "bob") == []  # not delivered, nor bounced


async def test_a_forged_sender_is_refused_by_sendmail_and_its_direct_file_dropped_by_pickup(
        mailflow_server, write_config, other_user, tmp_path, caplog):
    mf = await mailflow_server()
    config = write_config(tmp_path / "mailflow.toml")
    rc, err = await sendmail(config, "-f", "bob@local.test", "alice@local.test", stdin=b"Subject: forged\n\nx\n")
    assert rc == 77 and "local_login_sender_maps" in err
    name = await write_directly(mf, sender="bob@local.test")
    await eventually(lambda: logged(caplog, f"maildrop/{name}: uid={NOBODY} from=<bob@local.test>", "refused",
                                    "local_login_sender_maps"), timeout=5)
    assert not (tmp_path / "queue" / "maildrop" / name).exists()
    await asyncio.sleep(0.5)
    assert inbox(tmp_path, "alice") == [] and inbox(tmp_path, "bob") == []  # not delivered, no notice to bob
    # its own address it may use, even written by hand
    await write_directly(mf, user="root", fullname="Root Himself")
    await eventually(lambda: inbox(tmp_path, "alice"), timeout=5)
    [message] = inbox(tmp_path, "alice")
    assert f"from userid {NOBODY}".encode() in message


async def test_a_file_claiming_another_uid_is_never_mail(mailflow_server, write_config, other_user, tmp_path, caplog):
    mf = await mailflow_server()
    name = await write_directly(mf, uid=0, user="root", sender="root@local.test")
    await eventually(lambda: (tmp_path / "queue" / "corrupt" / name).exists(), timeout=5)
    assert logged(caplog, name, f"owner uid {NOBODY} differs from the submitting uid 0")
    await asyncio.sleep(0.3)
    assert inbox(tmp_path, "alice") == []


async def test_links_and_fifos_planted_by_a_user_are_never_read_and_do_not_stop_pickup(
        mailflow_server, write_config, other_user, tmp_path, caplog):
    """A symbolic link to a root-only file in maildrop format (root's own mail, say), a hard link to it (where
    the kernel allows one: root makes it here, as fs.protected_hardlinks=0 would let any user) and a FIFO: none is
    read as mail; each is set aside, and nobody's own mail behind them is delivered."""
    mf = await mailflow_server()
    secret_dir = tmp_path / "root-only"
    secret_dir.mkdir(mode=0o711)
    secret = secret_dir / write_maildrop(secret_dir, MaildropMessage(
        sender="root@local.test", recipients=("bob@local.test",), uid=0, user="root"), [b"Subject: secret\r\n\r\n"])
    os.chmod(secret, 0o600)
    drop = tmp_path / "queue" / "maildrop"
    code = (f"import os\nos.symlink({str(secret)!r}, {str(drop / '00000000000000LINK')!r})\n"
            f"os.mkfifo({str(drop / '00000000000000FIFO')!r})\n")
    assert (await as_nobody(sys.executable, "-c", code))[0] == 0
    os.link(secret, drop / "00000000000000HARD")
    await write_directly(mf)
    await eventually(lambda: inbox(tmp_path, "alice"), timeout=5)
    await eventually(lambda: len(os.listdir(tmp_path / "queue" / "corrupt")) == 3, timeout=5)
    assert sorted(os.listdir(tmp_path / "queue" / "corrupt")) == ["00000000000000FIFO", "00000000000000HARD",
                                                                  "00000000000000LINK"]
    assert logged(caplog, "00000000000000LINK", "a symbolic link") and logged(caplog, "HARD", "file has 2 links")
    assert inbox(tmp_path, "bob") == [] and secret.exists()
    assert maildrop_names(drop) == []

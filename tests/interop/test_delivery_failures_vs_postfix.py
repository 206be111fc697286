"""Differential test of local(8)'s failure texts: appends that fail, through a private Postfix 3.7 and mailflow
configured alike (local domain origin.test, the spool folder's mbox mailboxes, mailbox_size_limit and
message_size_limit 5000, aliases to /file destinations written as `nobody`).

Compared, for each recipient, the dsn, status and text of its first local result in the mail log (a bounce notice's
Diagnostic-Code is made from the same text, tests/interop/test_notices_vs_postfix.py): a mailbox and a /file past
the file size limit (EFBIG: "error writing message: File too large", 5.2.2), an executable file (5.7.1), a symbolic
link and a directory (5.2.0), a dotlock held past the wait (4.2.0; 2 s in both), a file that exists in a directory its
writer may not write (the dotlock cannot be made: written without it, as local(8)'s MBOX_DOT_LOCK_MAY_FAIL). A file
that cannot be created in such a directory is told in Postfix's words, but deferred 4.2.0 where Postfix bounces
5.2.0 (an OS error the administrator can fix, docs/transports.md): its text is compared, its status asserted apart.
Masked: the spool's folder. And virtual(8)'s: a Maildir that cannot be made (a file stands in its place), "maildir
delivery failed: create maildir file …" (masked: the base and the file's unique name).
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from mailflow.app import Mailflow
from mailflow.config import config_from_dict
from mailflow.transports.local import mbox
from tests.interop.test_local_vs_postfix import NOBODY, first_results
from tests.support import SmtpClient, base_settings, eventually, merged, postfix_instance
from tests.support.maillog import mail_log_file

pytestmark = pytest.mark.interop

LIMIT = 5000
COMMON = {"myhostname": "mx.origin.test", "myorigin": "origin.test"}
# the failures' destinations (folders made by `prepared_spool`), by the alias naming them
DESTINATIONS = {"mbox": "nobody", "big": "{spool}/files/big", "exe": "{spool}/files/exe",
                "link": "{spool}/files/link", "folder": "{spool}/files", "held": "{spool}/closed/held",
                "create": "{spool}/closed/new", "busy": "{spool}/files/busy"}
BOUNCED = ("mbox", "big", "exe", "link", "folder")
BODY = "Subject: {name}\r\nMessage-ID: <{name}@client.test>\r\nFrom: s@sender.test\r\n\r\nbody\r\n"


@dataclass
class Run:
    results: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # alias: (dsn, status, text), masked
    held: str = ""  # what the file in the closed folder holds


def prepared_spool() -> tuple[Path, Path]:
    """A spool folder anyone may write, with `files/` (the same) and `closed/` (root's, 0755); the mailbox and
    files/big nearly at LIMIT, files/exe executable, files/link a link to big, closed/held nobody's (empty),
    files/busy with a fresh dotlock that nobody removes (the wait for it: 2 s in both, see `lock_wait`)."""
    spool = Path(tempfile.mkdtemp(prefix="mailflow-fail-"))
    spool.chmod(0o1777)
    (spool / "files").mkdir(mode=0o1777)
    (spool / "files").chmod(0o1777)
    (spool / "closed").mkdir(mode=0o755)
    for path, size, mode in ((spool / "nobody", LIMIT - 10, 0o600), (spool / "files/big", LIMIT - 10, 0o600),
                             (spool / "files/exe", 10, 0o700), (spool / "closed/held", 0, 0o600),
                             (spool / "files/busy", 10, 0o600), (spool / "files/busy.lock", 0, 0o600)):
        path.write_text("x" * (size - 1) + "\n" if size else "")
        path.chmod(mode)
        shutil.chown(path, NOBODY, NOBODY)
    (spool / "files/link").symlink_to(spool / "files/big")
    table = spool / "aliases"
    table.write_text("".join(f"{name}: {value.format(spool=spool)}\n" for name, value in DESTINATIONS.items()))
    return spool, table


async def send(port: int) -> None:
    for name in DESTINATIONS:
        c = await SmtpClient.connect(port)
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<s@sender.test>")).code == 250
        assert (await c.cmd(f"RCPT TO:<{name}@origin.test>")).code == 250, name
        assert (await c.cmd("DATA")).code == 354
        await c.send(BODY.format(name=name).encode() + b".\r\n")
        assert (await c.reply()).code == 250
        await c.cmd("QUIT")
        await c.close()


async def logged(read_log) -> dict[str, tuple[str, str, str, str, str]]:
    try:
        await eventually(lambda: set(DESTINATIONS) <= set(first_results(read_log())), timeout=60, step=0.1)
    except AssertionError:
        raise AssertionError(f"no local result for {sorted(set(DESTINATIONS) - set(first_results(read_log())))}:"
                             f"\n{read_log()[-3000:]}") from None
    return first_results(read_log())


def collect(found: dict[str, tuple[str, str, str, str, str]], spool: Path) -> Run:
    run = Run({name: (dsn, status, text.replace(str(spool), "SPOOL")) for name, (_, _, dsn, status, text)
               in found.items()})
    run.held = (spool / "closed/held").read_text()
    return run


async def run_postfix() -> Run:
    spool, table = prepared_spool()
    subprocess.run(["postalias", f"hash:{table}"], check=True, capture_output=True)
    try:
        async with postfix_instance({**COMMON, "mydestination": "origin.test", "alias_maps": f"hash:{table}",
                                     "home_mailbox": "", "mail_spool_directory": str(spool),
                                     "mailbox_size_limit": str(LIMIT), "message_size_limit": str(LIMIT),
                                     "deliver_lock_attempts": "2", "deliver_lock_delay": "1s",  # (the text alike)
                                     "transport_maps": "inline:{sender.test=discard:}"}) as pf:
            await send(pf.port)
            found = await logged(lambda: pf.maillog)
        return collect(found, spool)
    finally:
        shutil.rmtree(spool, ignore_errors=True)


@contextlib.contextmanager
def lock_wait(seconds: float) -> Iterator[None]:
    """mailflow's wait for a busy lock (append_mbox's lock_timeout, 20 s like Postfix's default, which mailflow does
    not make a setting) shortened as deliver_lock_attempts shortens Postfix's, put back after."""
    defaults = mbox.append_mbox.__kwdefaults__
    assert defaults is not None
    before = defaults["lock_timeout"]
    defaults["lock_timeout"] = seconds
    try:
        yield
    finally:
        defaults["lock_timeout"] = before


async def run_mailflow(tmp: Path) -> Run:
    spool, table = prepared_spool()
    settings = merged(base_settings(tmp), {
        **COMMON, "mydestination": ["origin.test"], "alias_maps": [f"texthash:{table}"],
        "local_recipient_maps": ["inline:{nobody=x}"], "transport_maps": ["inline:{sender.test=discard:}"],
        "smtpd": {"message_size_limit": LIMIT},
        "local": {"home_mailbox": "", "mail_spool_directory": str(spool), "mailbox_size_limit": LIMIT}})
    try:
        with mail_log_file(tmp / "mail.log") as log, lock_wait(2.0):
            mf = Mailflow(config_from_dict(settings), shutdown_grace=2.0)
            await mf.start()
            try:
                await send(mf.smtp_addresses[0][1])
                found = await logged(log.read_text)
            finally:
                await mf.stop()
        return collect(found, spool)
    finally:
        shutil.rmtree(spool, ignore_errors=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    postfix = asyncio.run(run_postfix())
    mailflow = asyncio.run(run_mailflow(tmp_path_factory.mktemp("failures")))
    return {"postfix": postfix, "mailflow": mailflow}


def test_failure_texts_and_codes_are_postfixs(runs):
    """mail_copy's "error writing message: File too large" (5.2.2) after local(8)'s "cannot update mailbox PATH
    for user USER. " or "cannot append message to file PATH: ", file.c's "file is executable" (5.7.1),
    safe_open's "file is a symbolic link" and "cannot open file: Is a directory" (5.2.0)."""
    postfix, mailflow = runs["postfix"].results, runs["mailflow"].results
    assert {name: mailflow[name] for name in BOUNCED} == {name: postfix[name] for name in BOUNCED}
    assert postfix["mbox"] == ("5.2.2", "bounced", "cannot update mailbox SPOOL/nobody for user nobody. "
                                                   "error writing message: File too large")
    assert postfix["big"] == ("5.2.2", "bounced",
                              "cannot append message to file SPOOL/files/big: error writing message: File too large")
    assert postfix["exe"] == ("5.7.1", "bounced", "cannot append message to file SPOOL/files/exe: file is executable")
    assert postfix["link"] == ("5.2.0", "bounced",
                               "cannot append message to file SPOOL/files/link: file is a symbolic link")


def test_a_lock_held_past_the_wait_is_told_as_postfixs(runs):
    """dot_lockfile's "unable to create lock file PATH.lock: File exists", deferred 4.2.0; mailflow said "mailbox
    PATH is busy: PATH.lock exists (no dotlock within 20s)"."""
    postfix, mailflow = runs["postfix"].results, runs["mailflow"].results
    assert mailflow["busy"] == postfix["busy"] == (
        "4.2.0", "deferred",
        "cannot append message to file SPOOL/files/busy: unable to create lock file SPOOL/files/busy.lock: File exists")


def test_a_file_whose_dotlock_cannot_be_made_is_written_without_it_as_postfixs(runs):
    """local(8) appends to an existing file in a folder its writer may not create `.lock` in, with a warning
    (mbox_open's MBOX_DOT_LOCK_MAY_FAIL, for alias files in such folders); mailflow deferred it 4.2.0 "cannot
    create lock file"."""
    postfix, mailflow = runs["postfix"], runs["mailflow"]
    assert mailflow.results["held"] == postfix.results["held"] == (
        "2.0.0", "sent", "delivered to file: SPOOL/closed/held")
    assert mailflow.held.count("\nbody\n") == postfix.held.count("\nbody\n") == 1


def test_a_file_that_cannot_be_created_is_told_in_postfixs_words(runs):
    """safe_open's "cannot create file exclusively: Permission denied"; Postfix bounces it 5.2.0, mailflow defers
    it 4.2.0 (docs/transports.md)."""
    postfix, mailflow = runs["postfix"].results["create"], runs["mailflow"].results["create"]
    assert postfix == ("5.2.0", "bounced", "cannot append message to file SPOOL/closed/new: "
                                           "cannot create file exclusively: Permission denied")
    assert mailflow == ("4.2.0", "deferred", postfix[2])


# ---------------------------------------------------------------------------------------------- virtual(8)
VIRTUAL_MAPS = "inline:{ {c@virt.test=c/} }"  # c: a regular file where the Maildir should be
_VIRTUAL_RESULT = re.compile(r"[ /]virtual(?:\[\d+\])?: \w+: to=<(?P<to>[^>]*)>, .*dsn=(?P<dsn>[^,]+), "
                             r"status=(?P<status>\w+) \((?P<text>.*)\)$")
_TMP_NAME = re.compile(r"/tmp/[^/:]+:")


def virtual_results(log: str, base: Path) -> dict[str, tuple[str, str, str]]:
    """Each virtual recipient's first result, the base and the Maildir file's unique name masked."""
    found: dict[str, tuple[str, str, str]] = {}
    for m in filter(None, map(_VIRTUAL_RESULT.search, log.splitlines())):
        text = _TMP_NAME.sub("/tmp/NAME:", m["text"].replace(str(base), "BASE"))
        found.setdefault(m["to"], (m["dsn"], m["status"], text))
    return found


def prepared_base() -> Path:
    base = Path(tempfile.mkdtemp(prefix="mailflow-vbase-"))
    base.chmod(0o755)
    shutil.chown(base, NOBODY, NOBODY)
    (base / "c").write_text("not a Maildir\n")
    shutil.chown(base / "c", NOBODY, NOBODY)
    return base


async def send_virtual(port: int) -> None:
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd("MAIL FROM:<s@sender.test>")).code == 250
    assert (await c.cmd("RCPT TO:<c@virt.test>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    await c.send(BODY.format(name="c").encode() + b".\r\n")
    assert (await c.reply()).code == 250
    await c.cmd("QUIT")
    await c.close()


VIRTUAL = {"virtual_mailbox_domains": "virt.test", "virtual_mailbox_maps": VIRTUAL_MAPS,
           "virtual_uid_maps": f"static:{NOBODY}", "virtual_gid_maps": f"static:{NOBODY}"}


async def virtual_postfix() -> dict[str, tuple[str, str, str]]:
    base = prepared_base()
    try:
        async with postfix_instance({**COMMON, **VIRTUAL, "mydestination": "", "virtual_mailbox_base": str(base),
                                     "transport_maps": "inline:{sender.test=discard:}"}) as pf:
            await send_virtual(pf.port)
            await eventually(lambda: "c@virt.test" in virtual_results(pf.maillog, base), timeout=30, step=0.1)
            return virtual_results(pf.maillog, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def virtual_mailflow(tmp: Path) -> dict[str, tuple[str, str, str]]:
    base = prepared_base()
    settings = merged(base_settings(tmp), {
        **COMMON, **{key: [value] for key, value in VIRTUAL.items()},
        "mydestination": [], "virtual_mailbox_base": str(base), "transport_maps": ["inline:{sender.test=discard:}"]})
    try:
        with mail_log_file(tmp / "mail.log") as log:
            mf = Mailflow(config_from_dict(settings), shutdown_grace=2.0)
            await mf.start()
            try:
                await send_virtual(mf.smtp_addresses[0][1])
                await eventually(lambda: "c@virt.test" in virtual_results(log.read_text(), base), timeout=30, step=0.1)
                return virtual_results(log.read_text(), base)
            finally:
                await mf.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_virtual_maildir_that_cannot_be_made_is_told_as_postfixs(tmp_path):
    """virtual(8): "maildir delivery failed: create maildir file BASE/c/tmp/NAME: Not a directory", deferred
    4.2.0 (a file stands where the Maildir should be); mailflow said "cannot write to maildir BASE/c: …"."""
    postfix = asyncio.run(virtual_postfix())
    mailflow = asyncio.run(virtual_mailflow(tmp_path))
    assert mailflow == postfix == {"c@virt.test": (
        "4.2.0", "deferred", "maildir delivery failed: create maildir file BASE/c/tmp/NAME: Not a directory")}

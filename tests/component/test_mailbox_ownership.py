"""Who owns delivered mail: virtual_uid_maps / virtual_gid_maps for the virtual transport, the recipient's own uid
for local(8) users who are system users (a new mbox another delivery is creating waited for, not refused);
directories 0700, files 0600, and a symbolic link planted in a mailbox's directories never followed. Running as
root is needed to give files away: skipped otherwise."""
from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest

from mailflow.clock import VirtualClock
from mailflow.config import Config
from mailflow.content import Content
from mailflow.errors import DeliveryError
from mailflow.model import DeliveryRequest, Outcome, Recipient
from mailflow.routing.router import Router
from mailflow.transports import build_transports
from mailflow.transports.local import mbox
from mailflow.transports.maildir import spool_missing

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="giving files away needs root")

NOBODY = pwd.getpwnam("nobody")
CONTENT = b"From: s@remote.test\r\nSubject: owned\r\n\r\nbody\r\n"


def request(address: str) -> DeliveryRequest:
    return DeliveryRequest("Q1", "s@remote.test", (Recipient(0, address, address),), "x", Content.of(CONTENT))


def transports(tmp_path, local: dict | None = None, **settings) -> dict:
    config = Config(mydestination=("local.test",), local_recipient_maps=("inline:{nobody=x, alice=x}",),
                    virtual_mailbox_domains=("example.test",), virtual_mailbox_base=str(tmp_path / "vmail"),
                    virtual_mailbox_maps=("inline:{carol@example.test=example.test/carol/Maildir/}",),
                    local={"maildir_base": str(tmp_path / "mail"), **(local or {})}, **settings)
    return build_transports(config, None, VirtualClock(), Router(config))


def owner_and_mode(path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid, st.st_mode & 0o777


async def test_virtual_mailboxes_belong_to_the_uid_and_gid_the_maps_give(tmp_path):
    virtual = transports(tmp_path, virtual_uid_maps=("static:5000",), virtual_gid_maps=("static:5001",))["virtual"]
    [result] = (await virtual.deliver(request("carol@example.test"))).results
    assert result.outcome is Outcome.SENT, result
    maildir = tmp_path / "vmail" / "example.test" / "carol" / "Maildir"
    [message] = list((maildir / "new").iterdir())
    assert owner_and_mode(message) == (5000, 5001, 0o600)
    for directory in (maildir.parent.parent, maildir.parent, maildir, maildir / "tmp", maildir / "cur"):
        assert owner_and_mode(directory) == (5000, 5001, 0o700), directory
    assert (tmp_path / "vmail").stat().st_uid == 0  # the base itself stays the operator's


async def test_a_symbolic_link_in_a_mailbox_is_never_followed(tmp_path):
    virtual = transports(tmp_path, virtual_uid_maps=("static:5000",))["virtual"]
    (tmp_path / "vmail" / "example.test" / "carol").mkdir(parents=True)
    elsewhere = tmp_path / "vmail" / "example.test" / "dave"  # another mailbox, inside the base
    elsewhere.mkdir()
    (tmp_path / "vmail" / "example.test" / "carol" / "Maildir").symlink_to(elsewhere)
    [result] = (await virtual.deliver(request("carol@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.2.0")
    assert list(elsewhere.iterdir()) == []


async def test_a_bad_uid_map_value_defers(tmp_path):
    virtual = transports(tmp_path, virtual_uid_maps=("static:vmail",))["virtual"]
    [result] = (await virtual.deliver(request("carol@example.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.3.0")
    assert "not a numeric user or group id" in result.text


async def test_a_local_user_who_is_a_system_user_owns_its_maildir_and_others_stay_mailflows(tmp_path):
    local = transports(tmp_path)["local"]
    for user in ("nobody", "alice"):
        [result] = (await local.deliver(request(f"{user}@local.test"))).results
        assert result.outcome is Outcome.SENT, result
    nobody = tmp_path / "mail" / "nobody" / "Maildir"
    [message] = list((nobody / "new").iterdir())
    assert owner_and_mode(message) == (NOBODY.pw_uid, NOBODY.pw_gid, 0o600)
    assert owner_and_mode(nobody) == (NOBODY.pw_uid, NOBODY.pw_gid, 0o700)
    assert owner_and_mode(nobody.parent)[:2] == (NOBODY.pw_uid, NOBODY.pw_gid)
    [other] = list((tmp_path / "mail" / "alice" / "Maildir" / "new").iterdir())
    assert owner_and_mode(other) == (0, 0, 0o600)  # not a system user: mailflow's own


async def test_a_system_users_mbox_is_created_as_theirs_and_one_another_uid_owns_is_not_written(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o1777)
    local = transports(tmp_path, local={"home_mailbox": "", "mail_spool_directory": str(spool)})["local"]
    [result] = (await local.deliver(request("nobody@local.test"))).results
    assert result.outcome is Outcome.SENT, result
    assert owner_and_mode(spool / "nobody") == (NOBODY.pw_uid, NOBODY.pw_gid, 0o600)  # as local(8) chowns it

    os.chown(spool / "nobody", 0, 0)  # now another uid's file: Postfix's strict_mailbox_ownership defers
    before = (spool / "nobody").read_bytes()
    [result] = (await local.deliver(request("nobody@local.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.2.0"), result
    assert result.text == (f"cannot update mailbox {spool / 'nobody'} for user nobody. "  # (local/mailbox.c's words)
                           f"destination {spool / 'nobody'} is not owned by recipient")
    assert (spool / "nobody").read_bytes() == before

    [result] = (await local.deliver(request("alice@local.test"))).results  # not a system user: mailflow's own
    assert result.outcome is Outcome.SENT and owner_and_mode(spool / "alice") == (0, 0, 0o600)



async def test_a_symbolic_link_in_a_system_users_mbox_path_is_never_followed(tmp_path):
    """A user owns its home, so it can make a directory of home_mailbox ("Mail/inbox") a symbolic link: root
    followed it and created `inbox` (the user's, with the mail in it) in any directory (Postfix's local(8) writes a
    home mailbox with the user's rights). The directories below maildir_base are opened as the Maildir's are."""
    local = transports(tmp_path, local={"home_mailbox": "Mail/inbox"})["local"]
    home = tmp_path / "mail" / "nobody"
    home.mkdir(parents=True)
    os.chown(home, NOBODY.pw_uid, NOBODY.pw_gid)
    elsewhere = tmp_path / "root-only"
    elsewhere.mkdir()
    (home / "Mail").symlink_to(elsewhere)
    [result] = (await local.deliver(request("nobody@local.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.2.0"), result
    assert result.text.endswith(f"symbolic link {home / 'Mail'} not followed"), result.text
    assert list(elsewhere.iterdir()) == []

    (home / "Mail").unlink()
    [result] = (await local.deliver(request("nobody@local.test"))).results
    assert result.outcome is Outcome.SENT, result
    assert owner_and_mode(home / "Mail") == (NOBODY.pw_uid, NOBODY.pw_gid, 0o700)  # as a Maildir's directories
    assert owner_and_mode(home / "Mail" / "inbox") == (NOBODY.pw_uid, NOBODY.pw_gid, 0o600)


@pytest.mark.parametrize("home_mailbox", ["Mail/inbox", "Maildir/"])
async def test_a_maildir_base_with_dot_dot_still_never_follows_a_link_below_the_home(tmp_path, home_mailbox):
    """maildir_base as a relative one resolved against the config's directory keeps it (`<dir>/../mail`): the
    check below the home compared the path as written with the normalised base, found it outside and created the
    mailbox through the user's link, in a directory only root may write."""
    local = transports(tmp_path, local={"home_mailbox": home_mailbox,
                                        "maildir_base": str(tmp_path / "etc" / ".." / "mail")})["local"]
    home = tmp_path / "mail" / "nobody"
    home.mkdir(parents=True)
    os.chown(home, NOBODY.pw_uid, NOBODY.pw_gid)
    elsewhere = tmp_path / "root-only"
    elsewhere.mkdir()
    (home / home_mailbox.split("/")[0]).symlink_to(elsewhere)
    [result] = (await local.deliver(request("nobody@local.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.2.0"), result
    assert "not followed" in result.text
    assert list(elsewhere.iterdir()) == []


async def test_a_mailbox_not_below_the_home_is_refused_not_reached_by_following_links(tmp_path):
    home, outside = tmp_path / "home", tmp_path / "outside"
    with pytest.raises(DeliveryError) as refused:
        await mbox.append_mbox(outside / "inbox", b"From s  Mon Nov  2 05:11:55 2026\n\nx\n\n",
                               owner=(NOBODY.pw_uid, NOBODY.pw_gid), home=home)
    assert refused.value.dsn == "4.2.0"
    assert f"{outside} is not below {home}" in refused.value.text
    assert not outside.exists()


@pytest.mark.parametrize("home_mailbox", ["Mailbox", "Maildir/"])
async def test_a_home_that_is_a_link_root_made_is_followed(tmp_path, home_mailbox):
    """The home itself is the administrator's (`<maildir_base>/<user>` a link to /data/user): followed, as Postfix's
    local(8) does, writing as the user; only links below it are refused."""
    local = transports(tmp_path, local={"home_mailbox": home_mailbox})["local"]
    data = tmp_path / "data" / "nobody"
    data.mkdir(parents=True)
    os.chown(data, NOBODY.pw_uid, NOBODY.pw_gid)
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "nobody").symlink_to(data)
    [result] = (await local.deliver(request("nobody@local.test"))).results
    assert result.outcome is Outcome.SENT, result
    written = data / home_mailbox.rstrip("/")
    assert owner_and_mode(written)[:2] == (NOBODY.pw_uid, NOBODY.pw_gid)


@pytest.mark.parametrize("spool_name", ["spool", "spool/"])
async def test_a_mail_spool_inside_maildir_base_stays_the_operators(tmp_path, spool_name):
    """mail_spool_directory under maildir_base is no user's home: the spool was created 0700 for the first
    recipient, who could then rename the others' mailboxes. Postfix's local(8) writes spool mailboxes as root;
    only the user's mailbox (the mbox file, or the Maildir `<spool>/<user>/`) is the user's."""
    spool = tmp_path / "mail" / "spool"
    spool.mkdir(parents=True)
    spooled = {"home_mailbox": "", "mail_spool_directory": f"{tmp_path}/mail/{spool_name}"}
    local = transports(tmp_path, local=spooled)
    [result] = (await local["local"].deliver(request("nobody@local.test"))).results
    assert result.outcome is Outcome.SENT, result
    st = spool.stat()
    assert (st.st_uid, st.st_gid) == (0, 0) and st.st_mode & 0o777 != 0o700
    assert owner_and_mode(spool / "nobody")[:2] == (NOBODY.pw_uid, NOBODY.pw_gid)


OTHER_UID = 4321  # a user that is neither the recipient (nobody) nor root


@pytest.mark.parametrize("home_mailbox", ["Mailbox", "Maildir/"])
async def test_a_home_link_another_user_made_is_not_followed(tmp_path, home_mailbox):
    """In a maildir_base others may write (Debian's /var/mail is 2775 root:mail), uid 4321 made `<base>/nobody`
    a link to its own directory: nobody's mail went there (SENT), where uid 4321 could read or delete it. Postfix's
    safe_open follows a link only when root owns it."""
    local = transports(tmp_path, local={"home_mailbox": home_mailbox})["local"]
    trap = tmp_path / "trap"
    trap.mkdir()
    os.chown(trap, OTHER_UID, OTHER_UID)
    (tmp_path / "mail").mkdir(mode=0o1777)
    (tmp_path / "mail" / "nobody").symlink_to(trap)
    os.lchown(tmp_path / "mail" / "nobody", OTHER_UID, OTHER_UID)
    [result] = (await local.deliver(request("nobody@local.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.2.0"), result
    assert f"symbolic link {tmp_path / 'mail' / 'nobody'} is owned by uid {OTHER_UID}, not root" in result.text
    assert list(trap.iterdir()) == []


@pytest.mark.parametrize(("home_mailbox", "foreign"), [("Mailbox", ""), ("Maildir/", ""), ("Mail/inbox", ""),
                                                     ("Mail/inbox", "Mail"), ("Maildir/", "Maildir"),
                                                     ("Maildir/", "Maildir/new")])
async def test_a_home_or_directory_in_it_another_user_owns_gets_no_mail(tmp_path, home_mailbox, foreign):
    """An existing home (or a directory below it, `foreign`) owned by uid 4321, 0700: nobody's mail was written
    there as root. Postfix, writing as nobody, fails (EACCES); mailflow defers naming the path and its owner."""
    local = transports(tmp_path, local={"home_mailbox": home_mailbox})["local"]
    home = tmp_path / "mail" / "nobody"
    owned = home / foreign
    owned.mkdir(parents=True, mode=0o700)
    for path in (home, *(p for p in owned.parents if p.is_relative_to(home) and p != home)):
        os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    os.chown(owned, OTHER_UID, OTHER_UID)
    [result] = (await local.deliver(request("nobody@local.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.2.0"), result
    assert f"{owned} is owned by uid {OTHER_UID}, neither uid {NOBODY.pw_uid} nor root" in result.text
    assert [p for p in home.rglob("*") if not p.is_dir()] == []


async def test_a_home_root_made_and_owns_still_gets_the_mail(tmp_path):
    """A home (or directory below it) that root owns is the administrator's: written, as before."""
    local = transports(tmp_path, local={"home_mailbox": "Maildir/"})["local"]
    home = tmp_path / "mail" / "nobody"
    home.mkdir(parents=True)
    [result] = (await local.deliver(request("nobody@local.test"))).results
    assert result.outcome is Outcome.SENT, result


@pytest.mark.parametrize("link_owner", [0, OTHER_UID])
async def test_a_spool_maildir_that_is_a_link_is_followed_when_root_made_it(tmp_path, link_owner):
    """postconf(5): the administrator makes the top-level spool Maildir in advance; a root-owned link
    `<spool>/<user>` was deferred for ever ("symbolic link … not followed"). It is taken as a home: followed when
    root owns the link, refused when another user does."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o1777)
    data = tmp_path / "data" / "nobody"
    data.mkdir(parents=True)
    os.chown(data, NOBODY.pw_uid, NOBODY.pw_gid)
    (spool / "nobody").symlink_to(data)
    os.lchown(spool / "nobody", link_owner, link_owner)
    local = transports(tmp_path, local={"home_mailbox": "", "mail_spool_directory": f"{spool}/"})["local"]
    [result] = (await local.deliver(request("nobody@local.test"))).results
    if link_owner == 0:
        assert result.outcome is Outcome.SENT, result
        [message] = list((data / "new").iterdir())
        assert owner_and_mode(message)[:2] == (NOBODY.pw_uid, NOBODY.pw_gid)
    else:
        assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.2.0"), result
        assert "not root: not followed" in result.text and list(data.iterdir()) == []


@pytest.mark.parametrize("spool_name", ["spool", "spool/"])
async def test_a_missing_mail_spool_is_not_made(tmp_path, spool_name):
    """Postfix's local(8) never makes mail_spool_directory (the distributions ship it 1777 or 2775 root:mail); a
    spool mailflow made was 0755 root's, where MUAs cannot dotlock. The delivery defers until it exists."""
    spooled = {"home_mailbox": "", "mail_spool_directory": f"{tmp_path}/{spool_name}"}
    local = transports(tmp_path, local=spooled)["local"]
    [result] = (await local.deliver(request("nobody@local.test"))).results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.2.0"), result
    # the whole text, a Maildir's too (it was wrapped: "maildir delivery failed: create maildir file …/tmp/UNIQUE: …")
    assert result.text == spool_missing(tmp_path / "spool"), result
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize("spool_name", ["spool", "spool/"])
async def test_a_missing_mail_spool_is_made_when_mailflow_is_not_root(tmp_path, monkeypatch, spool_name):
    """Not root, mailflow owns everything it writes (make serve's var/spool/mail, the Docker image's /var/mail/spool):
    no MUA dotlocks there as another user, so the spool is made as before; it deferred 4.2.0 for ever."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    spooled = {"home_mailbox": "", "mail_spool_directory": f"{tmp_path}/{spool_name}"}
    local = transports(tmp_path, local=spooled)["local"]
    [result] = (await local.deliver(request("nobody@local.test"))).results
    monkeypatch.undo()
    assert result.outcome is Outcome.SENT, result
    assert (tmp_path / "spool" / "nobody").exists()


async def test_a_system_users_mbox_being_created_by_another_delivery_is_not_refused(tmp_path, monkeypatch):
    """Two deliveries to a new mbox at once: the second opens the file between the first's create and its fchown
    (seen in a run against Postfix: `4.2.0 destination … is not owned by recipient` for a mailbox nobody else
    touches). It waits for the owner to be set instead of deferring."""
    path = tmp_path / "spool" / "nobody"
    path.parent.mkdir()
    owner = (NOBODY.pw_uid, NOBODY.pw_gid)
    second: dict = {}
    real_fchown = mbox.os.fchown

    def slow_fchown(fd, uid, gid):  # the first delivery is descheduled right after creating the file
        if not second:
            second["thread"] = threading.Thread(target=lambda: second.setdefault("outcome", opened(path, owner)))
            second["thread"].start()
            time.sleep(0.2)
        real_fchown(fd, uid, gid)

    monkeypatch.setattr(mbox.os, "fchown", slow_fchown)
    await mbox.append_mbox(path, b"From s@remote.test  Mon Nov  2 05:11:55 2026\n\nfirst\n\n", owner=owner)
    second["thread"].join(timeout=5)
    assert second["outcome"] == "opened"
    assert owner_and_mode(path) == (NOBODY.pw_uid, NOBODY.pw_gid, 0o600)


def opened(path, owner) -> str:
    """What opening the mailbox for `owner` gives: "opened", or the refusal's words."""
    try:
        os.close(mbox._open_mailbox(path, owner))
    except DeliveryError as e:
        return f"{e.dsn} {e.text}"
    return "opened"


@pytest.mark.parametrize("swapped", ["nobody", "nobody/Maildir"])
async def test_a_directory_swapped_for_a_hard_link_after_it_was_made_is_never_given_away(tmp_path, monkeypatch,
                                                                                        swapped):
    """Root made a missing home (or a directory in it) then chowned it by path: in a base group members may write
    (2775, no sticky bit), the recipient swapped the new directory for a hard link to a file (another user's mbox)
    in between, and root gave that file to the recipient. The swap is forced right after mkdir."""
    local = transports(tmp_path, local={"home_mailbox": "Maildir/"})["local"]
    victim = tmp_path / "victim"
    victim.write_bytes(b"alice's mail\n")
    os.chown(victim, OTHER_UID, OTHER_UID)
    target = tmp_path / "mail" / swapped
    if swapped != "nobody":
        target.parent.mkdir(parents=True)
        os.chown(target.parent, NOBODY.pw_uid, NOBODY.pw_gid)
    real_mkdir = os.mkdir

    def mkdir_then_swap(path, mode=0o777, *, dir_fd=None):
        real_mkdir(path, mode, dir_fd=dir_fd)
        made = target.parent / path if dir_fd is not None else Path(path)
        if made == target:
            os.rmdir(made)
            os.link(victim, made)

    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
    [result] = (await local.deliver(request("nobody@local.test"))).results
    monkeypatch.undo()
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.2.0"), result
    assert victim.stat().st_uid == OTHER_UID and victim.read_bytes() == b"alice's mail\n"


async def test_a_home_link_swapped_after_its_owner_was_checked_is_not_followed(tmp_path, monkeypatch):
    """The home link's owner was checked with lstat, then the name opened following links: in a base others may
    write (2775 or 1777), uid 4321 replaced root's link with its own, to a directory of root's, in between, and
    nobody's mail was made there. The swap is forced right after the check (lstat of the name, or fstat of the link)."""
    local = transports(tmp_path, local={"home_mailbox": "Maildir/"})["local"]
    data = tmp_path / "data" / "nobody"
    data.mkdir(parents=True)
    os.chown(data, NOBODY.pw_uid, NOBODY.pw_gid)
    trap = tmp_path / "etc-like"  # a directory of root's (the home check passes it)
    trap.mkdir()
    (tmp_path / "mail").mkdir(mode=0o1777)
    home = tmp_path / "mail" / "nobody"
    home.symlink_to(data)
    real_lstat, real_fstat, swapped = os.lstat, os.fstat, []

    def swap() -> None:
        if not swapped:
            swapped.append(True)
            home.unlink()
            home.symlink_to(trap)
            os.lchown(home, OTHER_UID, OTHER_UID)

    def lstat_then_swap(path, *args, **kw):
        st = real_lstat(path, *args, **kw)
        if Path(path) == home:
            swap()
        return st

    def fstat_then_swap(fd):
        st = real_fstat(fd)
        if stat.S_ISLNK(st.st_mode):  # (only an O_PATH descriptor of a link is one)
            swap()
        return st

    monkeypatch.setattr(os, "lstat", lstat_then_swap)
    monkeypatch.setattr(os, "fstat", fstat_then_swap)
    [result] = (await local.deliver(request("nobody@local.test"))).results
    monkeypatch.undo()
    assert swapped and result.outcome is Outcome.SENT, result
    assert list(trap.iterdir()) == [] and len(list((data / "Maildir" / "new").iterdir())) == 1


@pytest.mark.parametrize("made_first", ["nobody", "nobody/Maildir"])
async def test_deliveries_alongside_to_one_new_home_all_succeed_and_leave_it_the_users(tmp_path, monkeypatch,
                                                                                      made_first):
    """Delivery A made the home (or its Maildir); before A gave it away, B found it made and made its Maildir in
    it; A then refused to give away a directory no longer empty (deferred), and the home stayed root's 0700 for
    good: every later delivery took it as an existing root-owned home. Forced: A waits right after its mkdir
    until B and a third delivery have finished, or 1 s (they now wait for A's lock of the directory)."""
    local = transports(tmp_path, local={"home_mailbox": "Maildir/"})["local"]
    target = tmp_path / "mail" / made_first
    real_mkdir = os.mkdir
    made, others_done = threading.Event(), threading.Event()

    def mkdir_then_wait(path, mode=0o777, *, dir_fd=None):
        real_mkdir(path, mode, dir_fd=dir_fd)
        if (target.parent / path if dir_fd is not None else Path(path)) == target and not made.is_set():
            made.set()
            others_done.wait(1)

    monkeypatch.setattr(os, "mkdir", mkdir_then_wait)
    first = asyncio.ensure_future(local.deliver(request("nobody@local.test")))
    assert await asyncio.to_thread(made.wait, 10)
    others = await asyncio.gather(*(local.deliver(request("nobody@local.test")) for _ in range(2)))
    others_done.set()
    reports = [await first, *others]
    monkeypatch.undo()
    assert [r.outcome for report in reports for r in report.results] == [Outcome.SENT] * 3, reports
    home = tmp_path / "mail" / "nobody"
    for directory in (home, home / "Maildir", home / "Maildir" / "new", home / "Maildir" / "tmp"):
        assert owner_and_mode(directory) == (NOBODY.pw_uid, NOBODY.pw_gid, 0o700), directory
    assert len(list((home / "Maildir" / "new").iterdir())) == 3


async def test_a_root_directory_with_content_swapped_in_after_the_mkdir_is_never_given_away(tmp_path, monkeypatch):
    """Whoever may write the base (a 2775 root:mail spool or base without the sticky bit) renames the new home away
    and renames into its place a root-owned directory with content (another user's home being made, a Maildir
    made in advance): root gave it to the recipient, contents included. Now a directory with content is not the
    one just made: the delivery defers, and the directory stays root's."""
    local = transports(tmp_path, local={"home_mailbox": "Maildir/"})["local"]
    target = tmp_path / "mail" / "nobody"
    other = tmp_path / "mail" / "someone-elses"
    other.mkdir(parents=True, mode=0o700)
    (other / "Maildir").mkdir()
    real_mkdir = os.mkdir

    def mkdir_then_swap(path, mode=0o777, *, dir_fd=None):
        real_mkdir(path, mode, dir_fd=dir_fd)
        if (target.parent / path if dir_fd is not None else Path(path)) == target:
            os.rename(target, tmp_path / "mail" / "moved-away")
            os.rename(other, target)

    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
    [result] = (await local.deliver(request("nobody@local.test"))).results
    monkeypatch.undo()
    assert result.outcome is Outcome.DEFERRED and "was replaced after it was made" in result.text, result.text
    assert os.stat(target).st_uid == 0 and os.listdir(target) == ["Maildir"]


async def test_many_first_deliveries_at_once_to_new_homes_leave_every_home_the_users(tmp_path):
    """The same race left to the scheduler: rounds of four deliveries at once to a home none of them finds."""
    local = transports(tmp_path, local={"home_mailbox": "Maildir/"})["local"]
    home = tmp_path / "mail" / "nobody"
    for _ in range(25):
        reports = await asyncio.gather(*(local.deliver(request("nobody@local.test")) for _ in range(4)))
        assert [r.outcome for report in reports for r in report.results] == [Outcome.SENT] * 4, reports
        for directory in (home, home / "Maildir", home / "Maildir" / "new", home / "Maildir" / "cur"):
            assert owner_and_mode(directory)[:2] == (NOBODY.pw_uid, NOBODY.pw_gid), directory
        shutil.rmtree(home)

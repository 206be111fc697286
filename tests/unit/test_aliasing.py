"""Local alias and .forward expansion (mailflow.transports.local.aliasing.LocalExpander), with real files in tmp_path.

Covered: alias_maps (aliases(5) texthash files and inline tables): several users, chains, self reference,
loops falling through to the mailbox, `\\user`, remote addresses becoming Forward; unknown users (5.1.1);
.forward files under `<maildir_base>/<user>/` (`\\user`, remote addresses, `.forward+ext` preferred, empty
file); commands and files allowed from aliases by default, refused (5.7.1) from :include: unless allowed;
Delivered-To loops (5.4.6); a .forward local(8) passes over with a warning (not a regular file, a symbolic
link, a FIFO, world-writable, another owner, hard-linked when read as root) and one that is not UTF-8 (4.3.0); bad
syntax in .forward or an alias value (4.3.5); duplicate leaves.
"""
from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from mailflow.config import Config
from mailflow.errors import TemporaryError
from mailflow.transports.local import aliasing
from mailflow.transports.local.aliasing import (SMALL_FILE_LIMIT, Command, File, Forward, LocalExpander, Mailbox,
                                               Refused, read_small_file)
from mailflow.routing.rewrite import Rewriter

USERS = ("alice", "bob", "carol")


def expander(tmp_path: Path, aliases: str | None = None, *, alias_maps: tuple[str, ...] | None = None,
             local_recipient_maps: tuple[str, ...] | None = None, **local) -> LocalExpander:
    """A LocalExpander for example.test whose local users are USERS (unless `local_recipient_maps` says
    otherwise); `aliases` is an aliases(5) file; `local` are settings of the [local] section."""
    if local_recipient_maps is None:
        users = tmp_path / "users"
        users.write_text("".join(f"{u} {u}\n" for u in USERS))
        local_recipient_maps = (f"texthash:{users}",)
    if alias_maps is None:
        alias_maps = ()
        if aliases is not None:
            (tmp_path / "aliases").write_text(aliases)
            alias_maps = (f"texthash:{tmp_path / 'aliases'}",)
    config = Config(myhostname="mx.example.test", myorigin="example.test",
                    mydestination=("example.test", "localhost"),
                    local_recipient_maps=local_recipient_maps, alias_maps=alias_maps,
                    local={"maildir_base": str(tmp_path / "mail"), **local})
    return LocalExpander(config, Rewriter(config))


def forward_file(tmp_path: Path, user: str, text: str, name: str = ".forward") -> Path:
    home = tmp_path / "mail" / user
    home.mkdir(parents=True, exist_ok=True)
    (home / name).write_text(text)
    return home / name


def mailbox(user: str, addr: str | None = None) -> Mailbox:
    return Mailbox(user, addr or f"{user}@example.test")


def temporary(excinfo, dsn: str) -> bool:
    return isinstance(excinfo.value, TemporaryError) and excinfo.value.dsn == dsn


# ------------------------------------------------------------------------------------------------ aliases


def test_user_without_alias_or_forward_gets_the_mailbox(tmp_path):
    assert expander(tmp_path, "team: alice\n").expand("bob@example.test") == [mailbox("bob")]


def test_unqualified_recipient_is_qualified_with_myorigin(tmp_path):
    assert expander(tmp_path).expand("bob") == [mailbox("bob")]


def test_alias_to_several_users(tmp_path):
    e = expander(tmp_path, "team: alice, bob,\n  carol\n")
    assert e.expand("team@example.test") == [mailbox("alice"), mailbox("bob"), mailbox("carol")]


def test_alias_name_is_case_insensitive_and_matches_without_extension(tmp_path):
    e = expander(tmp_path, "team: alice, bob\n")
    assert e.expand("TEAM@example.test") == [mailbox("alice"), mailbox("bob")]
    assert e.expand("team+news@example.test") == [mailbox("alice"), mailbox("bob")]


def test_alias_chain(tmp_path):
    e = expander(tmp_path, "staff: team, carol\nteam: alice, bob\n")
    assert e.expand("staff@example.test") == [mailbox("alice"), mailbox("bob"), mailbox("carol")]


def test_alias_including_itself_delivers_to_its_mailbox(tmp_path):
    e = expander(tmp_path, "alice: alice, bob\n")
    assert e.expand("alice@example.test") == [mailbox("alice"), mailbox("bob")]


def test_alias_loop_bounces_as_an_alias_database_loop(tmp_path):
    """Only an alias that lists itself is special (its name goes to the mailbox); a loop through another
    alias is walked on to local(8)'s nesting limit, where the address met (bob at level 101) is refused."""
    e = expander(tmp_path, "alice: bob\nbob: alice\n")
    assert e.expand("alice@example.test") == [Refused("bob@example.test", "5.4.6", "alias database loop for bob")]
    assert e.expand("bob@example.test") == [Refused("alice@example.test", "5.4.6", "alias database loop for alice")]


def test_the_name_an_expansion_came_from_is_passed_over_before_the_nesting_limit(tmp_path):
    """local(8)'s deliver_alias is given the local part, then the user without its extension, and passes over the
    name its expansion came from (exp_from) before it checks the level: `bob+x` met in bob's .forward+x past the
    nesting limit bounces "alias database loop for bob", not for bob+x."""
    forward_file(tmp_path, "bob", "bob+x\n", name=".forward+x")
    chain = "".join(f"c{i}: c{i + 1}\n" for i in range(23))
    e = expander(tmp_path, f"{chain}c23: bob+x\n")
    assert e.expand("c0@example.test") == [Refused("bob+x@example.test", "5.4.6", "alias database loop for bob")]


def test_an_alias_met_again_through_an_include_file_is_expanded_again(tmp_path):
    """local(8) expands an alias met again through an :include: file once more (include.c resets exp_from), under
    that file: its local users resubmitted (bob a new message too, beside his mailbox), the file itself, read
    already, adding nothing; no loop bounce."""
    inc = tmp_path / "list.include"
    inc.write_text("staff\n")
    e = expander(tmp_path, f"team: |/usr/bin/log, :include:{inc}, bob\nstaff: alice, team\n")
    assert e.expand("team@example.test") == [Command("/usr/bin/log", "team@example.test", "alias"),
                                              Forward("alice@example.test"), Forward("bob@example.test"),
                                              mailbox("bob")]


def test_backslash_user_is_the_user_itself_as_local8_reads_it(tmp_path):
    """Postfix 3.7's local drops the backslash as it reads a value (tok822_parse; recipient.c's `\\user` case says
    it "currently does not work"): `\\alice` is `alice`, aliased again unless it is the alias being expanded, then
    her .forward; no mailbox copy beside what her .forward names."""
    forward_file(tmp_path, "alice", "elsewhere@remote.test\n")
    e = expander(tmp_path, "alice: \\alice, carol@remote.test\nteam: \\alice\n")
    assert e.expand("alice@example.test") == [Forward("elsewhere@remote.test"), Forward("carol@remote.test")]
    assert e.expand("team@example.test") == [Forward("elsewhere@remote.test"), Forward("carol@remote.test")]


def test_two_backslashes_give_the_mailbox_with_no_alias_and_no_forward(tmp_path):
    """`\\\\alice` (two backslashes: local(8)'s tokenizer keeps one) takes recipient.c's branch: alice's mailbox,
    no alias lookup, no .forward, not resubmitted under a list with an owner; an unknown user is refused as by
    mailbox delivery (Postfix 3.7.11: WRITTEN case "two backslashes before a user in an alias")."""
    forward_file(tmp_path, "alice", "elsewhere@remote.test\n")
    e = expander(tmp_path, "alice: carol\nteam: \\\\alice, |/bin/log\nlist: \\\\alice+x\nowner-list: bob\n"
                           "ghosts: \\\\ghost\n")
    assert e.expand("team@example.test") == [mailbox("alice"), Command("/bin/log", "team@example.test", "alias")]
    assert e.expand("list@example.test") == [mailbox("alice", "alice+x@example.test")]
    assert e.expand("ghosts@example.test") == [Refused("ghost@example.test", "5.1.1", 'unknown user: "ghost"')]


def test_the_mailbox_form_forwarded_keeps_its_backslash_and_a_backslashed_name_is_nobody(tmp_path):
    """With myorigin not local, `\\\\alice` was forwarded as `alice@myorigin`: the next hop aliased it and read
    .forward. Postfix 3.7.11 forwards `"\\\\alice"@myorigin` (resolve.c rewrites the address as it is; its smtp
    logged to=<"\\\\nobody"@elsewhere.test>), which a next hop's local(8) takes as the mailbox form. A name still
    starting with a backslash (`\\\\\\\\ghost`) is forwarded so too, quoted; with myorigin local it is no user
    (`unknown user: "\\ghost"`, Postfix's WRITTEN cases "two backslashes left")."""
    (tmp_path / "aliases").write_text("team: \\\\alice, \\\\\\\\ghost\n")
    config = Config(myhostname="mx.example.test", myorigin="elsewhere.test", mydestination=("example.test",),
                    alias_maps=(f"texthash:{tmp_path / 'aliases'}",), local={"maildir_base": str(tmp_path / "mail")})
    assert LocalExpander(config, Rewriter(config)).expand("team@example.test") == [
        Forward('"\\\\alice"@elsewhere.test'), Forward('"\\\\\\\\ghost"@elsewhere.test')]
    e = expander(tmp_path, "team: \\\\alice, \\\\\\\\ghost\n")
    assert e.expand("team@example.test") == [
        mailbox("alice"), Refused('"\\\\ghost"@example.test', "5.1.1", 'unknown user: "\\ghost"')]


def test_unknown_user_is_refused(tmp_path):
    [leaf] = expander(tmp_path, "team: alice\n").expand("nobody@example.test")
    assert isinstance(leaf, Refused)
    assert (leaf.address, leaf.dsn) == ("nobody@example.test", "5.1.1")
    assert "nobody" in leaf.text


def test_alias_to_an_unknown_user_refuses_that_one_only(tmp_path):
    leaves = expander(tmp_path, "team: alice, ghost\n").expand("team@example.test")
    assert leaves[0] == mailbox("alice")
    assert [(type(x), x.address, x.dsn) for x in leaves[1:]] == [(Refused, "ghost@example.test", "5.1.1")]


def test_alias_to_a_remote_address_is_a_forward(tmp_path):
    e = expander(tmp_path, "team: alice, Someone@Remote.test\n")
    assert e.expand("team@example.test") == [mailbox("alice"), Forward("Someone@Remote.test")]


def test_alias_is_not_consulted_for_remote_addresses_in_its_value(tmp_path):
    # `alice@remote.test` is not local: it is forwarded, not expanded through the local alias `alice`.
    e = expander(tmp_path, "team: alice@remote.test\nalice: bob\n")
    assert e.expand("team@example.test") == [Forward("alice@remote.test")]


def test_alias_from_an_inline_table(tmp_path):
    e = expander(tmp_path, alias_maps=("inline:{ { team = alice, x@remote.test } }",))
    assert e.expand("team@example.test") == [mailbox("alice"), Forward("x@remote.test")]


def test_bad_syntax_in_an_inline_alias_value_is_4_3_5(tmp_path):
    e = expander(tmp_path, alias_maps=("inline:{ { team = alice, ./relative/file } }",))
    with pytest.raises(TemporaryError) as excinfo:
        e.expand("team@example.test")
    assert temporary(excinfo, "4.3.5")


def test_alias_table_that_cannot_answer_is_4_3_0(tmp_path):
    e = expander(tmp_path, alias_maps=("fail:aliases",))
    with pytest.raises(TemporaryError) as excinfo:
        e.expand("alice@example.test")
    assert temporary(excinfo, "4.3.0")


# ----------------------------------------------------------------------------------------------- .forward


def test_forward_with_own_mailbox_and_remote_copy(tmp_path):
    forward_file(tmp_path, "bob", "\\bob, bob@remote.test\n")
    assert expander(tmp_path).expand("bob@example.test") == [mailbox("bob"), Forward("bob@remote.test")]


def test_forward_naming_its_own_user_delivers_to_the_mailbox(tmp_path):
    """The owner's own name is the mailbox; another local user is forwarded as a new message (where virtual
    aliases and Delivered-To loop detection apply), as local(8) does."""
    forward_file(tmp_path, "bob", "bob, carol\n")
    assert expander(tmp_path).expand("bob@example.test") == [mailbox("bob"), Forward("carol@example.test")]


def test_an_alias_named_in_a_forward_is_expanded_there(tmp_path):
    """local(8) looks an address of a .forward up in the aliases first (deliver_switch): an alias is expanded in
    place, with an alias's class and rights (its command no user's HOME), its local users other than the
    .forward's own resubmitted (dotforward's owner attribute), the .forward's own user its mailbox (named in its
    own .forward); the alias's own members forwarded nowhere else."""
    forward_file(tmp_path, "bob", "staff, carol\n")
    e = expander(tmp_path, "staff: |/usr/bin/log, alice, bob\n")
    assert e.expand("bob@example.test") == [Command("/usr/bin/log", "staff@example.test", "alias"),
                                             Forward("alice@example.test"), mailbox("bob"),
                                             Forward("carol@example.test")]


def test_an_alias_met_again_through_a_users_forward_delivers_to_the_mailbox(tmp_path):
    """local(8) expands an alias met again through a user's .forward once more (dotforward.c resets exp_from; alias.c:
    "an alias of a user that lists that same alias in her own .forward file"): the user met again inside it, its
    .forward open, gets the mailbox; no 5.4.6 alias database loop."""
    forward_file(tmp_path, "bob", "a\n")
    forward_file(tmp_path, "alice", "alice.smith\n")
    forward_file(tmp_path, "carol", "\\carol, staff\n")
    e = expander(tmp_path, "a: bob\nalice.smith: alice\nstaff: carol, alice\n")
    assert e.expand("a@example.test") == [mailbox("bob")]
    assert e.expand("alice.smith@example.test") == [mailbox("alice")]
    # staff again in carol's .forward: carol her mailbox (once), alice resubmitted (the .forward's owner attribute
    # is carol); the outer staff's alice reads her .forward, whose alice.smith names alice at the nesting level the
    # resubmitted alice was met at: local(8)'s duplicate filter passes over it (no mailbox copy here, the new
    # message gives her one)
    assert e.expand("staff@example.test") == [mailbox("carol"), Forward("alice@example.test")]


def test_the_users_name_in_its_forward_with_an_extension_reads_the_plain_forward(tmp_path):
    """local(8) keys a .forward in progress by its path: in `.forward+x`, `bob+x` (the same file) is the mailbox,
    `bob` reads `.forward` (another file), whose own `bob` is then the mailbox."""
    forward_file(tmp_path, "bob", "bob, bob+x\n", name=".forward+x")
    forward_file(tmp_path, "bob", "carol@remote.test, bob\n")
    assert expander(tmp_path).expand("bob+x@example.test") == [
        Forward("carol@remote.test"), mailbox("bob"), mailbox("bob", "bob+x@example.test")]


def test_backslash_user_in_its_forward_with_an_extension_reads_the_plain_forward(tmp_path):
    """`\\bob` in `.forward+x` is `bob` (local(8) drops the backslash): it reads `.forward`, another file, so no
    mailbox copy unless that one names bob again (Postfix 3.7.11, local seeds 70009 and 70006)."""
    forward_file(tmp_path, "bob", "\\bob\n", name=".forward+x")
    forward_file(tmp_path, "bob", "carol@remote.test\n")
    assert expander(tmp_path).expand("bob+x@example.test") == [Forward("carol@remote.test")]
    forward_file(tmp_path, "bob", "carol@remote.test, \\bob\n")
    assert expander(tmp_path).expand("bob+x@example.test") == [Forward("carol@remote.test"), mailbox("bob")]


def test_forward_is_read_after_an_alias(tmp_path):
    forward_file(tmp_path, "bob", "bob@remote.test\n")
    assert expander(tmp_path, "team: alice, bob\n").expand("team@example.test") == \
        [mailbox("alice"), Forward("bob@remote.test")]


def test_forward_with_extension_is_preferred(tmp_path):
    forward_file(tmp_path, "bob", "plain@remote.test\n")
    forward_file(tmp_path, "bob", "lists@remote.test\n", name=".forward+lists")
    e = expander(tmp_path)
    assert e.expand("bob+lists@example.test") == [Forward("lists@remote.test")]
    assert e.expand("bob@example.test") == [Forward("plain@remote.test")]
    assert e.expand("bob+other@example.test") == [Forward("plain@remote.test")]


def test_empty_forward_delivers_to_the_mailbox(tmp_path):
    forward_file(tmp_path, "bob", "")
    forward_file(tmp_path, "carol", "# only a comment\n\n")
    e = expander(tmp_path)
    assert e.expand("bob@example.test") == [mailbox("bob")]
    assert e.expand("carol@example.test") == [mailbox("carol")]


def passed_over(tmp_path: Path, user: str = "bob") -> list[str]:
    """Expand `user`, expecting its mailbox alone; the warnings given."""
    warnings: list[str] = []
    assert expander(tmp_path).expand(f"{user}@example.test", warn=warnings.append) == [mailbox(user)]
    return warnings


def test_a_forward_that_is_not_a_regular_file_is_passed_over_with_a_warning(tmp_path):
    """local(8): "file ... is not a regular file", and the mailbox. A symbolic link is not followed (it could
    lead a .forward to a file its user may not read), a FIFO does not hold the delivery."""
    home = tmp_path / "mail" / "bob"
    (home / ".forward").mkdir(parents=True)
    assert passed_over(tmp_path) == [f"file {home / '.forward'} is not a regular file"]
    (home / ".forward").rmdir()
    (tmp_path / "elsewhere").write_text("stolen@remote.test\n")
    (home / ".forward").symlink_to(tmp_path / "elsewhere")
    assert passed_over(tmp_path) == [f"file {home / '.forward'} is not a regular file"]
    (home / ".forward").unlink()
    os.mkfifo(home / ".forward")
    assert passed_over(tmp_path) == [f"file {home / '.forward'} is not a regular file"]


def test_the_first_forward_that_exists_is_the_one_used_even_when_passed_over(tmp_path):
    forward_file(tmp_path, "bob", "plain@remote.test\n")
    (tmp_path / "mail" / "bob" / ".forward+lists").mkdir()
    warnings: list[str] = []
    assert expander(tmp_path).expand("bob+lists@example.test", warn=warnings.append) == [
        mailbox("bob", "bob+lists@example.test")]
    assert len(warnings) == 1 and "not a regular file" in warnings[0]


def test_a_world_writable_forward_is_passed_over(tmp_path):
    path = forward_file(tmp_path, "bob", "stolen@remote.test\n")
    path.chmod(0o666)
    assert passed_over(tmp_path) == [f"file {path} is world writable"]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_a_forward_owned_by_someone_else_is_passed_over(tmp_path):
    path = forward_file(tmp_path, "bob", "stolen@remote.test\n")
    os.chown(path, 12345, 12345)
    assert passed_over(tmp_path) == [f"file {path} has bad owner uid 12345"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root reads as another user")
def test_as_root_a_hard_linked_forward_of_a_user_without_an_account_is_passed_over(tmp_path):
    """Read as root (bob has no system account), a hard link could show any root file of the file system."""
    secret = tmp_path / "secret"
    secret.write_text("root@remote.test\n")
    (tmp_path / "mail" / "bob").mkdir(parents=True)
    os.link(secret, tmp_path / "mail" / "bob" / ".forward")
    assert passed_over(tmp_path) == [f"file {tmp_path / 'mail' / 'bob' / '.forward'} has 2 links"]


def test_a_forward_that_is_not_utf8_is_4_3_0(tmp_path):
    forward_file(tmp_path, "bob", "").write_bytes(b"caf\xe9@remote.test\n")
    with pytest.raises(TemporaryError) as excinfo:
        expander(tmp_path).expand("bob@example.test")
    assert temporary(excinfo, "4.3.0")


def test_bad_syntax_in_forward_is_4_3_5(tmp_path):
    forward_file(tmp_path, "bob", "alice, ./relative/file\n")
    with pytest.raises(TemporaryError) as excinfo:
        expander(tmp_path).expand("bob@example.test")
    assert temporary(excinfo, "4.3.5")


def test_bad_syntax_in_alias_file_is_a_temporary_failure(tmp_path):
    e = expander(tmp_path, "team alice\n")  # no colon: the whole table fails until fixed
    with pytest.raises(TemporaryError) as excinfo:
        e.expand("team@example.test")
    assert temporary(excinfo, "4.3.0")


# ------------------------------------------------------------------------------------ commands, files, :include:


def test_commands_and_files_from_an_alias_are_allowed_by_default(tmp_path):
    e = expander(tmp_path, 'run: "|/usr/bin/filter -x", /var/spool/archive\n')
    assert e.expand("run@example.test") == [Command("/usr/bin/filter -x", "run@example.test", "alias"),
                                              File("/var/spool/archive", "run@example.test", "alias")]


def test_commands_and_files_from_forward_are_allowed_by_default(tmp_path):
    forward_file(tmp_path, "bob", "|/usr/bin/vacation bob\n/var/spool/bob-archive\n")
    assert expander(tmp_path).expand("bob@example.test") == [
        Command("/usr/bin/vacation bob", "bob@example.test", "forward", forward=True),  # with bob's HOME
        File("/var/spool/bob-archive", "bob@example.test", "forward")]


def test_commands_from_an_alias_refused_when_not_allowed(tmp_path):
    e = expander(tmp_path, "run: |/usr/bin/filter, /var/spool/archive\n",
                 allow_mail_to_commands=(), allow_mail_to_files=())
    assert e.expand("run@example.test") == [Refused("run@example.test", "5.7.1", "mail to command is restricted"),
                                              Refused("run@example.test", "5.7.1", "mail to file is restricted")]


def include_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "list.include"
    path.write_text(text)
    return path


def test_commands_and_files_from_include_are_refused_by_default(tmp_path):
    inc = include_file(tmp_path, "|/usr/bin/filter\n/var/spool/archive\nalice\n")
    leaves = expander(tmp_path, f"list: :include:{inc}\n").expand("list@example.test")
    assert leaves == [Refused("list@example.test", "5.7.1", "mail to command is restricted"),
                      Refused("list@example.test", "5.7.1", "mail to file is restricted"),
                      Forward("alice@example.test")]  # an :include: member is resubmitted (local(8))


def test_an_alias_in_an_include_file_a_forward_names_is_judged_as_in_the_forward(tmp_path):
    """local(8) looks an :include: file's address up in the aliases before it forwards it (deliver_switch): the
    alias's members then meet the owner attribute the .forward set (its user), so that user is delivered here (its
    .forward open: the mailbox) and other users are resubmitted; with no .forward above, the :include: file's
    owner attribute is an address, and every local member is resubmitted (Postfix 3.7.11, local seed 70006)."""
    top = Path(tempfile.mkdtemp(prefix="mailflow-include-"))  # (as root bob's .forward names it with nobody's rights)
    try:
        top.chmod(0o755)
        inc = top / "list.include"
        inc.write_text("team\nalice\n")
        forward_file(tmp_path, "bob", f":include:{inc}\n")
        e = expander(tmp_path, f"team: bob, carol, |/usr/bin/log\nlist: :include:{inc}\n")
        assert e.expand("bob@example.test") == [mailbox("bob"), Forward("carol@example.test"),
                                                 Command("/usr/bin/log", "team@example.test", "alias"),
                                                 Forward("alice@example.test")]
        assert e.expand("list@example.test") == [Forward("bob@example.test"), Forward("carol@example.test"),
                                                  Command("/usr/bin/log", "team@example.test", "alias"),
                                                  Forward("alice@example.test")]
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_commands_and_files_from_include_when_allowed(tmp_path):
    inc = include_file(tmp_path, "|/usr/bin/filter\n/var/spool/archive\nalice\n")
    e = expander(tmp_path, f"list: :include:{inc}\n",
                 allow_mail_to_commands=("alias", "forward", "include"), allow_mail_to_files=("include",))
    assert e.expand("list@example.test") == [Command("/usr/bin/filter", "list@example.test", "include"),
                                               File("/var/spool/archive", "list@example.test", "include"),
                                               Forward("alice@example.test")]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_as_root_a_user_owned_include_file_in_an_alias_gives_its_owners_rights(tmp_path):
    """local(8)'s include.c: a non-root :include: file listed in a root-owned alias gives what it names the rights of
    the file's owner, not default_privs (its owner must not act as the default account); a root-owned one leaves
    them to default_privs; an owner uid without a name defers 4.3.5, as include.c does."""
    inc = include_file(tmp_path, "|/usr/bin/filter\n/var/spool/archive\n")
    e = expander(tmp_path, f"list: :include:{inc}\n",
                 allow_mail_to_commands=("alias", "forward", "include"), allow_mail_to_files=("include",))
    nobody = pwd.getpwnam("nobody")
    os.chown(inc, nobody.pw_uid, nobody.pw_gid)
    assert e.expand("list@example.test") == [Command("/usr/bin/filter", "list@example.test", "include", "nobody"),
                                               File("/var/spool/archive", "list@example.test", "include", "nobody")]
    os.chown(inc, 0, 0)
    assert e.expand("list@example.test") == [Command("/usr/bin/filter", "list@example.test", "include"),
                                               File("/var/spool/archive", "list@example.test", "include")]
    unnamed = next(uid for uid in range(54321, 54421) if uid not in {p.pw_uid for p in pwd.getpwall()})
    os.chown(inc, unnamed, unnamed)
    warnings: list[str] = []
    with pytest.raises(TemporaryError) as excinfo:
        e.expand("list@example.test", warn=warnings.append)
    assert temporary(excinfo, "4.3.5")
    assert warnings == [f"cannot find username for uid {unnamed}", f"{inc}: cannot find :include: file owner username"]


def test_a_list_with_an_owner_alias_resubmits_from_the_owner(tmp_path):
    """local(8): the owner-list alias makes owner-list@myorigin the sender of everything the list sends on,
    and its local members new messages (`\\bob` too: it is `bob`); a plain alias delivers its local members
    directly."""
    e = expander(tmp_path, "list: alice, \\bob, dave@remote.test\nowner-list: carol\nplain: alice, dave@remote.test\n")
    assert e.expand("list@example.test") == [Forward("alice@example.test", "owner-list@example.test"),
                                              Forward("bob@example.test", "owner-list@example.test"),
                                              Forward("dave@remote.test", "owner-list@example.test")]
    assert e.expand("plain@example.test") == [mailbox("alice"), Forward("dave@remote.test")]


def test_a_lists_commands_and_files_get_its_owner_as_the_sender(tmp_path):
    """local(8) replaces the sender for the whole expansion of a list with an owner- alias: its commands and
    files too (an alias without one keeps the message's)."""
    e = expander(tmp_path, "list: |/usr/bin/archiver, /var/spool/list.mbox\nowner-list: carol\n"
                           "plain: |/usr/bin/archiver\n")
    assert e.expand("list@example.test") == [
        Command("/usr/bin/archiver", "list@example.test", "alias", sender="owner-list@example.test"),
        File("/var/spool/list.mbox", "list@example.test", "alias", sender="owner-list@example.test")]
    assert e.expand("plain@example.test") == [Command("/usr/bin/archiver", "plain@example.test", "alias")]


def test_an_include_file_that_includes_itself_is_read_once(tmp_path):
    """local(8) skips an :include: file it has expanded already (its duplicate filter); a file that includes
    itself used to nest to INCLUDE_DEPTH and defer 4.6.0 at every attempt."""
    inc = tmp_path / "list.include"
    inc.write_text(f"bob@remote.test\n:include:{inc}\n")
    assert expander(tmp_path, f"list: :include:{inc}\n").expand("list@example.test") == [Forward("bob@remote.test")]


@pytest.mark.skipif(os.geteuid() != 0, reason="reading with a user's rights needs root")
def test_as_root_an_include_file_is_read_once_per_rights_it_is_named_with(tmp_path):
    """local(8)'s include.c filters duplicates on "include UID PATH": a nobody-owned file named in a root alias (its
    commands run as nobody) and again in daemon's .forward (there as daemon) is read twice, its command run as each
    of them; keyed on the path alone, daemon's run was lost."""
    top = Path(tempfile.mkdtemp(prefix="mailflow-include-"))  # (tmp_path's parents are root's 0700: not for daemon)
    try:
        top.chmod(0o755)
        inc = top / "list.include"
        inc.write_text("|/usr/bin/log\n")
        nobody, daemon = pwd.getpwnam("nobody"), pwd.getpwnam("daemon")
        os.chown(inc, nobody.pw_uid, nobody.pw_gid)
        home = top / "mail" / "daemon"
        home.mkdir(parents=True)
        (top / "mail").chmod(0o755)
        home.chmod(0o755)
        (home / ".forward").write_text(f":include:{inc}\n")
        os.chown(home / ".forward", daemon.pw_uid, daemon.pw_gid)
        (top / "users").write_text("daemon daemon\n")
        (top / "aliases").write_text(f"a: :include:{inc}, daemon\n")
        config = Config(myhostname="mx.example.test", myorigin="example.test", mydestination=("example.test",),
                        local_recipient_maps=(f"texthash:{top / 'users'}",),
                        alias_maps=(f"texthash:{top / 'aliases'}",),
                        local={"maildir_base": str(top / "mail"),
                               "allow_mail_to_commands": ("alias", "forward", "include")})
        leaves = LocalExpander(config, Rewriter(config)).expand("a@example.test")
    finally:
        shutil.rmtree(top)
    assert sorted((leaf.command, leaf.rights) for leaf in leaves if isinstance(leaf, Command)) == [
        ("/usr/bin/log", "daemon"), ("/usr/bin/log", "nobody")]


def test_a_world_writable_include_file_is_4_3_0(tmp_path):
    """Anyone could name its members (local(8) refuses it too, ":include: file … is world writable")."""
    inc = include_file(tmp_path, "bob@remote.test\n")
    inc.chmod(0o666)
    with pytest.raises(TemporaryError) as excinfo:
        expander(tmp_path, f"list: :include:{inc}\n").expand("list@example.test")
    assert temporary(excinfo, "4.3.0") and "world writable" in excinfo.value.text


def test_missing_include_file_is_4_3_0(tmp_path):
    e = expander(tmp_path, f"list: :include:{tmp_path / 'missing'}\n")
    with pytest.raises(TemporaryError) as excinfo:
        e.expand("list@example.test")
    assert temporary(excinfo, "4.3.0")


# ------------------------------------------------------------------------------------- loops and duplicates


def test_address_in_delivered_to_is_a_forwarding_loop(tmp_path):
    [leaf] = expander(tmp_path).expand("alice@example.test", delivered_to=frozenset({"Alice@Example.test"}))
    assert isinstance(leaf, Refused)
    assert (leaf.address, leaf.dsn) == ("alice@example.test", "5.4.6")


def test_delivered_to_loop_inside_an_alias_refuses_that_branch_only(tmp_path):
    e = expander(tmp_path, "team: alice, bob\n")
    leaves = e.expand("team@example.test", delivered_to=frozenset({"alice@example.test"}))
    assert [(type(x), x.address) for x in leaves] == [(Refused, "alice@example.test"), (Mailbox, "bob@example.test")]
    assert leaves[0].dsn == "5.4.6"


def test_delivered_to_naming_the_alias_itself(tmp_path):
    [leaf] = expander(tmp_path, "team: alice, bob\n").expand("team@example.test",
                                                             delivered_to=frozenset({"team@example.test"}))
    assert (type(leaf), leaf.dsn) == (Refused, "5.4.6")


def test_duplicate_leaves_are_dropped(tmp_path):
    e = expander(tmp_path, "team: alice, bob, alice, staff, x@remote.test\nstaff: bob, x@remote.test\n")
    assert e.expand("team@example.test") == [mailbox("alice"), mailbox("bob"), Forward("x@remote.test")]


def test_a_mailbox_gets_a_copy_per_local_part_with_its_extension(tmp_path):
    """local(8)'s duplicate filter keys a mailbox by the local part, its extension included."""
    e = expander(tmp_path, "team: alice, alice+x, Alice, ALICE+X, alice+y\n")
    assert e.expand("team@example.test") == [mailbox("alice"), mailbox("alice", "alice+x@example.test"),
                                              mailbox("alice", "alice+y@example.test")]


def test_duplicate_leaves_differing_only_in_case_are_dropped(tmp_path):
    e = expander(tmp_path, "team: alice, Alice\n")
    assert [x.user for x in e.expand("team@example.test") if isinstance(x, Mailbox)] == ["alice"]


def test_a_command_runs_once_per_alias_that_names_it(tmp_path):
    """local(8)'s duplicate filter keys a command by the user whose expansion names it (the alias name) and the
    rights: named by two aliases it runs twice, named twice by one once."""
    e = expander(tmp_path, "team: |/usr/bin/log, staff, |/usr/bin/log\nstaff: |/usr/bin/log\n")
    assert e.expand("team@example.test") == [Command("/usr/bin/log", "team@example.test", "alias"),
                                              Command("/usr/bin/log", "staff@example.test", "alias")]


def test_a_file_is_written_once_where_it_is_met_first(tmp_path):
    """local(8) keys a file by its path and rights before it judges the restriction (file.c): allowed first, the
    same file restricted later in an :include: adds nothing; restricted first, it is not written later."""
    inc = include_file(tmp_path, "/var/spool/archive\n")
    e = expander(tmp_path, f"first: /var/spool/archive, :include:{inc}\nlater: :include:{inc}, /var/spool/archive\n")
    assert e.expand("first@example.test") == [File("/var/spool/archive", "first@example.test", "alias")]
    assert e.expand("later@example.test") == [Refused("later@example.test", "5.7.1", "mail to file is restricted")]


# ------------------------------------------------------------------------------------------ homes and paths


def test_home_is_under_maildir_base(tmp_path):
    assert expander(tmp_path).home("alice") == tmp_path / "mail" / "alice"


def test_empty_local_recipient_maps_make_anyone_local(tmp_path):
    assert expander(tmp_path, local_recipient_maps=()).expand("zed@example.test") == [mailbox("zed")]


def test_local_part_with_a_path_does_not_reach_outside_maildir_base(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".forward").write_text("stolen@remote.test\n")
    leaves = expander(tmp_path, local_recipient_maps=()).expand(f"{outside}@example.test")
    assert Forward("stolen@remote.test") not in leaves


def test_a_forward_or_include_file_is_read_up_to_a_bound(tmp_path):
    """A .forward may name a huge file: it is refused past SMALL_FILE_LIMIT (4.3.0); /dev/zero is not even opened
    (tests/unit/test_named_files.py)."""
    small = tmp_path / "small"
    small.write_text("alice\n")
    assert read_small_file(small) == "alice\n"
    huge = tmp_path / "huge"
    huge.write_bytes(b"alice\n" * (SMALL_FILE_LIMIT // 6 + 1))
    with pytest.raises(TemporaryError, match=f"larger than {SMALL_FILE_LIMIT} bytes"):
        read_small_file(huge)
    assert SMALL_FILE_LIMIT >= 100_000


def test_how_the_recipient_itself_was_expanded_is_told_for_its_success_notice(tmp_path):
    """local(8) reports an alias or a .forward as "expanded" (a list with an owner- alias: "delivered"); a
    user's own mailbox is no expansion, nor is an alias met below the recipient."""
    forward_file(tmp_path, "bob", "bob@remote.test\n")
    e = expander(tmp_path, "team: alice\nlist: alice\nowner-list: carol\nalice2: team\n")
    kinds = {a: e.expand_recipient(f"{a}@example.test")[1] for a in ("team", "list", "bob", "alice", "alice2")}
    assert kinds == {"team": "alias", "list": "list", "bob": "alias", "alice": "", "alice2": "alias"}


def test_addresses_visited_again_under_each_list_count_against_the_work_limit(tmp_path, monkeypatch):
    """`all: l1..ln` with each li `u1..un` visits n*n addresses for n leaves kept (each uj met again at the nesting
    level it was met at is passed over, as local(8)'s duplicate filter does, but the visit is work). Past
    EXPANSION_WORK_LIMIT visits the recipient defers 4.6.0 (a runaway bounded by work, not by the leaves kept); one
    list of as many members stays within it."""
    n = 20
    users = [f"u{i}" for i in range(n)]
    (tmp_path / "users").write_text("".join(f"{u} {u}\n" for u in users))
    members = ", ".join(users)
    lists = "".join(f"l{i}: {members}\n" for i in range(n))
    e = expander(tmp_path, f"all: {', '.join(f'l{i}' for i in range(n))}\n{lists}plain: {members}\n",
                 local_recipient_maps=(f"texthash:{tmp_path / 'users'}",))
    assert e.expand("all@example.test") == [mailbox(u) for u in users]
    monkeypatch.setattr(aliasing, "EXPANSION_WORK_LIMIT", 10 * n)
    with pytest.raises(TemporaryError) as excinfo:
        e.expand("all@example.test")
    assert temporary(excinfo, "4.6.0")
    assert "visited more than 200 addresses" in str(excinfo.value)
    assert e.expand("plain@example.test") == [mailbox(u) for u in users]


def test_visits_that_add_no_leaf_count_against_the_event_loops_budget(tmp_path, monkeypatch):
    """`a: b1..bn`, each bi `ghost x n` visits n*n addresses for one leaf (the unknown user, refused once; met
    again at its nesting level it is passed over, but the visit is work): with a `leaf_budget` (the on-loop pass)
    the expansion stops after INLINE_VISITS_PER_LEAF times it with ExpansionTooBig, for the agent to make it again
    in a worker thread (n=1000 walked 1M visits, 24 s, on the event loop)."""
    n, budget = 30, 10
    lists = "".join(f"b{i}: {', '.join(['ghost'] * n)}\n" for i in range(n))
    e = expander(tmp_path, f"a: {', '.join(f'b{i}' for i in range(n))}\n{lists}")
    visits = []
    counted = aliasing._Expansion.visited
    monkeypatch.setattr(aliasing._Expansion, "visited", lambda state: (visits.append(1), counted(state))[1])
    with pytest.raises(aliasing.ExpansionTooBig):
        e.expand_recipient("a@example.test", leaf_budget=budget)
    assert len(visits) == aliasing.INLINE_VISITS_PER_LEAF * budget + 1
    visits.clear()
    [refused] = e.expand("a@example.test")  # (off the loop: no budget, the whole walk)
    assert isinstance(refused, Refused) and refused.address == "ghost@example.test"
    assert len(visits) == 1 + n + n * n + 1  # (and the one leaf met)


def test_remote_members_met_on_each_line_of_a_forward_are_work_and_kept_once(tmp_path, monkeypatch):
    """A .forward naming `big+N` on each of its lines, `big` with many remote members: each member met is work
    against EXPANSION_WORK_LIMIT (they never visit: 1 000 lines of 2 000 such members made 2 000 000 places, 31 s
    and +645 MB), and a Forward is kept at its first place only (forwards are sent only when nothing defers)."""
    lines, members = 20, 50
    forward_file(tmp_path, "alice", "".join(f"big+{i}\n" for i in range(lines)))
    e = expander(tmp_path, "big: " + ", ".join(f"m{i}@remote.test" for i in range(members)) + "\n")
    met, _ = e.expand_recipient("alice@example.test")
    assert len(met) == members and all(isinstance(m.leaf, Forward) for m in met)
    monkeypatch.setattr(aliasing, "EXPANSION_WORK_LIMIT", lines * members // 2)
    with pytest.raises(TemporaryError) as excinfo:
        e.expand_recipient("alice@example.test")
    assert temporary(excinfo, "4.6.0")


def test_a_destination_is_met_at_each_place_until_one_outside_any_file(tmp_path):
    """A destination named again is met again at its place (file, line), for the agent to settle its key at the
    first place it gets to; once named outside any file (never stopped) it is met no more, nor twice at one place;
    one leaf shared while it stays the same. (The places kept are bounded by EXPANSION_LIMIT, the names met by
    EXPANSION_WORK_LIMIT, not linear in them: a file naming a list on each line meets its members on each.)"""
    inc = include_file(tmp_path, "|/usr/bin/log, |/usr/bin/log\n|/usr/bin/log\n")
    e = expander(tmp_path, f"list: :include:{inc}, |/usr/bin/log, :include:{inc}, |/usr/bin/log\n",
                 allow_mail_to_commands=("alias", "include"))
    met, _ = e.expand_recipient("list@example.test")
    assert [m.place for m in met] == [((1, 0),), ((1, 1),), ()]
    assert met[0].leaf is met[1].leaf and met[2].leaf.source == "alias" and len({m.key for m in met}) == 1


def test_an_address_two_lists_name_is_resubmitted_once_from_the_first_lists_owner(tmp_path):
    """local(8)'s deliver_indirect keys its duplicate filter by the address alone: a member two lists name (in any
    case) is resubmitted once, with the sender of the first list that names it (seed 7045)."""
    e = expander(tmp_path, "both: one, two\none: x@remote.test\nowner-one: carol\n"
                           "two: X@remote.test\nowner-two: dave\n")
    assert e.expand("both@example.test") == [Forward("x@remote.test", "owner-one@example.test")]


def test_an_address_past_local8s_nesting_limit_bounces_as_an_alias_database_loop(tmp_path):
    """Each alias's members are 4 levels below it (from 1): local(8)'s deliver_alias bounces any address met past
    level 98, alias or not, "alias database loop for NAME", so a chain of 25 aliases ends at c25; one shorter
    reaches the mailbox."""
    chain = "".join(f"c{i}: c{i + 1}\n" for i in range(25)) + "c25: alice\nshort: c20\n"
    e = expander(tmp_path, chain)
    assert e.expand("c0@example.test") == [Refused("c25@example.test", "5.4.6", "alias database loop for c25")]
    assert e.expand("short@example.test") == [mailbox("alice")]

"""The account database: password hashes both sides read, the changes `mailflow account` makes (and refuses), the
`accounts:PATH#MAP` tables (what each map answers, how soon a change is seen, what a broken file gives), and the
command line's exit codes and JSON."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tracemalloc
import pytest
from typer.testing import CliRunner

from mailflow.accounts.database import AccountDatabase, AccountError, check_password, parse_size
from mailflow.accounts.dovecot import DovecotSettings, render_sql
from mailflow.cli import app
from mailflow.clock import VirtualClock
from mailflow.config import Config
from mailflow.errors import ConfigError, LookupRetry
from mailflow.passwords import (ARGON2_MAX_MEMORY, argon2id_password, hash_password, verify_password)
from mailflow.routing.router import Router
from mailflow.tables import open_table
from mailflow.tables.accounts import CHECK_INTERVAL, KEPT_LIMIT

# ---------------------------------------------------------------------------------------------- passwords


def test_argon2id_with_dovecots_prefix_and_scrypt_both_verify():
    stored = argon2id_password("pässword")
    assert stored.startswith("{ARGON2ID}$argon2id$v=19$m=19456,t=2,p=1$")
    assert verify_password("pässword".encode(), stored)
    assert not verify_password(b"password", stored)
    assert verify_password(b"p\xc3\xa4ssword", stored.removeprefix("{ARGON2ID}"))  # the bare PHC string too
    assert verify_password(b"x", hash_password("x", n=1024))  # existing $scrypt$ entries keep working
    assert not verify_password(b"x", stored.replace("{ARGON2ID}$argon2id", "{ARGON2ID}$argon2i"))


def test_hostile_or_unknown_hashes_never_match():
    stored = argon2id_password("x")
    greedy = stored.replace("m=19456", f"m={ARGON2_MAX_MEMORY * 2}")
    assert not verify_password(b"x", greedy)  # refused before any memory is taken
    for junk in ("{PLAIN}x", "x", "{SHA512-CRYPT}$6$abc$def", "$argon2id$garbage", "", None):
        assert not verify_password(b"x", junk)
    assert not verify_password(b"x", None, dummy=stored)  # a missing user costs a real check, and fails


def test_weak_passwords_and_sizes():
    assert check_password("short", "alice@example.test", 8).startswith("too short")
    assert check_password("Alice@Example.test", "alice@example.test", 8) == "the same as the address"
    assert check_password("alicealice", "alicealice@example.test", 8) == "the same as the address"
    assert "NUL" in check_password("good password\0", "a@b.test", 8)
    # standard input's bytes that are no UTF-8 arrive as surrogates (surrogateescape): encoding them failed
    assert check_password("caf\udce9 latte", "a@b.test", 8) == "not UTF-8 text (AUTH PLAIN carries UTF-8)"
    assert check_password("a long passphrase", "alice@example.test", 8) is None
    assert [parse_size(s) for s in ("0", "2048", "2K", "500M", "1G", "1GiB")] == [0, 2048, 2048, 500 << 20, 1 << 30,
                                                                                  1 << 30]
    for not_a_size in ("lots", "\u00b2M", "\u0661\u0660"):  # (`²` passes str.isdigit and int() refuses it)
        with pytest.raises(AccountError) as e:
            parse_size(not_a_size)
        assert e.value.code == 2
    assert parse_size(str((1 << 63) - 1)) == (1 << 63) - 1
    for too_big in (str(1 << 63), "99999999999T"):  # past SQLite's INTEGER: an OverflowError when stored
        with pytest.raises(AccountError, match="too big") as e:
            parse_size(too_big)
        assert e.value.code == 2


# ---------------------------------------------------------------------------------------------- the database


@pytest.fixture
def db(tmp_path):
    database = AccountDatabase.open(tmp_path / "accounts.db", create=True)
    database.add_domain("Example.TEST")
    yield database
    database.close()


def refused(fn, *args, **kwargs) -> tuple[int, str]:
    with pytest.raises(AccountError) as e:
        fn(*args, **kwargs)
    return e.value.code, e.value.message


def test_changes_and_their_refusals(db, tmp_path):
    alice = db.add_user("Alice@example.test", "correct horse", quota=1000)
    assert (alice.address, alice.home, alice.quota, alice.enabled) == ("alice@example.test", "example.test/alice",
                                                                       1000, True)
    assert refused(db.add_user, "alice@example.test", "another one") == (1, "user alice@example.test exists already")
    assert refused(db.add_user, "bob@elsewhere.test", "a password")[1].startswith("unknown domain elsewhere.test")
    assert refused(db.add_user, "not an address", "a password")[0] == 2
    assert refused(db.add_user, ".hidden@example.test", "a password")[0] == 2  # cannot be a mailbox directory
    assert refused(db.add_domain, "example.test") == (1, "domain example.test exists already")
    db.add_alias("@example.test", ["alice@example.test"])
    assert refused(db.remove_domain, "example.test")[1].startswith("domain example.test still has 1 mailbox(es)")
    assert refused(db.set_password, "nobody@example.test", "whatever1") == (1, "no such user: nobody@example.test")
    assert refused(db.remove_alias, "sales@example.test")[0] == 1
    assert refused(db.add_sender, "nobody@example.test", "sales@example.test")[0] == 1
    assert db.set_enabled("alice@example.test", False).enabled is False
    assert db.set_quota("alice@example.test", 0).quota == 0
    assert (tmp_path / "accounts.db").stat().st_mode & 0o777 == 0o640
    assert refused(AccountDatabase.open, tmp_path / "other.db")[1].startswith("no account database at")
    (tmp_path / "foreign.db").write_bytes(b"")
    sqlite3.connect(tmp_path / "foreign.db").execute("CREATE TABLE t (x)").connection.close()
    assert "not an account database" in refused(AccountDatabase.open, tmp_path / "foreign.db")[1]


def test_each_map_answers_as_the_routing_stages_ask(db, tmp_path):
    db.add_user("alice@example.test", "correct horse", quota=5000)
    db.add_user("bob@example.test", "battery staple")
    db.set_enabled("bob@example.test", False)
    db.add_alias("sales@example.test", ["alice@example.test", "Carol@Remote.test"])
    db.add_alias("@example.test", ["alice@example.test"])
    db.add_sender("alice@example.test", "sales@example.test")

    def ask(map_name: str, key: str):
        return open_table(f"accounts:{tmp_path / 'accounts.db'}#{map_name}").lookup(key)

    assert ask("domains", "EXAMPLE.test") == "example.test" and ask("domains", "other.test") is None
    assert ask("mailboxes", "alice@example.test") == "example.test/alice/Maildir/"
    assert ask("mailboxes", "bob@example.test") == "example.test/bob/Maildir/"  # disabled: mail still arrives
    assert ask("passwords", "alice@example.test").startswith("{ARGON2ID}")
    assert ask("passwords", "bob@example.test") is None  # disabled: no login
    assert ask("aliases", "sales@example.test") == "alice@example.test, carol@remote.test"
    assert ask("aliases", "@example.test") == "alice@example.test"
    assert ask("aliases", "bob@example.test") == "bob@example.test"  # the catch-all does not swallow a mailbox
    assert ask("senders", "sales@example.test") == "alice@example.test"
    assert ask("senders", "alice@example.test") == "alice@example.test"  # a mailbox owns its address
    assert ask("quotas", "alice@example.test") == "5000" and ask("quotas", "bob@example.test") is None


def test_the_router_routes_hosted_domains_from_the_database(db, tmp_path):
    db.add_user("alice@example.test", "correct horse")
    db.add_alias("@example.test", ["alice@example.test"])
    path = tmp_path / "accounts.db"
    config = Config(virtual_mailbox_domains=(f"accounts:{path}#domains",),
                    virtual_mailbox_maps=(f"accounts:{path}#mailboxes",),
                    virtual_alias_maps=(f"accounts:{path}#aliases",))
    router = Router(config)
    assert [(r.address, r.transport) for r in router.route("whoever@example.test")] == [
        ("alice@example.test", "virtual")]
    assert router.recipient_verdict("alice+tag@example.test") == "accepted (canonical or virtual alias maps list it)"
    assert router.rewriter.virtual_mailbox("alice@example.test") == "example.test/alice/Maildir/"


def test_a_change_is_seen_within_the_check_interval_and_never_later(db, tmp_path):
    clock = VirtualClock()
    table = open_table(f"accounts:{tmp_path / 'accounts.db'}#passwords", clock=clock.time)
    assert table.lookup("alice@example.test") is None
    db.add_user("alice@example.test", "correct horse")
    assert table.lookup("alice@example.test") is None  # the kept answer, within the interval
    clock.advance(CHECK_INTERVAL)
    first = table.lookup("alice@example.test")
    assert first is not None
    db.set_password("alice@example.test", "a new password")
    clock.advance(CHECK_INTERVAL)
    assert table.lookup("alice@example.test") not in (None, first)
    db.remove_user("alice@example.test")
    clock.advance(CHECK_INTERVAL)
    assert table.lookup("alice@example.test") is None


def test_a_missing_replaced_or_foreign_database(db, tmp_path):
    clock = VirtualClock()
    path = tmp_path / "accounts.db"
    table = open_table(f"accounts:{path}#domains", clock=clock.time)
    assert table.lookup("example.test") == "example.test"
    shutil.copy(path, tmp_path / "copy.db")
    other = AccountDatabase.open(tmp_path / "copy.db")
    other.add_domain("new.test")
    other.close()
    os.replace(tmp_path / "copy.db", path)  # a restored backup: another file at the same path
    clock.advance(CHECK_INTERVAL)
    assert table.lookup("new.test") == "new.test"
    path.unlink()
    clock.advance(CHECK_INTERVAL)
    table.load()  # a server starts (TableCache.preload) whether or not the database can be read
    with pytest.raises(LookupRetry, match="account database"):
        table.lookup("example.test")
    with pytest.raises(LookupRetry):  # answered again without touching the file until the interval passed
        table.lookup("example.test")
    with pytest.raises(ConfigError, match="unknown account map"):
        open_table(f"accounts:{path}#users")
    with pytest.raises(ConfigError, match="accounts:PATH#MAP"):
        open_table(f"accounts:{path}")


def test_dovecots_queries_run_on_the_database(db, tmp_path):
    db.add_user("alice@example.test", "correct horse", quota=1 << 20)
    settings = DovecotSettings(database=tmp_path / "accounts.db", mail_base=tmp_path / "v'mail", uid=5000,
                               gid=5000, sql_file=tmp_path / "sql", ssl_cert="c", ssl_key="k")
    queries = dict(line.split(" = ", 1) for line in render_sql(settings).splitlines() if " = " in line)
    conn = sqlite3.connect(tmp_path / "accounts.db")
    user = conn.execute(queries["user_query"].replace("%u", "alice@example.test")).fetchone()
    assert user == (f"{tmp_path}/v'mail/example.test/alice", 5000, 5000, "*:bytes=1048576")
    password = conn.execute(queries["password_query"].replace("%u", "alice@example.test")).fetchone()
    assert password[0] == "alice@example.test" and password[1].startswith("{ARGON2ID}")


# ---------------------------------------------------------------------------------------------- the command line


def account(tmp_path, *args: str, stdin: str = ""):
    """`mailflow account ARGS --database cli.db`, in this process (typer's runner): exit_code, stdout, stderr."""
    result = CliRunner().invoke(app, ["account", *args, "--database", str(tmp_path / "cli.db")], input=stdin)
    result.returncode = result.exit_code
    return result


def test_the_command_line_exit_codes_and_json(tmp_path):
    assert account(tmp_path, "domain", "list").returncode == 1  # no database yet
    assert account(tmp_path, "domain", "add", "example.test").returncode == 0
    weak = account(tmp_path, "user", "add", "alice@example.test", "--password-stdin", stdin="short\n")
    assert (weak.returncode, weak.stderr.strip()) == (2, "mailflow account: password for alice@example.test "
                                                         "refused: too short: at least 8 characters")
    added = account(tmp_path, "user", "add", "alice@example.test", "--quota", "1M", "--password-stdin", "--json",
                    stdin="long enough\n")
    assert added.returncode == 0 and json.loads(added.stdout)["quota"] == 1 << 20
    duplicate = account(tmp_path, "user", "add", "alice@example.test", "--password-stdin", "--json",
                        stdin="long enough\n")
    assert duplicate.returncode == 1
    assert json.loads(duplicate.stderr) == {"error": "user alice@example.test exists already", "code": 1}
    assert account(tmp_path, "user", "add", "bob@other.test", "--password-stdin", stdin="x" * 9).returncode == 1
    listed = json.loads(account(tmp_path, "user", "list", "--json").stdout)
    assert [u["address"] for u in listed] == ["alice@example.test"]
    assert account(tmp_path, "user", "passwd", "nobody@example.test", "--password-stdin",
                   stdin="long enough\n").returncode == 1
    assert account(tmp_path, "alias", "add", "@example.test", "alice@example.test").returncode == 0
    assert account(tmp_path, "user", "quota", "alice@example.test", "lots").returncode == 2


@pytest.mark.parametrize("map_name, key", [
    ("mailboxes", lambda i: f"{i:08d}{'x' * 232}@example.test"),  # 254 bytes: the longest smtpd lets through
    ("mailboxes", lambda i: f"{i:08d}{'x' * 228}\U0001F600@example.test"),  # 254 UTF-8 bytes (SMTPUTF8)
    ("passwords", lambda i: f"{i:08d}" + "\U0001F600" * 248),  # a 256-character AUTH login
], ids=["ascii-address", "utf8-address", "utf8-login"])
def test_the_kept_answers_are_bounded_in_the_bytes_they_take(db, tmp_path, map_name, key):
    """Clients choose the keys: an address of up to 254 UTF-8 bytes, an AUTH login of up to 256 characters. Counted
    in characters, 100 000 such keys with an emoji in each held up to 52 MiB (addresses) and 82 MiB (logins) in a
    table of KEPT_LIMIT (16 MiB): a string with one emoji takes 4 bytes a character, and SQLite's binding leaves a
    UTF-8 copy in it. At its peak, what the table holds stays within KEPT_LIMIT."""
    table = open_table(f"accounts:{tmp_path / 'accounts.db'}#{map_name}", clock=VirtualClock().time)
    assert table.lookup("warm@example.test") is None  # (the connection and its statements are no answers)
    tracemalloc.start()
    try:
        for i in range(25_000):
            assert table.lookup(key(i)) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < KEPT_LIMIT * 1.1
    assert table.lookup(key(0)) is None  # (still answers, and keeps again)

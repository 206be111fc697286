"""Files the operator or a user names that are no regular files (a FIFO, /dev/zero, a directory): each place that
reads one ends at once with an error naming the file and the reason, never waits at open() or reads without end.

Postfix 3.7.11 waits for ever on the analogues (`postmap -q k texthash:FIFO`, `cidr:FIFO`, `regexp:FIFO`,
`texthash:/dev/zero` all still running after 5 s); mailflow refuses them (mailflow.files). Each call here runs in a
worker thread given BOUND seconds; one that is still waiting then is released (the FIFO opened for writing and
closed) and the test fails, so a regression fails instead of hanging the suite.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest

from mailflow.accounts.database import AccountDatabase, AccountError
from mailflow.admin.access import read_tokens
from mailflow.config import load_config
from mailflow import files as named_files
from mailflow.errors import ConfigError, LookupRetry, TemporaryError
from mailflow.files import (TABLE_LIMIT, TEXT_LIMIT, FileTooLarge, RefusedFile, check_regular_file,
                            read_regular_file)
from mailflow.routing.srs import srs_from_config
from mailflow.signing.keytables import KeyTable, SigningTable
from mailflow.stages.smtpd.tls import TlsError, build_context
from mailflow.tables.spec import open_table
from mailflow.transports.local.aliasing import read_forward, read_small_file
from mailflow.transports.smtp.mtasts import FetchError, HttpsPolicyFetcher
from mailflow.transports.smtp.tls import TlsContexts, TlsUnavailable
from tests.unit.test_aliasing import expander

BOUND = 5.0  # seconds: a refusal takes microseconds


def bounded(call, *fifos: Path):
    """call() in a thread; its result, or the exception it raised. Fails the test when it is still waiting after
    BOUND seconds (after releasing it: each FIFO opened for writing and closed, an end of file for its reader)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            outcome["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(BOUND)
    if worker.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        worker.join(BOUND)
        pytest.fail(f"still waiting after {BOUND}s: a FIFO or a device was opened or read")
    if "error" in outcome:
        return outcome["error"]
    return outcome["value"]


def refused(call, *fifos: Path) -> BaseException:
    outcome = bounded(call, *fifos)
    assert isinstance(outcome, BaseException), f"accepted: {outcome!r}"
    return outcome


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def special_files(tmp_path: Path) -> list[tuple[Path, str]]:
    """(a file that is none, the kind the error names): a FIFO, /dev/zero, a directory."""
    fifo = tmp_path / "named-pipe"
    os.mkfifo(fifo)
    return [(fifo, "is a FIFO"), (Path("/dev/zero"), "is a character device"), (tmp_path, "is a directory")]


# ---------------------------------------------------------------------------------------------- the helper


def test_a_regular_file_is_read_and_anything_else_refused_at_once(tmp_path):
    regular = tmp_path / "regular"
    regular.write_bytes(b"key value\n")
    assert read_regular_file(regular, 100) == b"key value\n"
    check_regular_file(regular, 100)
    for path, kind in special_files(tmp_path):
        for call in (read_regular_file, check_regular_file):
            error = refused(lambda: call(path, 1 << 20), path)
            assert isinstance(error, RefusedFile) and not isinstance(error, FileTooLarge)
            assert error.strerror == f"{kind}, not a regular file" and error.filename == str(path)
    error = refused(lambda: read_regular_file(regular, 5))
    assert isinstance(error, FileTooLarge) and error.strerror == "larger than 5 bytes"
    assert isinstance(refused(lambda: read_regular_file(tmp_path / "missing", 5)), FileNotFoundError)


def test_a_symbolic_link_to_a_regular_file_is_followed_and_one_to_a_fifo_refused(tmp_path, fifo):
    (tmp_path / "target").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    assert read_regular_file(tmp_path / "link", 10) == b"x"
    (tmp_path / "to-fifo").symlink_to(fifo)
    assert refused(lambda: read_regular_file(tmp_path / "to-fifo", 10), fifo).strerror == \
        "is a FIFO, not a regular file"


# ---------------------------------------------------------------------------------------------- configuration


def test_a_small_file_is_read_without_allocating_the_limit(tmp_path):
    """A read asks for the file's size and a byte more, not the limit: reading a small table cost 64 MB (the
    TABLE_LIMIT) of memory at every reload, an :include: or a .forward 1 MB at every delivery."""
    small = tmp_path / "small"
    small.write_bytes(b"key value\n")
    for read, expected in ((lambda: read_regular_file(small, TABLE_LIMIT), b"key value\n"),
                           (lambda: read_small_file(small), "key value\n"),
                           (lambda: read_forward(small, (os.geteuid(),)), b"Fkey value\n")):
        tracemalloc.start()
        try:
            assert read() == expected
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 256 << 10, peak


def test_a_table_is_looked_at_by_name_once_before_it_is_opened(tmp_path, monkeypatch):
    """A table, for which /dev/null is an empty one, was stat()ed twice before it was opened (is it /dev/null? is it
    a regular file?): once now, the one result serving both."""
    table = tmp_path / "table"
    table.write_bytes(b"key value\n")
    looked = []
    real = os.stat

    def counted(path, *args, **kwargs):
        looked.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(named_files.os, "stat", counted)
    assert read_regular_file(table, TABLE_LIMIT, null_is_empty=True) == b"key value\n"
    assert looked.count(table) == 1, looked


def test_a_file_longer_than_fstat_says_is_read_whole_and_still_bounded():
    """A regular file may grow between fstat() and the read (or, as /proc's, say 0 bytes): it is read to its end
    in pieces, and refused once past the limit."""
    status = Path("/proc/self/status")
    assert status.stat().st_size == 0
    text = read_regular_file(status, TEXT_LIMIT)
    assert text.startswith(b"Name:") and text.rstrip().splitlines()[-1].startswith(b"nonvoluntary_ctxt_switches")
    error = refused(lambda: read_regular_file(status, 100))
    assert isinstance(error, FileTooLarge) and str(error) == f"{status}: larger than 100 bytes"


def test_the_configuration_file_itself(tmp_path):
    for path, kind in special_files(tmp_path):
        error = refused(lambda: load_config(path), path)
        assert isinstance(error, ConfigError)
        assert (error.file, error.key, error.reason) == (str(path), "", f"cannot read: {kind}, not a regular file")


def test_check_config_names_each_special_file_with_its_setting_and_ends(tmp_path, pki):
    """`mailflow check-config` (a child process, given 30 s) with a FIFO or /dev/zero as table, certificate,
    key table, SRS secret and token file: exit 2, one line each, no traceback."""
    _, cert, _ = pki
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    config = tmp_path / "m.toml"
    config.write_text(f'alias_maps = ["texthash:{fifo}"]\ntransport_maps = ["regexp:/dev/zero"]\n'
                      f'virtual_alias_maps = ["sqlite:{fifo}"]\n'
                      f'[smtpd]\nlisten = ["127.0.0.1:0"]\ntls_cert_file = "{cert}"\ntls_key_file = "/dev/zero"\n'
                      f'[dkim]\nsigning_table = "refile:{fifo}"\nkey_table = "{fifo}"\n'
                      f'[srs]\nenabled = true\ndomain = "fwd.example"\nsecret_file = "{fifo}"\n'
                      f'[admin]\nenable = true\ntoken_file = "/dev/zero"\n')
    result = refused_at_once("check-config", config, "check-config waited on a FIFO or read a device")
    not_regular = "is a FIFO, not a regular file"
    for line in (f"alias_maps: table texthash:{fifo}: cannot read {fifo}: {not_regular}",
                 "transport_maps: table regexp:/dev/zero: cannot read /dev/zero: is a character device, not a regular "
                 "file",
                 f"virtual_alias_maps: cannot read sqlite table config: {not_regular}",
                 "smtpd.tls_cert_file: /dev/zero: cannot read (is a character device, not a regular file)",
                 f"dkim.key_table: cannot read: {not_regular}",
                 f"srs.secret_file: cannot read: {not_regular}",
                 "admin.token_file: cannot read: is a character device, not a regular file"):
        assert line in result.stderr, (line, result.stderr)


def refused_at_once(command: str, config, hung: str) -> subprocess.CompletedProcess:
    """`mailflow COMMAND --config CONFIG`, which must end within 30 s (else the test fails saying `hung`) with
    exit status 2 and no traceback."""
    try:
        result = subprocess.run([sys.executable, "-m", "mailflow", command, "--config", str(config)],
                                capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(hung)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return result


def test_serve_with_a_fifo_for_its_certificate_exits_2_at_once(tmp_path, fifo):
    config = tmp_path / "m.toml"
    config.write_text(f'queue_directory = "{tmp_path / "queue"}"\n'
                      f'[smtpd]\nlisten = ["127.0.0.1:0"]\ntls_cert_file = "{fifo}"\n')
    result = refused_at_once("serve", config, "serve waited on a FIFO named as its certificate")
    assert f"smtpd.tls_cert_file: {fifo}: cannot read (is a FIFO, not a regular file)" in result.stderr


# ---------------------------------------------------------------------------------------------- tables


@pytest.mark.parametrize("kind", ["texthash", "regexp", "accounts"])
def test_a_file_table(tmp_path, kind):
    for path, what in special_files(tmp_path):
        spec = f"{kind}:{path}#mailboxes" if kind == "accounts" else f"{kind}:{path}"
        error = refused(lambda: open_table(spec).lookup("key"), path)
        assert isinstance(error, LookupRetry), error
        assert str(path) in str(error) and f"{what}, not a regular file" in str(error)


@pytest.mark.parametrize("kind", ["texthash", "regexp"])
def test_dev_null_or_a_link_to_it_is_an_empty_table(tmp_path, kind):
    """`texthash:/dev/null` is an empty table, as in Postfix (`postmap -q k texthash:/dev/null` finds nothing and
    succeeds: dict_thash.c opens any file), an alias table too; /dev/zero is still refused above."""
    link = tmp_path / "empty"
    link.symlink_to(os.devnull)
    for path in (os.devnull, link):
        assert bounded(lambda: open_table(f"{kind}:{path}").lookup("key")) is None
        assert bounded(lambda: open_table(f"{kind}:{path}", aliases=True).lookup("postmaster")) is None


def test_dev_null_is_an_empty_dkim_table_and_token_list_but_no_include_file():
    """The DKIM key and signing tables and the admin's token list are tables or lists: /dev/null is an empty one
    (a token list must name one: it says so). An :include: file stays refused, as Postfix's local(8) refuses one that
    is not regular."""
    assert bounded(lambda: SigningTable.load("refile", os.devnull).key_name("a@example.com")) is None
    assert isinstance(bounded(lambda: KeyTable.load(os.devnull)), KeyTable)
    error = refused(lambda: read_tokens(os.devnull))
    assert isinstance(error, ConfigError) and error.reason == "no token in the file", error
    error = refused(lambda: read_small_file(Path(os.devnull)))
    assert isinstance(error, TemporaryError) and "is a character device, not a regular file" in str(error)


def test_an_alias_table(fifo):
    error = refused(lambda: open_table(f"texthash:{fifo}", aliases=True).lookup("postmaster"), fifo)
    assert isinstance(error, LookupRetry) and f"cannot read {fifo}: is a FIFO, not a regular file" in str(error)


def test_a_sqlite_table_its_cf_file_and_its_database(tmp_path, fifo):
    error = refused(lambda: open_table(f"sqlite:{fifo}"), fifo)
    assert isinstance(error, ConfigError) and error.file == str(fifo)
    assert error.reason == "cannot read sqlite table config: is a FIFO, not a regular file"
    cf = tmp_path / "t.cf"
    cf.write_text(f"dbpath = {fifo}\nquery = SELECT v FROM t WHERE k='%s'\n")
    error = refused(lambda: open_table(f"sqlite:{cf}").lookup("key"), fifo)
    assert isinstance(error, LookupRetry)
    assert str(error).endswith(f"database {fifo}: is a FIFO, not a regular file"), error


# ---------------------------------------------------------------------------------------------- keys, secrets, tokens


def test_dkim_key_and_signing_tables_and_a_key_file(tmp_path):
    for path, kind in special_files(tmp_path):
        for load in (lambda: KeyTable.load(str(path)), lambda: SigningTable.load("refile", str(path))):
            error = refused(load, path)
            assert isinstance(error, ConfigError) and error.file == str(path), error
            assert error.reason == f"cannot read: {kind}, not a regular file"
    fifo = tmp_path / "key-fifo"
    os.mkfifo(fifo)
    table = tmp_path / "KeyTable"
    table.write_text(f"k example.com:sel:{fifo}\n")
    error = refused(lambda: KeyTable.load(str(table)), fifo)
    assert isinstance(error, ConfigError) and error.file == str(fifo)
    assert error.reason == "key k: is a FIFO, not a regular file"


def test_the_admin_token_file_and_the_srs_secret_file(tmp_path):
    for path, kind in special_files(tmp_path):
        error = refused(lambda: read_tokens(str(path)), path)
        assert isinstance(error, ConfigError)
        assert (error.file, error.key, error.reason) == (str(path), "admin.token_file",
                                                         f"cannot read: {kind}, not a regular file")
        srs = SimpleNamespace(srs=SimpleNamespace(enabled=True, secret_file=str(path), domain="fwd.example",
                                                  max_age=86400 * 21))
        error = refused(lambda: srs_from_config(srs), path)
        assert isinstance(error, ConfigError)
        assert (error.file, error.key, error.reason) == (str(path), "srs.secret_file",
                                                         f"cannot read: {kind}, not a regular file")


def test_the_account_database(tmp_path):
    for path, kind in special_files(tmp_path):
        error = refused(lambda: AccountDatabase.open(path), path)
        assert isinstance(error, AccountError) and f"account database {path}: {kind}, not a regular file" in \
            str(error), error


# ---------------------------------------------------------------------------------------------- certificates


def test_smtpd_certificate_and_key(tmp_path, pki):
    _, cert, _ = pki
    for path, kind in special_files(tmp_path):
        for files in ((str(path), ""), (cert, str(path))):
            error = refused(lambda: build_context(*files), path)
            assert isinstance(error, TlsError), error
            assert error.reason == f"{path}: cannot read ({kind}, not a regular file)"


def test_smtp_client_ca_certificate_and_key_files_and_the_mta_sts_trust_anchors(tmp_path, pki):
    _, cert, _ = pki
    for path, kind in special_files(tmp_path):
        for contexts in (TlsContexts(ca_file=str(path)), TlsContexts(cert_file=str(path)),
                         TlsContexts(cert_file=cert, key_file=str(path))):
            error = refused(lambda: contexts.for_level("verify"), path)
            assert isinstance(error, TlsUnavailable) and str(error) == f"{path}: {kind}, not a regular file"
        fetcher = HttpsPolicyFetcher(resolver=None, ca_file=str(path))  # type: ignore[arg-type]
        error = refused(fetcher._tls, path)
        assert isinstance(error, FetchError), error
        assert str(error) == f"cannot load the trust anchors {path}: {kind}, not a regular file"  # (the path once)


# ---------------------------------------------------------------------------------------------- local delivery


def test_an_include_file_that_is_no_regular_file_defers_at_once(tmp_path):
    """local(8) refuses a non-regular :include: file ("is not a regular file", include.c: 5.3.5, a bounce);
    mailflow defers it as it defers every :include: it cannot read (4.3.0), without opening it."""
    for path, kind in special_files(tmp_path):
        error = refused(lambda: read_small_file(path), path)
        assert isinstance(error, TemporaryError) and error.dsn == "4.3.0"
        assert error.text == f"cannot read {path}: {kind}, not a regular file"


def test_an_alias_naming_an_include_fifo_defers_the_recipient_at_once(tmp_path, fifo):
    """Through local(8)'s expansion, as a delivery meets it (a .forward's :include: is read the same way)."""
    local = expander(tmp_path, f"list: :include:{fifo}\n")
    error = refused(lambda: local.expand("list@example.test"), fifo)
    assert isinstance(error, TemporaryError) and error.dsn == "4.3.0"
    assert error.text == f"cannot read {fifo}: is a FIFO, not a regular file"

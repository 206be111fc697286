"""The settings sendmail keeps (mailflow/sendmail/settings.py): taken from the cache only for the exact
configuration the server validated, under the same code and directory, from a file only the queue's owner could
write; every doubt takes the full path, whose errors are today's."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mailflow
from mailflow import files as named_files
from mailflow.cli.submit import run_sendmail
from mailflow.config import load_config
from mailflow.config.load import load_source
from mailflow.sendmail import settings as cache
from mailflow.sendmail.settings import (CACHE_NAME, SubmitSettings, cached_settings, remember_settings,
                                        settings_of)

GOOD = """\
myhostname = "mx.example.test"
myorigin = "example.test"
queue_directory = "queue"
header_size_limit = 20000
soft_bounce = true
[sendmail]
authorized_submit_users = ["alice", "!bob", "static:anyone"]
local_login_sender_maps = ["inline:{alice=@example.test}", "texthash:senders"]
[log]
format = "json"
file = "mail.log"
[smtpd]
banner = "ESMTP here"
message_size_limit = 5000
reject_footer = "see $server_name"
discard_ehlo_keywords = ["dsn"]
error_sleep_time = "2s"
"""


@pytest.fixture
def config(tmp_path) -> Path:
    (tmp_path / "queue").mkdir()
    path = tmp_path / "mailflow.toml"
    path.write_text(GOOD)
    return path


def recorded(config: Path) -> Path:
    remember_settings(str(config))
    return config.parent / "queue" / CACHE_NAME


def test_the_cache_gives_what_loading_the_configuration_gives(config):
    """Paths made absolute as load_config makes them, every field as the model has it."""
    assert recorded(config).exists()
    found = cached_settings(str(config))
    assert isinstance(found, SubmitSettings)
    assert found == settings_of(load_config(config))
    assert found.queue_path == config.parent / "queue"
    assert found.sendmail.local_login_sender_maps[1] == f"texthash:{config.parent / 'senders'}"
    assert found.log.file == str(config.parent / "mail.log") and found.smtpd.error_sleep_time == 2.0


def test_the_built_in_defaults_are_never_taken_from_a_record(tmp_path, monkeypatch):
    """Their queue is ./var, whoever's owns the directory sendmail runs in: that owner could write root's settings
    (every part of the key is public). No record is written for them, and one found is not read."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "var").mkdir()
    remember_settings(None)
    assert not (tmp_path / "var" / CACHE_NAME).exists()
    planted = {"format": cache.FORMAT, "key": cache.source_key(None, tmp_path),
               "settings": dataclasses.asdict(settings_of(load_config(None)))}
    (tmp_path / "var" / CACHE_NAME).write_text(json.dumps(planted))
    assert cached_settings(None) is None


def test_no_queue_directory_no_cache(tmp_path):
    path = tmp_path / "mailflow.toml"
    path.write_text(GOOD)
    remember_settings(str(path))  # (the server makes the queue directory: nothing to write into yet)
    assert not (tmp_path / "queue").exists()
    assert cached_settings(str(path)) is None


def test_a_queue_that_cannot_be_looked_at_records_nothing_and_fails_nothing(tmp_path):
    """Recording is best effort: an OSError on the queue (here ENAMETOOLONG, which pathlib's is_dir raises; EACCES
    alike) fails neither check-config nor a reload."""
    path = tmp_path / "mailflow.toml"
    path.write_text(GOOD.replace('queue_directory = "queue"', f'queue_directory = "{"q" * 300}"'))
    assert remember_settings(str(path)).queue_directory.endswith("q" * 300)
    (tmp_path / "senders").write_text("alice alice@example.test\n")
    done = subprocess.run([sys.executable, "-m", "mailflow", "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr and done.stdout.startswith(f"{path}: ok"), done.stderr


@pytest.mark.parametrize("change", [
    pytest.param(lambda text: text + "# a comment\n", id="a comment added"),
    pytest.param(lambda text: text.replace("5000", "6000"), id="a value changed"),
    pytest.param(lambda text: text.replace('"mx.example.test"', "'mx.example.test'"), id="the same value spelt "
                 "otherwise"),
])
def test_a_configuration_changed_by_a_byte_is_not_taken_from_the_cache(config, change):
    recorded(config)
    config.write_text(change(GOOD))
    assert cached_settings(str(config)) is None


def test_another_mailflow_version_is_not_taken_from_the_cache(config, monkeypatch):
    recorded(config)
    monkeypatch.setattr(mailflow, "__version__", mailflow.__version__ + ".1")
    assert cached_settings(str(config)) is None


@pytest.fixture
def package(tmp_path, monkeypatch) -> Path:
    """A stand-in for mailflow's directory, loaded as it is now (LOADED_CODE: a process importing it)."""
    package = tmp_path / "package"
    for name in ("__init__.py", "config/main.py", "syntax.py", "tables/spec.py"):
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text("# code\n")
    monkeypatch.setattr(mailflow, "__file__", str(package / "__init__.py"))
    monkeypatch.setattr(cache, "LOADED_CODE", cache._code_fingerprint())
    return package


@pytest.mark.parametrize("module", ["config/main.py", "syntax.py", "tables/spec.py"])
def test_other_code_is_not_taken_from_the_cache(config, package, monkeypatch, module):
    """An edited module, the configuration's or a leaf its validation uses (an upgrade without a new version
    number, a development install): a sendmail started after it has another key."""
    recorded(config)
    assert cached_settings(str(config)) is not None
    (package / module).write_text("# other code\n")
    monkeypatch.setattr(cache, "LOADED_CODE", cache._code_fingerprint())  # (a sendmail started now)
    assert cached_settings(str(config)) is None


UPGRADING_SERVER = """\
import sys
from pathlib import Path

import mailflow.config
from mailflow.sendmail.settings import remember_settings

main = Path(mailflow.__file__).parent / "config" / "main.py"
assert main.is_relative_to(sys.argv[2]), main  # the copy, never the tree the tests run from
main.write_text(main.read_text().replace("Field(102400, ge=1024)", "Field(102400, ge=50000)"))
remember_settings(sys.argv[1])  # a reload (SIGHUP, `mailflow reload`) after the upgrade
"""


def test_after_an_upgrade_sendmail_gives_the_new_codes_error_until_the_server_restarts(tmp_path):
    """A server running the old code reloads after an upgrade that makes the model refuse its file: the new
    sendmail says the new code's error, as it would without any record (the old server's validation is not
    its own). Real processes, with a copy of mailflow as the installed code."""
    code = tmp_path / "code"
    shutil.copytree(Path(mailflow.__file__).parent, code / "mailflow", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONDONTWRITEBYTECODE": "1"}
    (tmp_path / "queue").mkdir()
    config = tmp_path / "mailflow.toml"
    config.write_text('queue_directory = "queue"\nheader_size_limit = 20000\n')
    # (run in tmp_path: `-c` and `-m` put the current directory first on the path)
    subprocess.run([sys.executable, "-c", UPGRADING_SERVER, str(config), str(code)], env=env, cwd=tmp_path,
                   check=True, timeout=60)
    done = subprocess.run([sys.executable, "-m", "mailflow", "sendmail", "-C", str(config), "-t"], env=env,
                          cwd=tmp_path, input=b"To: a@example.test\n\nhi\n", capture_output=True, timeout=60)
    assert done.returncode == os.EX_CONFIG, done.stderr
    assert done.stderr.decode().startswith(f"mailflow: {config}: header_size_limit: "), done.stderr


def test_an_edit_keeping_size_and_time_of_a_configuration_module_is_other_code(config, package, monkeypatch):
    """(`cp -p`, `rsync -a`: the model's modules are compared by content)"""
    recorded(config)
    module = package / "config/main.py"
    before = module.stat()
    module.write_text("# edoc\n")
    os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))
    monkeypatch.setattr(cache, "LOADED_CODE", cache._code_fingerprint())
    assert cached_settings(str(config)) is None


def another_python(monkeypatch, dependency: Path) -> None:
    monkeypatch.setattr(sys, "version", sys.version + " (patched)")


def another_version_of_a_dependency(monkeypatch, dependency: Path) -> None:
    (dependency.parent / "fakedep-1.0.dist-info").rename(dependency.parent / "fakedep-1.1.dist-info")


def a_dependency_reinstalled(monkeypatch, dependency: Path) -> None:
    os.utime(dependency / "__init__.py", ns=(0, 0))


@pytest.mark.parametrize("change", [another_python, another_version_of_a_dependency, a_dependency_reinstalled])
def test_another_python_or_validation_library_is_other_code(config, tmp_path, monkeypatch, change):
    """Python's version and the installed pydantic and pydantic-core (here a stand-in) are part of the code."""
    dependency = tmp_path / "site" / "fakedep"
    dependency.mkdir(parents=True)
    (dependency / "__init__.py").write_text("")
    (dependency.parent / "fakedep-1.0.dist-info").mkdir()
    monkeypatch.syspath_prepend(str(dependency.parent))
    monkeypatch.setattr(cache, "DEPENDENCIES", ("fakedep", *getattr(cache, "DEPENDENCIES", ())), raising=False)
    monkeypatch.setattr(cache, "LOADED_CODE", cache._code_fingerprint())
    recorded(config)
    assert cached_settings(str(config)) is not None
    change(monkeypatch, dependency)
    monkeypatch.setattr(cache, "LOADED_CODE", cache._code_fingerprint())  # (a sendmail started now)
    assert cached_settings(str(config)) is None


def test_a_server_whose_code_changed_on_disk_records_nothing(config, package):
    """A server reloading after an upgrade (`git pull`, `pip install`) validates with the code it loaded, not the
    code a new sendmail runs: it writes no record, and removes the one it wrote before."""
    record = recorded(config)
    assert record.exists()
    (package / "config/main.py").write_text("# other code\n")
    remember_settings(str(config))
    assert not record.exists()


def test_the_same_bytes_in_another_directory_are_not_taken_from_the_cache(config, tmp_path):
    """Relative paths are taken from the file's directory: the same bytes elsewhere are another configuration,
    even where the queue is named absolutely."""
    text = GOOD.replace('queue_directory = "queue"', f'queue_directory = "{tmp_path / "queue"}"')
    config.write_text(text)
    recorded(config)
    moved = tmp_path / "other" / "mailflow.toml"
    moved.parent.mkdir()
    moved.write_text(text)
    assert cached_settings(str(config)) is not None
    assert cached_settings(str(moved)) is None


def test_the_file_mailflow_config_names_is_the_one_compared(config, tmp_path, monkeypatch, capsys):
    """A user's MAILFLOW_CONFIG naming another file with the same queue gets that file's settings (here: its
    error), never the cache of the server's file."""
    recorded(config)
    mine = tmp_path / "mine.toml"
    mine.write_text(GOOD.replace("header_size_limit = 20000", "header_size_limit = 10"))
    monkeypatch.setenv("MAILFLOW_CONFIG", str(mine))
    assert cached_settings(str(mine)) is None
    assert run_sendmail(["-bs"]) == os.EX_CONFIG
    assert capsys.readouterr().err.startswith(f"mailflow: {mine}: header_size_limit: ")


def corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-20])


def wrong_type(path: Path) -> None:
    data = json.loads(path.read_text())
    data["settings"]["smtpd"]["message_size_limit"] = "5000"
    path.write_text(json.dumps(data))


def extra_field(path: Path) -> None:
    data = json.loads(path.read_text())
    data["settings"]["smtpd"]["something"] = 1
    path.write_text(json.dumps(data))


def missing_field(path: Path) -> None:
    data = json.loads(path.read_text())
    del data["settings"]["sendmail"]["authorized_submit_users"]
    path.write_text(json.dumps(data))


def another_format(path: Path) -> None:
    data = json.loads(path.read_text())
    data["format"] = 2
    path.write_text(json.dumps(data))


def another_queue(path: Path) -> None:
    data = json.loads(path.read_text())
    data["settings"]["queue_directory"] = "/elsewhere"
    path.write_text(json.dumps(data))


def another_log_file(path: Path) -> None:
    """(the key still right: as the queue's owner could write it, to have -bs append where it chose)"""
    data = json.loads(path.read_text())
    data["settings"]["log"]["file"] = "/etc/elsewhere"
    path.write_text(json.dumps(data))


def setting(section: str, name: str, value: object):
    """A record whose key is right holding a value the model never gives (as a careless writer could)."""
    def spoil(path: Path) -> None:
        data = json.loads(path.read_text())
        (data["settings"][section] if section else data["settings"])[name] = value
        path.write_text(json.dumps(data))
    spoil.__name__ = f"{section}.{name}={value!r}"
    return spoil


NOT_THE_MODELS = [setting("log", "level", "loud"), setting("log", "format", "xml"),
                  setting("log", "syslog_name", "-x y"), setting("smtpd", "banner", "ESMTP\r\n250 injected"),
                  setting("", "myhostname", "mx.test\nX: y"), setting("sendmail", "authorized_submit_users", ["a\0"]),
                  setting("smtpd", "recipient_limit", -1), setting("smtpd", "error_sleep_time", float("nan")),
                  setting("smtpd", "error_sleep_time", float("inf"))]


def owned_by_another_user(path: Path) -> None:
    os.chown(path, 54321, -1)


def world_writable(path: Path) -> None:
    os.chmod(path, 0o666)


def group_writable(path: Path) -> None:
    os.chmod(path, 0o664)


def a_symbolic_link(path: Path) -> None:
    target = path.with_name("target.json")
    path.rename(target)
    path.symlink_to(target)


def a_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def too_big(path: Path) -> None:
    with path.open("a") as f:
        f.write(" " * cache.CACHE_LIMIT)


@pytest.mark.parametrize("spoil", [corrupt, wrong_type, extra_field, missing_field, another_format, another_queue,
                                   another_log_file,
                                   owned_by_another_user, world_writable, group_writable, a_symbolic_link, a_fifo,
                                   a_directory, too_big, *NOT_THE_MODELS], ids=lambda spoil: spoil.__name__)
def test_a_cache_in_doubt_is_not_used(config, spoil):
    if spoil is owned_by_another_user and os.geteuid() != 0:
        pytest.skip("chown needs root")
    spoil(recorded(config))
    assert cached_settings(str(config)) is None


def test_a_users_sendmail_believes_a_record_of_the_queues_owner_or_root(config, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    path = recorded(config)
    os.chown(config.parent / "queue", 54321, -1)
    os.chown(path, 54321, -1)
    monkeypatch.setattr(os, "geteuid", lambda: 12345)
    assert cached_settings(str(config)) is not None
    os.chown(path, 0, -1)
    assert cached_settings(str(config)) is not None
    os.chown(path, 23456, -1)
    assert cached_settings(str(config)) is None


def test_roots_sendmail_believes_a_record_of_root_or_the_configuration_files_owner(config):
    """Not the queue owner's: that user would choose root's settings (authorized_submit_users, the tables root
    opens), unless the configuration is theirs anyway."""
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    path = recorded(config)
    os.chown(config.parent / "queue", 54321, -1)
    os.chown(path, 54321, -1)
    assert cached_settings(str(config)) is None
    os.chown(config, 54321, -1)
    assert cached_settings(str(config)) is not None
    os.chown(config, 0, -1)
    os.chown(path, 0, -1)
    assert cached_settings(str(config)) is not None


def test_roots_sendmail_takes_the_owner_of_the_configuration_it_read_not_of_one_swapped_in_after(config,
                                                                                                 monkeypatch):
    """The configuration file's owner is the read descriptor's: a file of the queue owner's renamed over the path
    between sendmail's read of root's file and a look at its owner does not make that user's record root's."""
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    path = recorded(config)
    os.chown(config.parent / "queue", 54321, -1)
    os.chown(path, 54321, -1)
    swapped = config.parent / "swapped.toml"
    swapped.write_bytes(config.read_bytes())
    os.chown(swapped, 54321, -1)
    read = cache.read_regular_file_stat

    def read_then_swap(name, limit):
        found = read(name, limit)
        os.replace(swapped, config)
        return found

    monkeypatch.setattr(cache, "read_regular_file_stat", read_then_swap)
    assert cached_settings(str(config)) is None
    assert config.stat().st_uid == 54321  # (the swap happened: the record's writer owns the path's file now)


class AsRootWithFilesOf:
    """settings.py's `os` (monkeypatched in), as a sendmail run by root sees it, whoever runs the tests: euid 0,
    and the files named (their inodes: whatever name they have by then) owned by `uid`."""

    def __init__(self, uid: int, *paths: Path):
        self.uid = uid
        self.inodes = {(st.st_dev, st.st_ino) for st in map(os.stat, paths)}

    def __getattr__(self, name: str):
        return getattr(os, name)

    @staticmethod
    def geteuid() -> int:
        return 0

    def stat(self, path, *args, **kwargs) -> os.stat_result:
        return self._owned(os.stat(path, *args, **kwargs))

    def fstat(self, fd: int) -> os.stat_result:
        return self._owned(os.fstat(fd))

    def _owned(self, st: os.stat_result) -> os.stat_result:
        if (st.st_dev, st.st_ino) not in self.inodes:
            return st
        fields = list(st)
        fields[4] = self.uid  # (st_uid)
        return os.stat_result(fields)


def test_roots_sendmail_takes_the_owner_of_the_configuration_it_read_whoever_runs_the_tests(config, monkeypatch):
    """The test above without root (it skips then): root's sendmail reads a configuration file of another user
    (whoever runs the tests), then a file of the record writer's (uid 54321) is renamed over the path: that
    user's record is not believed (it was: the owner came from a second stat of the path)."""
    path = recorded(config)
    swapped = config.parent / "swapped.toml"
    swapped.write_bytes(config.read_bytes())

    def as_root(*owned: Path) -> None:  # (the files read and the settings looked at in the same world)
        for module in (cache, named_files):
            monkeypatch.setattr(module, "os", AsRootWithFilesOf(54321, path, *owned))

    as_root(config)
    assert cached_settings(str(config)) is not None  # (the record writer's own configuration: believed)
    as_root(swapped)
    base = cache._base

    def swap_after_the_read(name):  # (called once the file is read, before its owner is looked at)
        os.replace(swapped, config)
        return base(name)

    monkeypatch.setattr(cache, "_base", swap_after_the_read)
    assert cached_settings(str(config)) is None
    assert cache.os.stat(config).st_uid == 54321  # (the swap happened: the record's writer owns the path's file now)


def test_the_records_constants_are_the_models():
    """sendmail compares the record with the file without the model: the defaults, the size bound and [log]'s
    values it uses are the model's own (mailflow/config_source.py)."""
    from typing import get_args

    from mailflow import config_source
    from mailflow.config import Config, load
    from mailflow.config.log import LogConfig

    defaults = Config()
    assert cache.WRITTEN_DEFAULTS == {"queue_directory": defaults.queue_directory, "log.file": defaults.log.file}
    assert load.MAX_FILE_BYTES == config_source.MAX_FILE_BYTES
    assert get_args(LogConfig.model_fields["level"].annotation) == config_source.LOG_LEVELS
    assert get_args(LogConfig.model_fields["format"].annotation) == config_source.LOG_FORMATS


def test_temporary_records_killed_writers_left_are_swept(config):
    """(a writer killed between creating `.sendmail-settings.json.PID` and renaming it) The server sweeps them as
    it records the settings at its start; one being written now (younger than LEFTOVER_AGE) is left alone."""
    queue = config.parent / "queue"
    left, being_written = queue / f".{CACHE_NAME}.99999", queue / f".{CACHE_NAME}.99998"
    left.write_text("{")
    being_written.write_text("{")
    os.utime(left, (0, 0))
    recorded(config)
    assert not left.exists() and being_written.exists()
    assert cached_settings(str(config)) is not None


def test_load_source_gives_the_bytes_it_validated(config):
    loaded, raw = load_source(config)
    assert raw == GOOD.encode() and loaded == load_config(config)
    assert load_source(None)[1] is None


BAD = {
    "not TOML": GOOD + "x = [\n",
    "a value of the wrong type": GOOD.replace('myorigin = "example.test"', "myorigin = 3"),
    "an unknown key": GOOD + "colour = 1\n",
    "queue_directory not a string": GOOD.replace('queue_directory = "queue"', "queue_directory = 5"),
    "a bad log level": GOOD.replace('format = "json"', 'format = "json"\nlevel = "loud"'),
    "mailbox smaller than a message": GOOD + "[local]\nmailbox_size_limit = 10\n",
    "a line break in a value": GOOD.replace('banner = "ESMTP here"', 'banner = "ESMTP\\nhere"'),
    "a bad duration": GOOD.replace('error_sleep_time = "2s"', 'error_sleep_time = "soon"'),
    "not UTF-8": GOOD.encode().replace(b"ESMTP here", b"ESMTP h\xe9re"),
    "no file": None,
}


@pytest.mark.parametrize("mode", ["-t", "-bs"])
@pytest.mark.parametrize("bad", BAD, ids=list(BAD))
def test_a_bad_configuration_gives_the_full_paths_error_with_a_cache_of_the_good_one(config, bad, mode, capsys,
                                                                                     monkeypatch):
    """The server recorded the good configuration; the file is then made bad. sendmail says what every command
    says (`mailflow: FILE: KEY: REASON`, exit 78), the same words with the cache there or not."""
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    recorded(config)
    text = BAD[bad]
    if text is None:
        config.unlink()
    else:
        config.write_bytes(text if isinstance(text, bytes) else text.encode())
    with_cache = run_sendmail(["-C", str(config), mode]), capsys.readouterr()
    (config.parent / "queue" / CACHE_NAME).unlink()
    without = run_sendmail(["-C", str(config), mode]), capsys.readouterr()
    assert with_cache == without
    code, said = with_cache
    assert code == os.EX_CONFIG and said.out == ""
    assert said.err.startswith(f"mailflow: {config}: ") and said.err.count("\n") == 1, said.err


def test_check_config_records_the_settings(config):
    """`mailflow check-config` (and `config check`) validates the file as serve does: it records them too."""
    (config.parent / "senders").write_text("alice alice@example.test\n")
    done = subprocess.run([sys.executable, "-m", "mailflow", "check-config", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert cached_settings(str(config)) == settings_of(load_config(config))


def test_sendmail_reads_no_domain_list_file_without_a_cache(config, tmp_path, monkeypatch):
    """Postfix's sendmail and postdrop read no match_list file: a domain list's /file the user cannot read (here a
    directory where the file was, being replaced) does not stop a submission when no record is there to use (the
    server never started, an upgrade, `-C`); the message is taken."""
    (tmp_path / "relays").mkdir()
    config.write_text(f'relay_domains = ["{tmp_path}/relays", "x.example"]\n' + GOOD)
    message = tmp_path / "message"
    message.write_bytes(b"To: a@example.test\n\nhi\n")
    monkeypatch.setattr(sys, "stdin", open(message))
    assert cached_settings(str(config)) is None
    assert run_sendmail(["-C", str(config), "-t"]) == 0
    assert len(list((tmp_path / "queue" / "maildrop").iterdir())) == 1

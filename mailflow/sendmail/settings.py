"""The settings `mailflow sendmail` uses, and the cache that lets deliver and -bs start without the configuration
model (importing mailflow.config, pydantic and its 36 models, costs ~100 ms: docs/performance.md).

    SubmitSettings                          what sendmail reads of a configuration: myhostname, origin, the queue,
                                            header_size_limit, soft_bounce, [sendmail]'s policy, [log], and the
                                            [smtpd] limits -bs applies (attribute names as in Config)
    settings_of(config) -> SubmitSettings   from a validated Config (the full path)
    cached_settings(path) -> SubmitSettings | None
                                            the fast path: the settings the server recorded for exactly this
                                            configuration, else None (the caller loads the configuration)
    remember_settings(path) -> Config       load_config(path), and the settings of the bytes it validated recorded
                                            in `<queue_directory>/CACHE_NAME` (by `serve` at its start and at each
                                            reload, and by `check-config`), temporary records killed writers left
                                            there swept; raises ConfigError as load_config. Nothing is recorded for
                                            the built-in defaults (path None), nor when the code on disk is no
                                            longer the code this process loaded (an upgrade before a reload: then
                                            the record is removed)

The cache holds a key and the settings. The key is a SHA-256 of mailflow's version, the code (LOADED_CODE, taken
once as this module is imported: Python's version, the path, size and time of every module of mailflow, the
contents of the configuration model's modules, pydantic's and pydantic-core's versions and files; an upgrade, or
an edited install, is new code), the absolute directory the configuration's relative paths are taken from and the
configuration file's exact bytes. load_config reads no environment variable; one it read would have to join the
key. sendmail reads the file's bytes, takes queue_directory from them with tomllib (~1 ms), reads the cache there
and compares keys: equal, the settings are what load_config would give under the code sendmail runs (validation
depends on nothing else), so the configuration is valid and the model is not loaded. Anything else (no cache,
another key, a cache that cannot be read or parsed, one that is not a regular file, is group- or world-writable,
is written by another than the writers below, holds a value of another type or one of the few kinds the check
below refuses (`_settings_from`), or whose queue or [log] file is not the file's) is doubt: None, and sendmail
takes the full path, whose errors are today's, exactly.

What the key cannot see: code changed by other means than files under mailflow/, pydantic/ and pydantic_core/
(their top level) or Python's version (another library the validation imports, a module of mailflow edited
keeping its size and time outside mailflow/config), and a code change between the server's import of
mailflow.config and of this module (milliseconds).

Security: sendmail runs as the user, who controls MAILFLOW_CONFIG, -C and the file it names; the cache only
spares work the user could have the full path do with the same outcome, and is believed only as written where
others cannot write, by root or the queue's owner, or, for a sendmail run by root, by root or the configuration
file's owner (who picks its settings anyway: the queue's owner could otherwise pick root's); and the two places
sendmail writes to, the queue and (-bs) the log file, must be the ones the configuration file names, so the
record's writer chooses neither. The built-in defaults have no record: their queue, ./var, is whoever's owns the
directory sendmail runs in. pickup checks the submission policy again server-side.

Failure behaviour: cached_settings never raises (None); remember_settings raises ConfigError as load_config, and
leaves the cache alone when it cannot write it (a queue directory not yet made, not this user's, or any other
OSError): recording never fails a check or a reload.
"""
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import stat
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import mailflow
from mailflow.config_source import (CONTROL, LOG_FILE, LOG_FORMATS, LOG_LEVELS, MAX_FILE_BYTES, QUEUE_DIRECTORY,
                                    SYSLOG_NAME, resolve_path)
from mailflow.files import read_regular_file_stat
from mailflow.syntax import DURATION_MAX

if TYPE_CHECKING:
    from mailflow.config import Config

CACHE_NAME = "sendmail-settings.json"
FORMAT = 1  # the cache's layout; a reader finding another one takes the full path
CACHE_LIMIT = 1 << 20  # bytes: a cache beyond it is not ours
LEFTOVER_AGE = 60  # seconds: a temporary record this old is a killed writer's (one is renamed within microseconds)
WRITTEN_DEFAULTS = {"queue_directory": QUEUE_DIRECTORY, "log.file": LOG_FILE}  # compared with the record's


@dataclass(frozen=True)
class SendmailPolicy:
    """[sendmail]: who may submit, with which senders."""

    authorized_submit_users: tuple[str, ...]
    local_login_sender_maps: tuple[str, ...]


@dataclass(frozen=True)
class LogSettings:
    """[log], as mailflow.logs writes it."""

    level: str
    format: str
    syslog_name: str
    file: str


@dataclass(frozen=True)
class SmtpdLimits:
    """The [smtpd] settings `sendmail -bs` applies, as Postfix's smtpd does in stand-alone mode."""

    banner: str
    message_size_limit: int
    recipient_limit: int
    recipient_overshoot_limit: int
    max_line_length: int
    soft_error_limit: int
    hard_error_limit: int
    error_sleep_time: float
    junk_command_limit: int
    disable_vrfy_command: bool
    reject_footer: str
    strict_rfc821_envelopes: bool
    discard_ehlo_keywords: tuple[str, ...]
    discard_ehlo_keyword_address_maps: tuple[str, ...]


@dataclass(frozen=True)
class SubmitSettings:
    """What sendmail reads of a configuration (paths absolute, as load_config gives them)."""

    myhostname: str
    origin: str
    queue_directory: str
    header_size_limit: int
    soft_bounce: bool
    sendmail: SendmailPolicy
    log: LogSettings
    smtpd: SmtpdLimits

    @property
    def queue_path(self) -> Path:
        return Path(self.queue_directory)


Settings = Union["Config", SubmitSettings]  # what the sendmail modules accept: pickup passes its Config


def settings_of(config: "Config") -> SubmitSettings:
    def pick(cls: Any, section: object) -> Any:
        return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})

    return SubmitSettings(
        myhostname=config.myhostname, origin=config.origin, queue_directory=config.queue_directory,
        header_size_limit=config.header_size_limit, soft_bounce=config.soft_bounce,
        sendmail=pick(SendmailPolicy, config.sendmail), log=pick(LogSettings, config.log),
        smtpd=pick(SmtpdLimits, config.smtpd))


# --- the fast path -------------------------------------------------------------------------------------------

def cached_settings(path: Optional[str]) -> Optional[SubmitSettings]:
    """The recorded settings of configuration `path`, or None (see the module doc; the built-in defaults, `path`
    None, never have a record)."""
    if path is None:  # (its queue, ./var, is whoever's owns the directory sendmail is run in)
        return None
    try:
        raw, config_stat = read_regular_file_stat(path, MAX_FILE_BYTES)
        base = _base(path)
        document = tomllib.loads(raw.decode("utf-8"))
        queue, log_file = _written_path(document, "queue_directory", base), _written_path(document, "log.file", base)
        if not queue or log_file is None:
            return None
        recorded = _read_cache(Path(queue), _trusted_writers(Path(queue), config_stat.st_uid))
        if recorded is None or recorded.get("format") != FORMAT or recorded.get("key") != source_key(raw, base):
            return None
        settings = _settings_from(recorded.get("settings"))
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return None
    if settings is None or settings.queue_path != Path(queue) or settings.log.file != log_file:
        return None
    return settings


def _base(path: Optional[str]) -> Path:
    """The directory load_config takes relative paths from."""
    return Path.cwd() if path is None else Path(path).absolute().parent


def _written_path(document: dict, key: str, base: Path) -> Optional[str]:
    """The path setting `key` ("queue_directory", "log.file": the two the user's sendmail writes to) as the file
    says it, made absolute as load_config makes it ("" unset: [log] file's default); None when the file does not
    say it plainly. The record must say the same: whoever wrote it chooses no place sendmail writes to."""
    *sections, name = key.split(".")
    found: object = document
    for section in sections:
        found = found.get(section, {}) if isinstance(found, dict) else None
    found = found.get(name, WRITTEN_DEFAULTS[key]) if isinstance(found, dict) else None
    if not isinstance(found, str):
        return None
    return resolve_path(found, base)


def _trusted_writers(queue: Path, config_owner: int) -> tuple[int, ...]:
    """Whose record is believed: root's, and the queue owner's; a sendmail run by root believes only root's and the
    configuration file's owner's (who chooses its settings anyway), not those of a queue it does not own.
    `config_owner` is the owner of the file whose bytes were read (its descriptor's fstat): a stat() of the path
    now could find another file swapped in since, owned by whoever swapped it."""
    if os.geteuid() == 0:
        return 0, config_owner
    return 0, os.stat(queue).st_uid


def _read_cache(queue: Path, writers: tuple[int, ...]) -> Optional[dict]:
    """The cache's JSON object when one of `writers` wrote it where others cannot write, else None."""
    fd = os.open(queue / CACHE_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_mode & 0o022 or st.st_uid not in writers
                or st.st_size > CACHE_LIMIT):
            return None
        with open(fd, "rb", closefd=False) as f:
            data = f.read(CACHE_LIMIT + 1)
    finally:
        os.close(fd)
    found = json.loads(data)
    return found if isinstance(found, dict) and len(data) <= CACHE_LIMIT else None


def source_key(raw: Optional[bytes], base: Path) -> str:
    """The key of a configuration's bytes (None: the built-in defaults) read from directory `base`, under the code
    this process loaded (LOADED_CODE)."""
    digest = hashlib.sha256()
    if LOADED_CODE is None:
        raise OSError("mailflow's modules could not be listed")
    for part in (mailflow.__version__.encode(), LOADED_CODE, os.fsencode(str(base))):
        digest.update(len(part).to_bytes(8, "big") + part)
    digest.update(b"defaults" if raw is None else b"file:" + raw)
    return digest.hexdigest()


DEPENDENCIES = ("pydantic", "pydantic_core")  # the validation's libraries: an upgrade of one is new code too


def _code_fingerprint() -> Optional[bytes]:
    """The code a configuration is validated with, as it is on disk now (~1.3 ms; None when it cannot be read):
    Python's version; the path, size and modification time of each module of mailflow (the configuration's and
    the leaves its validation uses, this one: any could change what a file's settings are) and the contents of
    the configuration model's (mailflow/config: an edit keeping size and time, as `cp -p` or `rsync -a` deploy
    one); and DEPENDENCIES' installed versions and files, found without importing them."""
    package = Path(mailflow.__file__).parent
    found: list[tuple[str, os.stat_result]] = []
    try:
        _modules(package, found)
        lines = [sys.version, *(f"{name} {st.st_size} {st.st_mtime_ns}" for name, st in sorted(found)),
                 _contents(sorted((package / "config").glob("*.py")))]
        for name in DEPENDENCIES:
            lines.extend(_installed(name))
    except (OSError, ImportError, ValueError):  # (find_spec's, for a broken installation)
        return None
    return "\n".join(lines).encode()


def _contents(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        data = path.read_bytes()
        digest.update(os.fsencode(str(path)) + b"\0" + len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def _installed(name: str) -> list[str]:
    """Package `name`'s directory, the name, size and time of its top-level files and the *.dist-info beside it
    (its version)."""
    spec = importlib.util.find_spec(name)  # (a top-level package: found, not imported)
    if spec is None or not spec.submodule_search_locations:
        return [f"{name}: not installed"]
    directory = Path(list(spec.submodule_search_locations)[0])
    with os.scandir(directory) as entries:
        files = sorted(f"{entry.path} {st.st_size} {st.st_mtime_ns}" for entry in entries
                       if entry.is_file(follow_symlinks=False) and (st := entry.stat(follow_symlinks=False)))
    with os.scandir(directory.parent) as entries:
        versions = sorted(entry.name for entry in entries
                          if entry.name.startswith(f"{name}-") and entry.name.endswith(".dist-info"))
    return [str(directory), *files, *versions]


def _modules(directory: Path, found: list[tuple[str, os.stat_result]], depth: int = 0) -> None:
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.endswith(".py"):
                found.append((entry.path, entry.stat()))
            elif depth < 4 and entry.name != "__pycache__" and entry.is_dir(follow_symlinks=False):
                _modules(Path(entry.path), found, depth + 1)


# The code as this process loaded it, taken once as this module is imported: the server's command line imports
# mailflow.config just before it (mailflow/cli/common.py), sendmail takes its key from it.
LOADED_CODE = _code_fingerprint()


def _settings_from(data: object) -> Optional[SubmitSettings]:
    """The settings in the cache's JSON, each field of the type it must have; None when one is missing, extra, of
    another type, a string with a control character (a banner or a host name with a line break), a negative
    number, a duration past DURATION_MAX, or not one of [log]'s values. No more: a count under the model's own
    minimum (max_line_length 0) or a table spec the model would refuse is taken; the record's writer is trusted
    for those (root, the queue's or the configuration file's owner, who can write that file anyway)."""
    found = _dataclass_from(SubmitSettings, data)
    if not isinstance(found, SubmitSettings):
        return None
    log = found.log
    if log.level not in LOG_LEVELS or log.format not in LOG_FORMATS or not re.match(SYSLOG_NAME, log.syslog_name):
        return None
    return found


def _dataclass_from(cls: Any, data: object) -> object:
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    if not isinstance(data, dict) or set(data) != set(fields):
        return None
    values = {}
    for name, kind in fields.items():
        value = _value_from(kind, data[name])
        if value is None:
            return None
        values[name] = value
    return cls(**values)


def _value_from(kind: Any, value: object) -> object:
    if dataclasses.is_dataclass(kind):
        return _dataclass_from(kind, value)
    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is int:  # (every count and size the model has is 0 or more)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
    if kind is float:  # (a duration: error_sleep_time; JSON has NaN and Infinity)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= DURATION_MAX
        return float(value) if ok else None  # type: ignore[arg-type]
    if kind is str:
        return value if _plain(value) else None
    if kind == tuple[str, ...]:
        ok = isinstance(value, list) and all(_plain(item) for item in value)
        return tuple(value) if ok else None  # type: ignore[arg-type]
    return None


def _plain(value: object) -> bool:
    """A string the configuration loader lets through (mailflow/config/load.py: no control character)."""
    return isinstance(value, str) and CONTROL.search(value) is None


# --- the server's side -----------------------------------------------------------------------------------------

def remember_settings(path: Optional[str]) -> "Config":
    """load_config(path), its settings recorded for sendmail (see the module doc). Raises ConfigError."""
    from mailflow.config.load import load_source

    config, raw = load_source(path)
    settings = settings_of(config)
    if raw is None:  # the built-in defaults: sendmail never takes them from a record
        return config
    if LOADED_CODE is not None and _code_fingerprint() == LOADED_CODE:
        _write_cache(settings, source_key(raw, _base(path)))
    else:  # upgraded since this process loaded its code: its validation is not the new sendmail's
        _forget(settings.queue_path)
    return config


def _forget(queue: Path) -> None:
    """No record in `queue`: sendmail takes the full path until a server running the code on disk writes one."""
    try:
        (queue / CACHE_NAME).unlink(missing_ok=True)
    except OSError:
        pass


def _write_cache(settings: SubmitSettings, key: str) -> None:
    """Replace the cache in the settings' queue directory (made by the server; nothing when it is not there or
    this user cannot write it). Best effort: an OSError (a queue that cannot be looked at, a full disk) leaves the
    cache as it was, and never fails a check or a reload."""
    try:
        _replace_cache(settings, key)
    except OSError:
        pass


def _replace_cache(settings: SubmitSettings, key: str) -> None:
    queue = settings.queue_path
    if not stat.S_ISDIR(os.stat(queue).st_mode):
        return
    _sweep(queue)
    data = json.dumps({"format": FORMAT, "key": key, "settings": dataclasses.asdict(settings)}, indent=1).encode()
    temporary = queue / f".{CACHE_NAME}.{os.getpid()}"
    temporary.unlink(missing_ok=True)  # (one a writer of the same pid left behind)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with open(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # (whatever the umask: sendmail, run by any user, reads it)
            f.write(data)
        os.replace(temporary, queue / CACHE_NAME)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def _sweep(queue: Path) -> None:
    """Remove the temporary records (`.CACHE_NAME.PID`) that writers killed between creating and renaming one left
    behind, when older than LEFTOVER_AGE (a younger one is being written)."""
    oldest = time.time() - LEFTOVER_AGE
    with os.scandir(queue) as entries:  # (the queue's top level: a few directories and files)
        for entry in entries:
            if not entry.name.startswith(f".{CACHE_NAME}."):
                continue
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < oldest:
                    os.unlink(entry.path)
            except OSError:
                continue

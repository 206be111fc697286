"""The maildrop directory: where `mailflow sendmail` leaves a message for the pickup stage (Postfix maildrop/).

A maildrop file is one message with its envelope, written by the submitting user's own process, read by pickup:

    {"version": 1, "sender": "alice@example.org", "recipients": ["bob@example.org"], "uid": 1000, ...}\\n
    <the message, CRLF line ends, exactly `size` bytes>

The first line is one JSON object (UTF-8) with `version` (1), `sender` ("" is the null sender), `recipients`
(at least one), `uid` and `user` (who submitted it), `fullname` (for the From header cleanup may add; valid
text, U+FFFD for a byte that is not UTF-8), `fullname_bytes` (only when a byte of the full name is not UTF-8: the
name's bytes as given, base64, which a reader takes over `fullname`, so that the From keeps a Latin-1 GECOS
name's bytes as Postfix's does), `time`, `notify` (RFC 3461 NOTIFY for every recipient, "" when not given),
`ret`, `envid`, `body_type`, `size` (the byte count of what follows, so a truncated file is caught) and `flags`
(a list of words; none are defined yet). `sendmail -bs` adds what its RCPT commands gave, one item per
recipient, in their order: `rcpt_notify` (NOTIFY, "" for none: it overrides `notify`) and `rcpt_orcpt` (ORCPT
as `type;address`, "" for none); each key only when some recipient has a value, so other files are as before.

Compatibility: the version stays 1 while keys are only added and optional: a reader takes the keys it knows and
ignores the others, and every string stays valid UTF-8 text, which every pickup requires (an older pickup
delivers a -bs file without its per-recipient DSN, as if none was given, and a full name that is not UTF-8 with
U+FFFD for its bytes, as it wrote it). A file of the short-lived writer that put such a name's bytes in
`fullname` itself (JSON's `\\udcXX`, which older pickups take for corrupt and set aside) is still read.
Two exceptions, which last only until the server's restart (sendmail and the server come in one package): a -bs
ENVID may be longer than -V's 100 characters, which a pickup older than -bs's DSN takes for a corrupt file; and
a -bs ORCPT keeps its type as the client gave it (`RFC822;…`, `UTF-8;…`, as Postfix's smtpd), which a pickup
older than that (it wanted the type in lower case) takes for a corrupt file too: the message goes to corrupt/,
so restart the server soon after installing a new package, before `sendmail -bs` clients give upper-case types.

- `MaildropMessage`: the envelope, the content's `size` and (once read back) its `offset` in the file, as a
  frozen value. The content itself is never held whole: it is written from, and read back as, chunks.
- `write_maildrop(directory, message, chunks, size_limit=0) -> name`: atomic and durable: a hidden temporary name in
  the same directory, the envelope line, the chunks as they come, fsync, rename to the final name, fsync the
  directory (when the writer may open it: only its owner may, see below; the file itself is fsynced, as with
  Postfix's postdrop). The envelope line is written first with room for the size (and, when `body_type` is "", the
  body type: 8BITMIME when a byte is not ASCII) and completed in place at the end (JSON allows the spaces that pad
  it). The file is created O_EXCL and O_NOFOLLOW under a name with 32 random bits (no other user can plant it first)
  and made mode 0644 whatever the umask (pickup runs as the queue's owner and reads it; the directory is not
  listable, so its name is its secret, as with Postfix's postdrop). The directory, when missing, is created
  DIRECTORY_MODE (1733: any local user may create a file in it, none may list it nor remove another's file; the
  server makes an older one so at start), owned by the queue directory's owner (also when root makes it); a
  symbolic link in its place is never followed (the queue's owner could point it at root's directories), refused
  73 as "not a directory", and the file is made and renamed relative to the directory opened. Raises
  `MaildropError` (with `.code`, a sysexits value: 65 EX_DATAERR when the content exceeds `size_limit` bytes (0: no
  limit) - reading stops there; 64 EX_USAGE when the envelope line would exceed HEADER_LIMIT (hundreds of thousands
  of recipients), before the content is read or a file created; 73 EX_CANTCREAT when the directory cannot be created
  or written; 75 EX_TEMPFAIL for anything else, such as a full disk); a failed write leaves no file.
- `open_maildrop(path) -> MaildropFile`: the file as pickup takes it, whoever wrote it: never a symbolic link (not
  followed: O_NOFOLLOW), a FIFO, a device or a directory, nor a file with more than one link (a hard link another
  user made to a file it does not own), all `CorruptMaildrop`; its envelope read as `read_maildrop` does; the
  content is then read from the same open file (`chunks`, `prefix`), never by its name again, so that a file
  swapped for a symbolic link after the checks is not what is read; `modified()` is its mtime.
- `read_maildrop(path) -> MaildropMessage`: validates the envelope line and that exactly `size` bytes follow
  (without reading them); raises `CorruptMaildrop(reason)` for anything that is not a complete, well-formed
  file (pickup moves such a file aside; `notify`, `ret`, `envid`, `body_type`, `rcpt_notify` and `rcpt_orcpt`
  must be values sendmail's -N, -R, -V and -B or -bs's MAIL and RCPT can give), never blocks on a FIFO nor
  fails otherwise on a hostile envelope line (JSON nested too deep is corrupt too); OSError when the file cannot
  be opened. The file's owner is returned as `owner_uid`; pickup trusts it over the `uid` the file claims.
  `maildrop_content(path, message)` is the content as a mailflow.content.Content.
- `maildrop_names(directory)`: the finished files, oldest first (temporary names start with ".").
- `remove_stale_temporaries(directory, now, age=STALE_AGE) -> names`: removes the temporary files of writers that
  died (SIGKILL, a crash) and were not touched for `age` seconds (Postfix's postsuper -p purges such files).
- `pickup_socket(queue_dir)`: where the running server's pickup socket is (public/pickup).
- `wake_pickup(queue_dir)`: one byte to that socket, only a socket of the queue directory's owner and never
  through a symbolic link; a missing socket (no server) is not an error.
Nothing here needs a running server.
"""
from __future__ import annotations

import base64
import dataclasses
import errno
import json
import os
import secrets
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from mailflow.content import Content, FilePart
from mailflow.dsn_parameters import is_notify_value, is_orcpt_value
from mailflow.syntax import echoed, is_printable_ascii, is_utf8_text

VERSION = 1
FILE_MODE = 0o644  # readable by pickup, the queue's owner; the directory hides the name (Postfix's postdrop)
DIRECTORY_MODE = 0o1733  # sticky, world-writable, not listable: as Postfix's maildrop/ (1730, group postdrop)
# bytes of the JSON line, written and read: room for every recipient a command line can hold (Linux: 2 MB of
# arguments by default) and then some, yet a bound on what pickup reads to find out
HEADER_LIMIT = 16_000_000
STALE_AGE = 86400.0  # a temporary maildrop file not written to for a day: its writer is gone
SIZE_ROOM = 10 ** 15 - 1  # the envelope line is first written with this size, then completed in place


class MaildropError(Exception):
    """The message could not be stored; `code` is the sysexits value sendmail exits with."""

    def __init__(self, text: str, code: int = os.EX_TEMPFAIL):
        super().__init__(text)
        self.code = code


class CorruptMaildrop(Exception):
    """A maildrop file that is not a complete, well-formed message with its envelope."""


@dataclass(frozen=True)
class MaildropMessage:
    sender: str
    recipients: tuple[str, ...]
    uid: int
    user: str
    fullname: str = ""
    time: float = 0.0
    notify: str = ""
    ret: str = ""
    envid: str = ""
    body_type: str = ""
    rcpt_notify: tuple[str, ...] = ()  # per recipient (-bs's RCPT NOTIFY=): () when none was given
    rcpt_orcpt: tuple[str, ...] = ()  # per recipient (-bs's RCPT ORCPT=): () when none was given
    flags: tuple[str, ...] = ()
    size: int = 0  # bytes of content (set when written)
    offset: int = field(default=0, compare=False)  # where the content starts in the file (set by read_maildrop)
    owner_uid: int | None = field(default=None, compare=False)  # set by read_maildrop from the file itself

    def header(self) -> dict:
        header = {"version": VERSION, "sender": self.sender, "recipients": list(self.recipients), "uid": self.uid,
                  "user": self.user, "fullname": self.fullname, "time": self.time, "notify": self.notify,
                  "ret": self.ret, "envid": self.envid, "body_type": self.body_type, "size": self.size,
                  "flags": list(self.flags)}
        if not is_utf8_text(self.fullname):  # bytes that are not UTF-8 (surrogate escapes): kept apart, see above
            raw = self.fullname.encode("utf-8", "surrogateescape")
            header["fullname"] = raw.decode("utf-8", "replace")
            header["fullname_bytes"] = base64.b64encode(raw).decode("ascii")
        for key in ("rcpt_notify", "rcpt_orcpt"):
            values = getattr(self, key)
            if any(values):
                header[key] = list(values)
        return header

    def recipient_notify(self) -> tuple[str, ...]:
        """NOTIFY per recipient: what RCPT gave, else -N's for all; () when neither."""
        if any(self.rcpt_notify):
            return self.rcpt_notify
        return (self.notify,) * len(self.recipients) if self.notify else ()


def envelope_line(message: MaildropMessage, width: int = 0) -> bytes:
    """The JSON envelope line, padded with spaces to `width` bytes before its newline."""
    line = json.dumps(message.header(), ensure_ascii=False).encode("utf-8")
    return line + b" " * (width - len(line)) + b"\n"


def new_name(now: float) -> str:
    """Time-ordered, unique: microseconds in hex and 32 random bits."""
    return f"{int(now * 1_000_000):014X}{secrets.token_hex(4).upper()}"


def write_maildrop(directory: Path, message: MaildropMessage, chunks: Iterable[bytes], *,
                   size_limit: int = 0) -> str:
    directory = Path(directory)
    room = len(envelope_line(dataclasses.replace(message, size=SIZE_ROOM, body_type="8BITMIME"))) - 1
    if room >= HEADER_LIMIT:  # read_maildrop would take the file for corrupt
        raise MaildropError(f"too many recipients ({len(message.recipients)}): the envelope would be {room} bytes, "
                            f"more than {HEADER_LIMIT}", os.EX_USAGE)
    _ensure_directory(directory)
    where, queue_uid = _open_directory(directory)
    try:
        _check_pickup_may_read(where, queue_uid, directory)
        return _write_in(where, directory, message, chunks, size_limit, room)
    finally:
        os.close(where)


def _write_in(where: int, directory: Path, message: MaildropMessage, chunks: Iterable[bytes], size_limit: int,
              room: int) -> str:
    """The file written in the directory open as `where` (every name relative to it: never another directory the
    path may name meanwhile)."""
    name = new_name(time.time())
    temp = f".tmp.{name}"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE,
                     dir_fd=where)
    except OSError as e:
        raise MaildropError(f"cannot create a file in {directory}: {e.strerror}", _code(e)) from None
    try:
        try:
            os.fchmod(fd, FILE_MODE)  # (a umask of 077 would leave it unreadable by pickup)
            with os.fdopen(fd, "wb") as f:
                _write_message(f, message, chunks, size_limit, room)
                os.fsync(f.fileno())
            os.rename(temp, name, src_dir_fd=where, dst_dir_fd=where)
            _fsync_directory(where)
        except OSError as e:
            raise MaildropError(f"cannot write {directory / name}: {e.strerror}", _code(e)) from None
    except BaseException:
        try:
            os.unlink(temp, dir_fd=where)
        except FileNotFoundError:
            pass
        raise
    return name


def _open_directory(directory: Path) -> tuple[int, int]:
    """The maildrop directory itself, never through a symbolic link: whoever may write in the queue directory (its
    owner) could make maildrop/ a link to root's directories, where root's sendmail would then write (pickup never
    follows one either); with the uid of the queue directory it is in (the server's user). The queue directory is
    opened first and maildrop/ in it: each looked up once by name; O_PATH: neither need be readable (maildrop is
    1733) nor maildrop searchable (the refusal of a private maildrop is then said, `_check_pickup_may_read`).
    Every OSError is a MaildropError."""
    try:
        queue = os.open(directory.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise MaildropError(f"cannot open {directory.parent}: {e.strerror}", _code(e)) from None
    try:
        queue_uid = os.fstat(queue).st_uid
        return os.open(directory.name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=queue), queue_uid
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise MaildropError(f"{directory} is not a directory{_not_followed(directory)}", os.EX_CANTCREAT) \
                from None
        raise MaildropError(f"cannot open {directory}: {e.strerror}", _code(e)) from None
    finally:
        os.close(queue)


def _not_followed(directory: Path) -> str:
    """What to add when `directory` is not one: that a symbolic link to one is never followed (looked at only on
    this error's path)."""
    try:
        return " (a symbolic link is never followed)" if os.path.islink(directory) and directory.is_dir() else ""
    except OSError:
        return ""


def _check_pickup_may_read(where: int, queue_uid: int, directory: Path) -> None:
    """Refuse (EX_CANTCREAT) a maildrop, open as `where`, in which pickup could not take the file: one not owned by
    `queue_uid`, the queue directory's owner (the server's user: it could neither list it nor remove the files of
    others), or, for a writer other than its owner, one not DIRECTORY_MODE (pickup makes its own so at start).
    Root's sendmail would otherwise store mail that waits there unseen."""
    try:
        st = os.fstat(where)
    except OSError as e:
        raise MaildropError(f"cannot examine {directory}: {e.strerror}", _code(e)) from None
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != queue_uid:
        raise MaildropError(f"{directory} belongs to uid {st.st_uid}, not to the queue directory's owner (uid "
                            f"{queue_uid}, the server's user, who could not take the mail): make it uid {queue_uid}'s, "
                            f"mode {DIRECTORY_MODE:04o}", os.EX_CANTCREAT)
    if st.st_uid != os.geteuid() and mode != DIRECTORY_MODE:
        raise MaildropError(f"{directory} has mode {mode:04o}, not {DIRECTORY_MODE:04o} (the server makes it so at "
                            "its start)", os.EX_CANTCREAT)


def _write_message(f, message: MaildropMessage, chunks: Iterable[bytes], size_limit: int, room: int) -> None:
    """The envelope line (`room` bytes, for what is known only at the end), the content, the line completed."""
    detect = not message.body_type
    f.write(b" " * room + b"\n")
    size, ascii_only = 0, True
    for chunk in chunks:
        size += len(chunk)
        if size_limit and size > size_limit:
            raise MaildropError(f"message file too big: more than {size_limit} bytes (message_size_limit)",
                                os.EX_DATAERR)
        ascii_only = ascii_only and chunk.isascii()
        f.write(chunk)
    body_type = ("" if ascii_only else "8BITMIME") if detect else message.body_type
    f.flush()
    os.pwrite(f.fileno(), envelope_line(dataclasses.replace(message, size=size, body_type=body_type), room), 0)


def _ensure_directory(directory: Path) -> None:
    """The maildrop made when it is missing (its parents too); nothing looked at when it is there: what is there
    is opened next, as a directory or refused (`_open_directory`)."""
    try:
        try:
            make_maildrop_directory(directory)
        except FileNotFoundError:  # (the queue directory missing too)
            directory.parent.mkdir(parents=True, exist_ok=True)
            make_maildrop_directory(directory)
    except OSError as e:
        raise MaildropError(f"cannot create {directory}: {e.strerror}", os.EX_CANTCREAT) from None


def make_maildrop_directory(directory: Path) -> bool:
    """Create `directory` DIRECTORY_MODE (whatever the umask), owned by the owner of the directory it is in (the
    queue's: root's sendmail run before the server's first start must not make it root's, which the server could
    neither list nor clean); False when it was there already. The owner and mode are set through the directory
    opened, never by its name: the queue's owner may write in the queue directory and could put a symbolic link
    (or a directory of its own) there between the mkdir and the chown, which root's sendmail would then give to
    the queue's owner mode 1733. Raises OSError when what is there is not the directory just made."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        return False
    fd = _open_made_directory(directory, os.lstat(directory))
    try:
        queue = os.stat(directory.parent)
        if os.geteuid() == 0 and queue.st_uid != 0:
            os.fchown(fd, queue.st_uid, queue.st_gid)
        os.fchmod(fd, DIRECTORY_MODE)
    finally:
        os.close(fd)
    return True


def _open_made_directory(directory: Path, made: os.stat_result) -> int:
    """The directory this process has just made (`made`: its lstat just after the mkdir), open (never through a
    symbolic link), or OSError: it must be that very directory (device and inode), this user's and private
    (mkdir's 0700, less a umask; the set-group-ID bit a setgid queue directory passes on is allowed). No link count
    is checked: btrfs and many other filesystems give a directory one link."""
    replaced = OSError(errno.EPERM, "replaced while it was made (a symbolic link or a directory not made here)",
                       str(directory))
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise replaced from None
        raise
    st = os.fstat(fd)
    if ((st.st_dev, st.st_ino) != (made.st_dev, made.st_ino) or not stat.S_ISDIR(st.st_mode)
            or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o5077):
        os.close(fd)
        raise replaced
    return fd


def _code(e: OSError) -> int:
    return os.EX_CANTCREAT if e.errno in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.EROFS) else os.EX_TEMPFAIL


def _fsync_directory(where: int) -> None:
    """The rename made durable in the directory open as `where` (an O_PATH descriptor, which cannot be fsynced:
    reopened through it, not by its name); not for a user who may not read the directory (every one but its owner,
    in the 1733 maildrop: as Postfix's postdrop, the file itself was fsynced, and journaling filesystems keep the
    rename)."""
    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=where)
    except PermissionError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MaildropFile:
    """A maildrop file opened by `open_maildrop`: its envelope (`message`, `owner_uid` the kernel's word) and its
    content read from the open file. Close it (a context manager)."""

    def __init__(self, fd: int, message: MaildropMessage):
        self._fd = fd
        self.message = message

    def __enter__(self) -> "MaildropFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def chunks(self, size: int = 65536) -> Iterator[bytes]:
        """The content, `size` bytes at a time; CorruptMaildrop when the file is shorter than it said."""
        offset, end = self.message.offset, self.message.offset + self.message.size
        while offset < end:
            data = os.pread(self._fd, min(size, end - offset), offset)
            if not data:
                raise CorruptMaildrop("truncated while being read")
            offset += len(data)
            yield data

    def prefix(self, size: int) -> bytes:
        """At most `size` bytes of the content (for quoting it in a notice)."""
        return os.pread(self._fd, min(size, self.message.size), self.message.offset)

    def modified(self) -> float:
        """When the file was last written (its mtime, wall-clock: the kernel's word, not its envelope's)."""
        return os.fstat(self._fd).st_mtime

    def unchanged(self) -> bool:
        """Whether the file is still as long as its envelope says."""
        return os.fstat(self._fd).st_size == self.message.offset + self.message.size


def open_maildrop(path: Path) -> MaildropFile:
    before = os.lstat(path)  # (not opened at all when it is not a plain file: a device, a FIFO, a link)
    if stat.S_ISLNK(before.st_mode):
        raise CorruptMaildrop(f"a symbolic link (uid {before.st_uid})")
    if not stat.S_ISREG(before.st_mode):
        raise CorruptMaildrop(f"not a regular file (uid {before.st_uid})")
    try:  # a FIFO swapped in meanwhile must not block the caller (pickup's event loop), nor a link be followed
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptMaildrop(f"a symbolic link (uid {before.st_uid})") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptMaildrop(f"not a regular file (uid {st.st_uid})")
        if st.st_nlink != 1:  # a hard link made to a file of another owner (the queue's, root's) names it
            raise CorruptMaildrop(f"uid {st.st_uid}: file has {st.st_nlink} links")
        first = _first_line(fd)
        if not first.endswith(b"\n"):
            raise CorruptMaildrop("no envelope line (empty, truncated or not a maildrop file)")
        try:
            header = json.loads(first)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # (RecursionError: arrays nested too deep)
            raise CorruptMaildrop(f"envelope line is not JSON: {str(e)[:200]}") from None
        return MaildropFile(fd, _message(header, st.st_size - len(first), len(first), st.st_uid))
    except BaseException:
        os.close(fd)
        raise


def _first_line(fd: int) -> bytes:
    """The bytes up to and including the first newline, at most HEADER_LIMIT of them."""
    line = bytearray()
    while len(line) < HEADER_LIMIT:
        data = os.pread(fd, min(65536, HEADER_LIMIT - len(line)), len(line))
        if not data:
            break
        end = data.find(b"\n")
        if end >= 0:
            line += data[:end + 1]
            break
        line += data
    return bytes(line)


def read_maildrop(path: Path) -> MaildropMessage:
    with open_maildrop(path) as opened:
        return opened.message


def maildrop_content(path: Path, message: MaildropMessage) -> Content:
    """The content of a maildrop file read by read_maildrop (read when used, in chunks)."""
    return Content((FilePart(str(path), message.offset, message.size),))


def _message(header: object, available: int, offset: int, owner: int) -> MaildropMessage:
    if not isinstance(header, dict):
        raise CorruptMaildrop("envelope line is not a JSON object")
    if header.get("version") != VERSION:
        raise CorruptMaildrop(f"unknown version {echoed(json.dumps(header.get('version')))}")
    for key, value in header.items():
        if not (_is_bytes_text(value) if key == "fullname" else _is_text(value)):
            raise CorruptMaildrop(f"{echoed(key)}: not UTF-8 text (a lone surrogate escape)")
    _expect(header, "sender", str)
    _expect(header, "uid", int)
    _expect(header, "user", str)
    _expect(header, "size", int)
    recipients = header.get("recipients")
    if not isinstance(recipients, list) or not recipients or not all(isinstance(r, str) and r for r in recipients):
        raise CorruptMaildrop("recipients: must be a non-empty list of addresses")
    if any(c in a for a in [header["sender"], *recipients] for c in "\r\n\0<>"):
        raise CorruptMaildrop("an address holds a control character or angle bracket")
    if header["size"] != available:
        raise CorruptMaildrop(f"size: says {header['size']} bytes, {available} follow (truncated?)")
    optional = {}
    for key, kind in (("fullname", str), ("notify", str), ("ret", str), ("envid", str), ("body_type", str),
                      ("time", (int, float))):
        if key in header:
            _expect(header, key, kind)
            optional[key] = header[key]
    _check_dsn_fields(optional)
    for key, check in (("rcpt_notify", is_notify_value), ("rcpt_orcpt", is_orcpt_value)):
        if key in header:
            optional[key] = _per_recipient(header, key, check, len(recipients))
    if "fullname_bytes" in header:
        optional["fullname"] = _fullname_of_bytes(header["fullname_bytes"])
    flags = header.get("flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise CorruptMaildrop("flags: must be a list of words")
    return MaildropMessage(sender=header["sender"], recipients=tuple(recipients), uid=header["uid"],
                           user=header["user"], flags=tuple(flags), size=header["size"], offset=offset,
                           owner_uid=owner, **optional)


def _fullname_of_bytes(value: object) -> str:
    """`fullname_bytes` (base64) as the name's bytes, those that are not UTF-8 as surrogate escapes."""
    if not isinstance(value, str):
        raise CorruptMaildrop("fullname_bytes: must be a string")
    try:
        return base64.b64decode(value, validate=True).decode("utf-8", "surrogateescape")
    except ValueError:  # (binascii.Error is one)
        raise CorruptMaildrop("fullname_bytes: not base64") from None


def _is_bytes_text(value: object) -> bool:
    """True for a string whose lone surrogates, if any, are surrogate escapes (a full name's bytes that are not
    UTF-8: sendmail passes them on as given, as Postfix's does), so that it encodes back to those bytes."""
    try:
        if isinstance(value, str):
            value.encode("utf-8", "surrogateescape")
        return True
    except UnicodeEncodeError:
        return False


def _is_text(value: object) -> bool:
    """False for a string (or a list holding one) with a lone surrogate: JSON's `\\ud800` escape reads as one, and
    no such string can be encoded to be queued, logged or sent (sendmail never writes one; a file written by hand
    can hold one)."""
    values = value if isinstance(value, list) else [value]
    return all(is_utf8_text(item) for item in values if isinstance(item, str))


def _check_dsn_fields(fields: dict) -> None:
    """The values sendmail's -N, -R, -V and -B or -bs's MAIL can give, nothing else: they reach the queue and the
    DSN notices (an ENVID with a line break would be a header of its own there). An ENVID may be longer than -V
    takes (100 characters, RFC 3461's bound): Postfix's smtpd, and so -bs, takes one of any length."""
    notify = fields.get("notify", "")
    if not is_notify_value(notify):
        raise CorruptMaildrop(f"notify: {notify[:80]!r} is no RFC 3461 NOTIFY value")
    if fields.get("ret", "") not in ("", "FULL", "HDRS"):
        raise CorruptMaildrop("ret: must be FULL or HDRS")
    if not is_printable_ascii(fields.get("envid", "")):
        raise CorruptMaildrop("envid: not an RFC 3461 ENVID")
    if fields.get("body_type", "") not in ("", "7BIT", "8BITMIME"):
        raise CorruptMaildrop("body_type: must be 7BIT or 8BITMIME")


def _per_recipient(header: dict, key: str, check, count: int) -> tuple[str, ...]:
    """A list of one value per recipient, each passing `check`."""
    values = header[key]
    if not isinstance(values, list) or len(values) != count or not all(isinstance(v, str) and check(v)
                                                                       for v in values):
        raise CorruptMaildrop(f"{key}: must be one RFC 3461 value per recipient")
    return tuple(values)


def _expect(header: dict, key: str, kind) -> None:
    value = header.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CorruptMaildrop(f"{key}: missing or of the wrong type")


def maildrop_names(directory: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(directory) if not n.startswith("."))
    except FileNotFoundError:
        return []


def remove_stale_temporaries(directory: Path, now: float, age: float = STALE_AGE) -> list[str]:
    """The temporary files (".tmp.NAME") last modified more than `age` seconds before `now`, removed; their
    names. Errors are ignored: the next call tries again."""
    removed = []
    try:
        names = [n for n in os.listdir(directory) if n.startswith(".tmp.")]
    except OSError:
        return []
    for name in names:
        path = Path(directory) / name
        try:
            if now - os.lstat(path).st_mtime > age:
                path.unlink()
                removed.append(name)
        except OSError:
            pass
    return removed


NEW_FILE = b"W"  # a wake-up for a new maildrop file (sendmail)
REQUEUED = b"R"  # one for mail an operator requeued (the queue tools): pickup also looks at the store's maildrop queue


def pickup_socket(queue_dir: Path | str) -> Path:
    """The running server's pickup socket in queue directory `queue_dir`."""
    return Path(queue_dir) / "public" / "pickup"


def wake_pickup(queue_dir: Path | str, what: bytes = NEW_FILE) -> bool:
    """Tell the server running on `queue_dir` to look now (`what`: NEW_FILE or REQUEUED). False when no server
    listens (not an error: it scans at start), or when its pickup socket is not a socket of the queue directory's
    owner (the server's user): a symbolic link the queue's owner put there is not followed to another socket root
    may write to (the file is found at pickup's next scan). The check is an lstat, then a send by name: the
    queue's owner can swap a link in between (a race left open: one byte, sent as this process's user)."""
    socket_path = pickup_socket(queue_dir)
    try:
        st = os.lstat(socket_path)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.stat(queue_dir).st_uid:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.sendto(what, str(socket_path))
        return True
    except OSError:
        return False

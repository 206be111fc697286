"""Files the operator or a user names (config.toml, tables, keys, certificates, tokens, secrets, :include:): read only
when they are regular files, and only up to a limit.

    read_regular_file(path, limit[, null_is_empty]) -> bytes
                                               the whole file; raises OSError (FileNotFoundError and the others as
                                               the system gives them) or RefusedFile. `null_is_empty`: /dev/null
                                               (or a link to it) reads as an empty file, for a table or a list
    read_regular_file_stat(path, limit[, null_is_empty]) -> (bytes, os.stat_result)
                                               the same bytes and the fstat() of the descriptor read: a caller
                                               trusting the file by its owner takes it from there, not from a
                                               second stat() of a path that may have been swapped meanwhile
                                               (/dev/null's stat() with `null_is_empty`: it is not opened)
    stat_revalidated(path) -> os.stat_result   the file's attributes as they are now: a regular file (or
                                               /dev/null) is opened and its descriptor's fstat() given, since an
                                               NFS client revalidates a file's attributes at open() (close-to-open)
                                               where its stat() may answer from an attribute cache for up to a
                                               minute; anything else (never opened) its stat()
    read_bounded(f, size, limit) -> bytes      an open file's bytes, `limit` + 1 at most, asking for `size` + 1
                                               (its fstat() size) first: for callers with an open of their own
    keep_private(path)                         a SQLite database created 0600 before SQLite opens it (its -wal
                                               and -shm take its mode); an older one of ours made 0600
    check_regular_file(path, limit)            the same checks without reading, for a file a library opens by name
                                               (OpenSSL's certificates and CA files)
    refuse_special(mode, path)                 RefusedFile unless `mode` (st_mode) is a regular file's: for a
                                               caller with an open of its own (the queue's pid file)
    RefusedFile(OSError)                       not a regular file (a FIFO, a device, a directory, a socket):
                                               `strerror` says which, in words for an error message ("is a FIFO,
                                               not a regular file"); FileTooLarge, its subclass: "larger than 4 MB"
    TEXT_LIMIT, TABLE_LIMIT                    the limits callers pass: a key, token, secret, certificate or CA
                                               file; a lookup table or key table

Why: a FIFO named as a table or a certificate would hold the caller at open() until someone writes to it (the
server's event loop, `check-config`, a delivery), and a device such as /dev/zero would be read until memory runs
out. Postfix 3.7.11 hangs on both (`postmap -q k texthash:FIFO`, `texthash:/dev/zero`); mailflow refuses them.
The file is looked at with stat() before it is opened (a device is never opened: a tape rewinds on open), opened
with O_NONBLOCK (a FIFO swapped in meanwhile opens at once) and looked at again with fstat(); a regular file
larger than `limit` is refused before it is read, and one read asks for the size fstat() gave and a byte more (not
the limit: 64 MB for every table reload), reading on only when the file grew meanwhile, up to the limit.
`check_regular_file` leaves the library to open the file by name afterwards: a file replaced in between is the
operator's own doing, and the library's error then names it.
/dev/null is a device, but the one that cannot hold a reader nor fill memory: where a table or a list is read
(texthash:, regexp:, the DKIM key and signing tables, the admin's tokens) it is an empty one, as `hash:/dev/null` and
`texthash:/dev/null` are in Postfix (dict_thash.c opens any file; `postmap -q k texthash:/dev/null` finds nothing).
It is recognised by its device number, so a link to it is one too; elsewhere (a certificate, a secret, :include:,
as Postfix's local(8) refuses an :include: file that is not regular) it is refused as the other devices are.
Symbolic links are followed (certificates are often links); callers that must not follow one (a .forward) keep
their own open.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"))


TEXT_LIMIT = 4 << 20  # the largest CA bundles are some 250 KB; keys, tokens and secrets a few KB
TABLE_LIMIT = 64 << 20  # a table is parsed into memory whole: a million lines of access map is some 40 MB
GROWN_PIECE = 1 << 16  # bytes read at a time of a file longer than fstat() said


class RefusedFile(OSError):
    """A file refused before it was read; `strerror` is the reason, `filename` the file."""

    def __init__(self, reason: str, path: str | Path):
        super().__init__(errno.EINVAL, reason, str(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class FileTooLarge(RefusedFile):
    """A regular file larger than the caller's limit."""


def read_regular_file(path: str | Path, limit: int, *, null_is_empty: bool = False) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes (see the module docstring); with
    `null_is_empty`, /dev/null gives b""."""
    looked = os.stat(path)
    if null_is_empty and _is_null_device(looked):
        return b""
    return _read(path, limit, looked)[0]


def read_regular_file_stat(path: str | Path, limit: int, *,
                           null_is_empty: bool = False) -> tuple[bytes, os.stat_result]:
    """`read_regular_file`'s bytes, and the fstat() of the descriptor they were read from: the owner and mode of
    the file read, whatever the path names by the time the caller looks."""
    looked = os.stat(path)
    if null_is_empty and _is_null_device(looked):
        return b"", looked
    return _read(path, limit, looked)


def stat_revalidated(path: str | Path) -> os.stat_result:
    """See the module docstring."""
    looked = os.stat(path)
    if not (stat.S_ISREG(looked.st_mode) or _is_null_device(looked)):
        return looked
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # (a FIFO swapped in meanwhile opens at once)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def _read(path: str | Path, limit: int, looked: os.stat_result) -> tuple[bytes, os.stat_result]:
    """The bytes of `path`, which stat() gave as `looked`, and the fstat() of the descriptor read."""
    _refuse(looked, path, limit)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        _refuse(st, path, limit)
        os.set_blocking(fd, True)
        with open(fd, "rb", closefd=False) as f:
            data = read_bounded(f, st.st_size, limit)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FileTooLarge(f"larger than {_size(limit)}", path)
    return data, st


def read_bounded(f: BinaryIO, size: int, limit: int) -> bytes:
    """The file's bytes, `limit` + 1 at most: what fstat() said (`size`) and one byte more, so that a read of a
    small file never asks for (and allocates) the whole limit; a file that grew since (or that fstat() gives as
    0 bytes, as /proc's) is read on in pieces until its end or past the limit."""
    data = f.read(min(size, limit) + 1)
    if len(data) <= size:
        return data
    pieces = [data]
    read = len(data)
    while read <= limit and (piece := f.read(min(GROWN_PIECE, limit + 1 - read))):
        pieces.append(piece)
        read += len(piece)
    return b"".join(pieces)


def check_regular_file(path: str | Path, limit: int) -> None:
    """Raise what `read_regular_file` would, without reading the file (see the module docstring)."""
    _refuse(os.stat(path), path, limit)


def _is_null_device(st: os.stat_result) -> bool:
    """True for /dev/null, under whatever name (a link, a bind mount): a character device with its number."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.stat(os.devnull).st_rdev


def refuse_special(mode: int, path: str | Path) -> None:
    """RefusedFile ("is a FIFO, not a regular file") unless `mode` (a stat's st_mode) is a regular file's."""
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "a special file")
        raise RefusedFile(f"is {kind}, not a regular file", path)


def _refuse(st: os.stat_result, path: str | Path, limit: int) -> None:
    refuse_special(st.st_mode, path)
    if st.st_size > limit:
        raise FileTooLarge(f"larger than {_size(limit)}", path)


def _size(limit: int) -> str:
    for unit, shift in (("MB", 20), ("KB", 10)):
        if limit >= 1 << shift and limit % (1 << shift) == 0:
            return f"{limit >> shift} {unit}"
    return f"{limit} bytes"


def keep_private(path: Path) -> None:
    """A database in the queue directory (queue.db: the mail itself, for small messages; greylist.db: who mails
    whom) readable by its owner alone, whatever the umask: local users traverse the queue directory to reach the
    maildrop. Created 0600 before SQLite opens it (its -wal and -shm files take the database's mode); an older one
    of ours, made under a looser umask, is made 0600."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            if name.stat().st_uid == os.geteuid() and name.stat().st_mode & 0o077:
                os.chmod(name, 0o600)
        except FileNotFoundError:
            pass

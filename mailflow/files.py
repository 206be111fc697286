"""Files the operator or a user names (config.toml, tables, keys, certificates, tokens, secrets, :include:): read only
when they are regular files, and only up to a limit.

    read_regular_file(path, limit) -> bytes    the whole file; raises OSError (FileNotFoundError and the others as
                                               the system gives them) or RefusedFile
    check_regular_file(path, limit)            the same checks without reading, for a file a library opens by name
                                               (OpenSSL's certificates and CA files)
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
larger than `limit` is refused before it is read. `check_regular_file` leaves the library to open the file by name
afterwards: a file replaced in between is the operator's own doing, and the library's error then names it.
Symbolic links are followed (certificates are often links); callers that must not follow one (a .forward) keep
their own open.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"))


TEXT_LIMIT = 4 << 20  # the largest CA bundles are some 250 KB; keys, tokens and secrets a few KB
TABLE_LIMIT = 64 << 20  # a table is parsed into memory whole: a million lines of access map is some 40 MB


class RefusedFile(OSError):
    """A file refused before it was read; `strerror` is the reason, `filename` the file."""

    def __init__(self, reason: str, path: str | Path):
        super().__init__(errno.EINVAL, reason, str(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class FileTooLarge(RefusedFile):
    """A regular file larger than the caller's limit."""


def read_regular_file(path: str | Path, limit: int) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes (see the module docstring)."""
    _refuse(os.stat(path), path, limit)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _refuse(os.fstat(fd), path, limit)
        os.set_blocking(fd, True)
        with open(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew since fstat()
        raise FileTooLarge(f"larger than {_size(limit)}", path)
    return data


def check_regular_file(path: str | Path, limit: int) -> None:
    """Raise what `read_regular_file` would, without reading the file (see the module docstring)."""
    _refuse(os.stat(path), path, limit)


def _refuse(st: os.stat_result, path: str | Path, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "a special file")
        raise RefusedFile(f"is {kind}, not a regular file", path)
    if st.st_size > limit:
        raise FileTooLarge(f"larger than {_size(limit)}", path)


def _size(limit: int) -> str:
    for unit, shift in (("MB", 20), ("KB", 10)):
        if limit >= 1 << shift and limit % (1 << shift) == 0:
            return f"{limit >> shift} {unit}"
    return f"{limit} bytes"

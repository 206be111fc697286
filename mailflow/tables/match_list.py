"""A `/file/name` in a list, read as Postfix's match_list(3) reads it (match_list_parse): the reader the domain
lists (mydestination, relay_domains, virtual_alias_domains, virtual_mailbox_domains) and the network lists
(mailflow.tables.networks) share, and the config import too (it writes the path unchanged).

    DOMAIN_LIST_SETTINGS                    the domain lists that are match lists in Postfix (take /file/name)
    PATTERN_FILE_LIMIT                      the bytes of /files one list may read, in all (a file named twice
                                            counted once)
    PatternFiles()                          the /files of one list: .lines(path, reading) -> [(number, line)],
                                            .words(line, path, number) -> [word], .comments (the warnings met)
    file_lines(text) -> [(number, line)]    each physical line on its own (no continuation lines: a line
                                            starting with a blank is a line like any), `#` lines skipped
    line_words(line) -> [word]              the words of a line: split at blanks and commas outside braces, a
                                            word starting with `#` and what follows it dropped (a comment)
    domain_list_words(setting, items, files=None) -> [(word, where)]
                                            the list's entries with each `/file/name` entry replaced by the words
                                            of the file (a file may name another); `where` is "" for an entry
                                            of the configuration, `FILE, line N` for a word of a file

A `#` word after words of a line is dropped with the rest of the line, as Postfix 3.7 drops it; Postfix also logs
`LIST: comment at end of line is not supported: …`: mailflow keeps a warning of it in PatternFiles.comments (the
configuration's warnings(): `config check` says it, serve and reload log it), naming the file and line, not the
words. Postfix warns for every such line, but in a process of its own; mailflow's log is the whole server's, so a
file says it for its first COMMENT_WARNINGS lines only, then once how many more lines did (per list, per load).

Failure behaviour: domain_list_words and PatternFiles.lines raise ValueError naming the file (and line) and why: it
cannot be read (its error), it names itself (through others too: FileLoop) or nests deeper than MAX_FILE_DEPTH, the
list's files exceed PATTERN_FILE_LIMIT, an exclusion (`!`, which mailflow's domain lists do not have), an unbalanced
brace. A word of a file is never quoted in a reason (a file of someone else's secrets named by mistake stays
unprinted).
"""
from __future__ import annotations

import os
from typing import Iterable

from mailflow.files import FileTooLarge, read_regular_file_stat
from mailflow.syntax import split_outside_braces

DOMAIN_LIST_SETTINGS = ("mydestination", "relay_domains", "virtual_mailbox_domains", "virtual_alias_domains")
PATTERN_FILE_LIMIT = 4 << 20  # the files of one list, in all (a 200 000-domain file is about 4 MB)
MAX_FILE_DEPTH = 10  # /files naming /files: no deeper than this
COMMENT_AT_END = "comment at end of line is not supported (the rest of the line is not read, as Postfix 3.7 drops it)"
COMMENT_WARNINGS = 5  # the lines of one file that say COMMENT_AT_END; the others are counted in one more warning


class FileLoop(ValueError):
    """A /file that names itself, directly or through others."""


def file_lines(text: str) -> list[tuple[int, str]]:
    """The lines of a /file as match_list reads them (vstring_fgets: each ends at LF; one whose first character is
    `#` is skipped), with their numbers; blank ones are skipped too (they hold no word)."""
    return [(number, line) for number, line in enumerate(text.split("\n"), 1)
            if line.strip() and not line.startswith("#")]


def line_words(line: str) -> list[str]:
    """The words of one line (or of a configured item): a `#` word ends them (Postfix warns "comment at end of
    line is not supported" and drops the rest). ValueError for an unbalanced brace."""
    return _words_and_cut(line)[0]


def _words_and_cut(line: str) -> tuple[list[str], bool]:
    """(line_words(line), whether a `#` word cut them)."""
    if "{" in line or "}" in line:
        words = split_outside_braces(line)
    else:  # (most lines, split as split_outside_braces would: 200 000 of them validated in a fraction of the time)
        words = line.replace(",", " ").split()
    comment = next((i for i, word in enumerate(words) if word.startswith("#")), None)
    return (words, False) if comment is None else (words[:comment], True)


class PatternFiles:
    """The /files one list reads: each a regular file, read once however often it is named (the budget
    PATTERN_FILE_LIMIT counts it once), no loop, no deeper than MAX_FILE_DEPTH; `comments`: a warning for each line
    whose end was a comment, the first COMMENT_WARNINGS of a file, then one counting that file's others."""

    def __init__(self) -> None:
        self.left = PATTERN_FILE_LIMIT
        self._read: dict[tuple[int, int], list[tuple[int, str]]] = {}
        self._cut: dict[str, _CutLines] = {}  # by file: its lines a comment ended

    def lines(self, path: str, reading: tuple[str, ...]) -> list[tuple[int, str]]:
        """The lines of `path` (file_lines); `reading`: the files being read, outermost first."""
        if path in reading:
            raise FileLoop(f"{path} includes itself: {' -> '.join((*reading[reading.index(path):], path))}")
        if len(reading) >= MAX_FILE_DEPTH:
            raise ValueError(f"{path}: files of patterns nested deeper than {MAX_FILE_DEPTH}")
        try:
            looked = os.stat(path)
            known = self._read.get((looked.st_dev, looked.st_ino))
            if known is not None:
                return known
            data, st = read_regular_file_stat(path, self.left)
        except FileTooLarge:
            raise ValueError(f"{path}: the files of one list may hold {PATTERN_FILE_LIMIT >> 20} MB in all, this "
                             "one is larger than what is left of that") from None
        except OSError as e:  # (RefusedFile too: not a regular file)
            raise ValueError(f"open file {path}: {e.strerror or e}") from None
        self.left -= len(data)
        lines = self._read[(st.st_dev, st.st_ino)] = file_lines(data.decode("utf-8", errors="replace"))
        return lines

    def words(self, line: str, path: str, number: int) -> list[str]:
        """line_words(line), kept for a warning when a comment ended it; line `number` of `path`."""
        words, cut = _words_and_cut(line)
        if cut:
            self._cut.setdefault(path, _CutLines()).add(number)
        return words

    @property
    def comments(self) -> list[str]:
        warnings: list[str] = []
        for path, cut in self._cut.items():
            warnings.extend(f"{path}, line {number}: {COMMENT_AT_END}" for number in cut.first)
            if cut.others:
                lines_end = "line ends" if cut.others == 1 else "lines end"
                warnings.append(f"{path}: {cut.others} more {lines_end} in a comment, not read after it (not logged "
                                f"one by one: the first {COMMENT_WARNINGS} are)")
        return warnings


class _CutLines:
    """The lines of one file a comment ended: the first COMMENT_WARNINGS numbers, and how many others. A file named
    again is read again from its first line: a number not past the last one counted was counted then."""

    def __init__(self) -> None:
        self.first: list[int] = []
        self.others = 0
        self._last = 0

    def add(self, number: int) -> None:
        if number <= self._last:
            return
        self._last = number
        if len(self.first) < COMMENT_WARNINGS:
            self.first.append(number)
        else:
            self.others += 1


def domain_list_words(setting: str, items: Iterable[str],
                      files: PatternFiles | None = None) -> list[tuple[str, str]]:
    """`setting`'s entries (one word each, as the configuration holds them), each `/file/name` replaced by the
    words of the file; see the module doc. `files`: the reader (its comments wanted), else one of its own."""
    out: list[tuple[str, str]] = []
    files = files or PatternFiles()
    for item in items:
        if item.startswith("/"):
            _read_file(item, out, (), files)
        elif item.lstrip("!").startswith("/"):
            raise ValueError(f"{item}: an exclusion ('!'): mailflow's domain lists have none (list the domains "
                             f"that are in {setting} instead)")
        else:
            out.append((item, ""))
    return out


def _read_file(path: str, out: list[tuple[str, str]], reading: tuple[str, ...], files: PatternFiles) -> None:
    for number, line in files.lines(path, reading):
        where = f"{path}, line {number}"
        try:
            words = files.words(line, path, number)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        for word in words:
            if word.startswith("!"):
                raise ValueError(f"{where}: an exclusion ('!'): mailflow's domain lists have none")
            if word.startswith("/"):
                _read_file(word, out, (*reading, path), files)
            else:
                out.append((word, where))

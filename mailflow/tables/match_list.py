"""A `/file/name` in a list, read as Postfix's match_list(3) reads it (match_list_parse): the reader the domain
lists (mydestination, relay_domains, virtual_alias_domains, virtual_mailbox_domains) and the network lists
(mailflow.tables.networks) share, and the config import too (it writes the path unchanged).

    DOMAIN_LIST_SETTINGS                    the domain lists that are match lists in Postfix (take /file/name)
    PATTERN_FILE_LIMIT                      the bytes of /files one list may read, in all
    file_lines(text) -> [(number, line)]    each physical line on its own (no continuation lines: a line
                                            starting with a blank is a line like any), `#` lines skipped
    line_words(line) -> [word]              the words of a line: split at blanks and commas outside braces, a
                                            word starting with `#` and what follows it dropped (a comment)
    domain_list_words(setting, items) -> [(word, where)]
                                            the list's entries with each `/file/name` entry replaced by the words
                                            of the file (a file may name another); `where` is "" for an entry
                                            of the configuration, `FILE, line N` for a word of a file

Failure behaviour: domain_list_words raises ValueError naming the file (and line) and why: it cannot be read (its
error), it names itself (through others too) or nests deeper than MAX_FILE_DEPTH, the list's files exceed
PATTERN_FILE_LIMIT, an exclusion (`!`, which mailflow's domain lists do not have), an unbalanced brace. A word of a
file is never quoted in a reason (a file of someone else's secrets named by mistake stays unprinted).
"""
from __future__ import annotations

from typing import Iterable

from mailflow.files import FileTooLarge, read_regular_file
from mailflow.syntax import split_outside_braces

DOMAIN_LIST_SETTINGS = ("mydestination", "relay_domains", "virtual_mailbox_domains", "virtual_alias_domains")
PATTERN_FILE_LIMIT = 4 << 20  # the files of one list, in all (a 200 000-domain file is about 4 MB)
MAX_FILE_DEPTH = 10  # /files naming /files: no deeper than this


def file_lines(text: str) -> list[tuple[int, str]]:
    """The lines of a /file as match_list reads them (vstring_fgets: each ends at LF; one whose first character is
    `#` is skipped), with their numbers; blank ones are skipped too (they hold no word)."""
    return [(number, line) for number, line in enumerate(text.split("\n"), 1)
            if line.strip() and not line.startswith("#")]


def line_words(line: str) -> list[str]:
    """The words of one line (or of a configured item): a `#` word ends them (Postfix warns "comment at end of
    line is not supported" and drops the rest). ValueError for an unbalanced brace."""
    words = split_outside_braces(line)
    return words[:next((i for i, word in enumerate(words) if word.startswith("#")), len(words))]


class _Budget:
    """The bytes the files of one list may still read."""

    def __init__(self) -> None:
        self.left = PATTERN_FILE_LIMIT


def domain_list_words(setting: str, items: Iterable[str]) -> list[tuple[str, str]]:
    """`setting`'s entries (one word each, as the configuration holds them), each `/file/name` replaced by the
    words of the file; see the module doc."""
    out: list[tuple[str, str]] = []
    budget = _Budget()
    for item in items:
        if item.startswith("/"):
            _read_file(item, out, (), budget)
        elif item.lstrip("!").startswith("/"):
            raise ValueError(f"{item}: an exclusion ('!'): mailflow's domain lists have none (list the domains "
                             f"that are in {setting} instead)")
        else:
            out.append((item, ""))
    return out


def _read_file(path: str, out: list[tuple[str, str]], reading: tuple[str, ...], budget: _Budget) -> None:
    if path in reading:
        raise ValueError(f"{path} includes itself: {' -> '.join((*reading[reading.index(path):], path))}")
    if len(reading) >= MAX_FILE_DEPTH:
        raise ValueError(f"{path}: files of patterns nested deeper than {MAX_FILE_DEPTH}")
    try:
        data = read_regular_file(path, budget.left)
    except FileTooLarge:
        raise ValueError(f"{path}: the files of one list may hold {PATTERN_FILE_LIMIT >> 20} MB in all, this one "
                         f"is larger than what is left of that") from None
    except OSError as e:  # (RefusedFile too: not a regular file)
        raise ValueError(f"open file {path}: {e.strerror or e}") from None
    budget.left -= len(data)
    for number, line in file_lines(data.decode("utf-8", errors="replace")):
        where = f"{path}, line {number}"
        try:
            words = line_words(line)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        for word in words:
            if word.startswith("!"):
                raise ValueError(f"{where}: an exclusion ('!'): mailflow's domain lists have none")
            if word.startswith("/"):
                _read_file(word, out, (*reading, path), budget)
            else:
                out.append((word, where))

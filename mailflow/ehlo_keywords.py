"""leaf: the EHLO keywords smtpd can be told to discard (Postfix's smtpd_discard_ehlo_keywords, its ehlo_mask.c).

    DISCARDABLE                    the names, lower case, in Postfix's table order (its log line's order)
    discard_set(words, ignore_unknown) -> frozenset of lower-case names; ValueError naming an unknown word
    discard_log_text(discarded) -> what Postfix's smtpd logs at EHLO (`discarding EHLO keywords: ...`), or ""
                                   when it logs nothing
    discard_names(discarded) -> `8BITMIME AUTH ...`: the names in Postfix's order and spelling
    keyword_name(line_text) -> the lower-case keyword of an EHLO reply line's text (`SIZE 1000` -> `size`)
    discards_for(maps, ip, default, logger=) -> (keywords, failed): the keywords discard_ehlo_keyword_address_maps
                                   (opened) give the client's address (unknown words skipped, as Postfix's
                                   ehlo_mask), else `default`; `failed` when a table could not answer (logged to
                                   `logger`, smtpd's by default; the default then): smtpd's (through its table
                                   cache) and sendmail -bs's one answer

A discarded keyword is neither announced nor accepted, as Postfix's ehlo_discard_mask (smtpd.c): STARTTLS 502,
AUTH 503, BDAT 521 (and the session ends), the DSN parameters 501 5.7.1, the SMTPUTF8 parameter an unsupported
option; PIPELINING, SIZE, 8BITMIME, ETRN, VRFY, ENHANCEDSTATUSCODES and XCLIENT are only left out of the list.
`silent-discard` discards nothing itself: it keeps the line out of the log.

Failure behaviour: discard_set raises ValueError for a word that is not a keyword (Postfix ignores such words
silently, so that main.cf works across versions; here a misspelt keyword would discard nothing unnoticed), unless
told to skip them (a table's value, found at a connection: as Postfix).
"""
from __future__ import annotations

import logging
from typing import Iterable

from mailflow.errors import LookupRetry
from mailflow.tables import Table, find

log = logging.getLogger("mailflow.smtpd")

SILENT = "silent-discard"
# Postfix's ehlo_mask_table order; VERP and XFORWARD are Postfix's own commands (mailflow has neither: taken so that
# a main.cf's list can be copied, they discard nothing). SMTPUTF8 is logged under the table's first name for its
# bit, EHLO_MASK_SMTPUTF8, as Postfix 3.7 logs it.
DISCARDABLE = ("8bitmime", "auth", "etrn", "pipelining", "size", "verp", "vrfy", "xclient", "xforward", "starttls",
               "enhancedstatuscodes", "dsn", "smtputf8", "chunking", SILENT)
_LOGGED_AS = {"smtputf8": "EHLO_MASK_SMTPUTF8"}
_ALSO_CALLED = {"ehlo_mask_smtputf8": "smtputf8"}  # that name is Postfix 3.7's too: a list copied from its log works


def discard_set(words: Iterable[str], ignore_unknown: bool = False) -> frozenset[str]:
    """The keywords of a configured list (any case; several to an item, separated by commas or blanks; SMTPUTF8
    also by Postfix's other name for it, EHLO_MASK_SMTPUTF8);
    `ignore_unknown`: a word that is no keyword is skipped, as Postfix skips it (a table's value, read at each
    connection)."""
    found = set()
    for item in words:
        for word in item.replace(",", " ").split():
            name = word.lower()
            name = _ALSO_CALLED.get(name, name)
            if name not in DISCARDABLE:
                if ignore_unknown:
                    continue
                raise ValueError(f"{word!r} is not an EHLO keyword that can be discarded "
                                 f"(one of: {', '.join(DISCARDABLE)})")
            found.add(name)
    return frozenset(found)


def discard_log_text(discarded: frozenset[str]) -> str:
    """Postfix's `discarding EHLO keywords: 8BITMIME AUTH ...` (its table's order), or "" when it logs nothing:
    nothing discarded, silent-discard, or ENHANCEDSTATUSCODES discarded (Postfix 3.7's ehlo_cmd logs only when
    that one is announced)."""
    if not discarded or SILENT in discarded or "enhancedstatuscodes" in discarded:
        return ""
    return "discarding EHLO keywords: " + discard_names(discarded)


def discard_names(discarded: frozenset[str]) -> str:
    """The keywords as Postfix's str_ehlo_mask writes them: upper case, its table's order."""
    return " ".join(_LOGGED_AS.get(name, name.upper()) for name in DISCARDABLE if name in discarded)


def keyword_name(text: str) -> str:
    """The keyword of one EHLO line's text, lower case: `AUTH PLAIN LOGIN` -> `auth`."""
    return text.split(" ", 1)[0].lower()


def discards_for(maps: list[Table], ip: str, default: frozenset[str], *,
                 logger: logging.Logger | logging.LoggerAdapter = log) -> tuple[frozenset[str], bool]:
    """See the module doc (a blocking table waits here: call it off the event loop; postscreen asks its maps with
    stages.smtpd.command_filter.replacement, each with its own failure log)."""
    if not maps:
        return default, False
    try:
        found = find(maps, [ip])
    except LookupRetry as e:
        logger.warning("discard_ehlo_keyword_address_maps: %s: %s", ip, e.reason)
        return default, True
    return (default if found is None else discard_set([found[2]], ignore_unknown=True)), False

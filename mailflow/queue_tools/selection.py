"""Which messages an operator means: queue names, queue ids and selectors, and the walk over what they select.

- `parse_selection(args, sender=, to_domain=, older_than=, stdin=, required=)`: queue ids, `ALL` (`ALL deferred`:
  only those queues, as postsuper takes it; a word with ALL that names no queue is an error naming it), `-` (ids
  on stdin, as `postsuper -d -` reads them) and the selectors `--from`, `--to-domain`, `--older-than`, combined
  with AND, into a `Selection`. A bare selection is refused unless `required=False` (a bare `mailflow queue
  delete` must not mean everything). With `invalid=`, a token that is no queue id is reported to it and skipped
  when it returns (postsuper's "warning: invalid mail queue id"), or ends the parse when it raises (`queue flush`:
  postqueue -i's "Cannot flush queue ID - invalid name"); without it, it is an error.
- `parse_queues('incoming,deferred' | 'all')`, `clean_id(token)` (a trailing `*` or `!` from mailq dropped).
- `pages(store, queues, selection, now, ids_only=)`: the selected messages in id order, a page (CHUNK) at a
  time: `MessageRow`s, or ids.
Bad input raises `SelectionError`, whose message says what to give.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import IO, AsyncIterator, Callable, Iterator, Sequence

from mailflow.address import normalise_domain
from mailflow.store import QUEUES  # (maildrop: requeued, not yet copied)
from mailflow.syntax import parse_duration

LISTED_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")  # what mailq shows, like Postfix's showq
CHUNK = 1000  # ids per transaction (and per page read)
ID_CHUNK = 500  # explicit ids per IN (...) query
NULL_SENDER = "MAILER-DAEMON"


class SelectionError(ValueError):
    """The command line does not say which messages: the message says what to give."""


@dataclass(frozen=True)
class Selection:
    """Which messages: `ids` (None: any), and selectors that must all hold."""

    ids: tuple[str, ...] | None = None
    sender: str | None = None  # '' is the null sender
    rcpt_domain: str | None = None
    older_than: float | None = None  # seconds
    queues: tuple[str, ...] | None = None  # postsuper's `ALL deferred`: only these queues (None: any)

    @property
    def everything(self) -> bool:
        return self.mass and self.queues is None

    @property
    def mass(self) -> bool:
        """postsuper's mass operation: `ALL` (with queue names or not), no id, no selector."""
        return self.ids is None and self.sender is None and self.rcpt_domain is None and self.older_than is None

    def within(self, queues: Sequence[str]) -> tuple[str, ...]:
        """Those of `queues` the selection allows."""
        return tuple(q for q in queues if self.queues is None or q in self.queues)

    def filters(self, now: float) -> dict:
        """The selectors as the store's keyword arguments."""
        return {"sender": self.sender, "rcpt_domain": self.rcpt_domain,
                "arrived_before": None if self.older_than is None else now - self.older_than}


_ID = re.compile(r"[0-9A-Za-z]+")
MAX_ID = 255  # Postfix's mail_queue_id_ok (VALID_HOSTNAME_LEN): a longer word is no queue id
SHOWN = 100  # characters of a word that is no queue id repeated in the error


def clean_id(token: str) -> str:
    """A queue id as typed or pasted from mailq (a trailing `*` or `!` is dropped)."""
    qid = token.strip().rstrip("*!")
    if len(qid) > MAX_ID or not _ID.fullmatch(qid):
        shown = repr(token) if len(token) <= SHOWN else f"{token[:SHOWN]!r}... ({len(token)} characters)"
        raise SelectionError(f"{shown} is not a queue id")
    return qid


def parse_sender(value: str) -> str:
    """'<a@b>' -> 'a@b'; '<>', '' and MAILER-DAEMON -> '' (the null sender)."""
    v = value.strip()
    if v.startswith("<") and v.endswith(">"):
        v = v[1:-1].strip()
    return "" if v.upper() == NULL_SENDER else v


def parse_domain(value: str) -> str:
    d = normalise_domain(value.strip().lstrip("@"))
    if not d:
        raise SelectionError(f"{value!r} is not a domain")
    return d


def parse_age(value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise SelectionError(f"--older-than: {e}") from None


def parse_selection(args: Sequence[str], *, sender: str | None = None, to_domain: str | None = None,
                    older_than: str | None = None, stdin: IO[str] | None = None, required: bool = True,
                    invalid: Callable[[str], None] | None = None) -> Selection:
    """Queue ids, `ALL` (optionally followed by queue names, like `postsuper -d ALL deferred`) or `-` (ids from
    `stdin`, one or more a line) plus selectors -> a Selection.

    `required`: refuse an empty selection (a bare `mailflow queue delete` must not mean everything).
    `invalid`: given, a token that is no queue id is passed to it (as a message); if it returns, the token is
    skipped, as postsuper warns and goes on; it may raise instead, which ends the parse there (queue flush's does,
    as postqueue -i refuses the id: nothing is selected). Not given, such a token raises SelectionError. The ids
    named stay a selection even if none is left.
    """
    everything = "ALL" in args
    tokens = [a for a in args if a not in ("ALL", "-")]
    queues = None
    if everything and tokens:  # `ALL deferred`: what goes with ALL is queue names, as postsuper takes it
        queues, tokens = _queues_with_all(tokens), []
    if "-" in args:
        if stdin is None:
            raise SelectionError("'-' reads queue ids from standard input, but there is none")
        tokens += [t for line in stdin for t in line.split()]
    if everything and tokens:
        raise SelectionError("give either queue ids or ALL, not both")
    ids = tuple(dict.fromkeys(_valid_ids(tokens, invalid))) if tokens or "-" in args else None
    selection = Selection(
        ids=ids,
        sender=None if sender is None else parse_sender(sender),
        rcpt_domain=None if to_domain is None else parse_domain(to_domain),
        older_than=None if older_than is None else parse_age(older_than),
        queues=queues,
    )
    if required and selection.everything and not everything:
        raise SelectionError("say which messages: queue ids, ALL, '-' (ids on stdin), "
                             "or a selector (--from, --to-domain, --older-than)")
    return selection


def _queues_with_all(tokens: Sequence[str]) -> tuple[str, ...]:
    """The queue names given with `ALL` (after it, or before); a word that is none (a typo such as `deferd`, a
    queue id) is refused by name, as postsuper refuses it ("invalid directory name"), rather than taken for an id
    that cannot go with ALL."""
    strangers = [t for t in tokens if t.lower() not in QUEUES]
    if strangers:
        shown = ", ".join(repr(t[:SHOWN]) for t in strangers[:3]) + (", ..." if len(strangers) > 3 else "")
        raise SelectionError(f"with ALL come queue names only ({', '.join(QUEUES)}), not {shown}; "
                             "give queue ids without ALL")
    return parse_queues(",".join(tokens))


def _valid_ids(tokens: Sequence[str], invalid: Callable[[str], None] | None) -> Iterator[str]:
    for token in tokens:
        try:
            yield clean_id(token)
        except SelectionError as e:
            if invalid is None:
                raise
            invalid(str(e))


def parse_queues(value: str) -> tuple[str, ...]:
    """'incoming,deferred' -> ('incoming', 'deferred'); 'all' -> every queue."""
    names = tuple(dict.fromkeys(q.strip().lower() for q in value.split(",") if q.strip()))
    if names == ("all",):
        return QUEUES
    bad = [q for q in names if q not in QUEUES]
    if bad or not names:
        raise SelectionError(f"unknown queue {', '.join(bad) or repr(value)} (use {', '.join(QUEUES)})")
    return names


async def pages(store, queues: Sequence[str], selection: Selection, now: float, *, ids_only: bool,
                size: int = CHUNK, through: str | None = None) -> AsyncIterator[list]:
    """The selected messages in id order, a page at a time: MessageRows, or ids when `ids_only`; with `through`,
    none with a larger id."""
    fetch = store.message_ids if ids_only else store.message_page
    filters = selection.filters(now)
    if selection.ids is not None:
        for i in range(0, len(selection.ids), ID_CHUNK):
            chunk = sorted(selection.ids[i:i + ID_CHUNK])
            page = await fetch(queues=queues, ids=chunk, limit=len(chunk), **filters)
            if page:
                yield page
        return
    after = ""
    while True:
        page = await fetch(queues=queues, after=after, limit=size, **filters)
        if through is not None:
            page = [row for row in page if (row if ids_only else row.queue_id) <= through]
        if not page:
            return
        yield page
        after = page[-1] if ids_only else page[-1].queue_id

"""cleanup's content inspection: Postfix header_checks(5) and body_checks on regexp (or any) tables.

    ContentChecks(config.checks, workers=pool)   the tables, opened once; `enabled` is False with none set;
                                                 `pool`: the threads long walks run in (a BoundedWorkers, Cost;
                                                 None: the loop's default executor), owned by the caller (the
                                                 server: one for every reload's checks, ended at the stop)
    check_pool() -> BoundedWorkers               that pool: daemon threads (a walk only reads: the process's exit
                                                 need not wait for one)
    CHECK_WORKERS, CHECK_WAIT                    its threads, and how long a walk waits for one (see below)
    await checks.inspect(queue_id, head, body, log)  -> Inspection (or raises ContentRejected)
    LONG_KEY, long_head(head)                    past this a header section or body is matched off the event loop (Cost)
    header_key, is_mime_header, entity_type, Boundaries   how a header field is matched and
                                                 where MIME parts begin and end (the SMTP client's checks too:
                                                 mailflow.transports.smtp_checks)
    lookup_action(tables, key), split_action(value)   the first table's answer; its action word and text

What is matched (Postfix's rules): each logical header of the message, its lines joined by their line breaks
(`X-Folded: a\\n b`, as Postfix's cleanup keeps them, CR dropped; no line end after the last) against
header_checks (in a regexp table `.` matches the break, as in POSIX regexec; in a pcre table too), its
MIME headers (is_mime_header: Content-Type, MIME-Version, ...) and those of every MIME part against
mime_header_checks, the headers of an attached message (message/rfc822) against nested_header_checks (each of
these two defaults to header_checks); each body line (without its line end, boundaries included; a part's header
section ends at an empty line or at a line that is no header field, a body line then: Postfix's mime_state)
against body_checks, for at most `body_checks_size_limit` bytes of each body part. At most MIME_NESTING_LIMIT
boundaries are open, each cut at MIME_BOUNDARY_LIMIT bytes.
The body is read as a stream (mailflow.content: chunk by chunk, file parts in a worker thread). Cost: a lookup is
linear in the key, times the rules when RE2's DFA runs out of memory (LONG_KEY): the header pass runs in a worker
thread when the header section is longer than LONG_KEY (many fields just under it cost as one long one: 48 x 2 KB
against 3000 rules held the loop 1.1 s), the body walk when the body is (the checks' order is unchanged).
Those threads are cleanup's checks' own (the server's pool of CHECK_WORKERS): nearly every message's walk goes to
one, and a queue of slow walks must not hold up the jobs of asyncio's default pool (file reads, DNS, delivery; the
SMTP client's checks still use that pool). A walk waits for one of the checks' threads as long as they make
progress (a walk tells them at each line it reads: a long but working walk is progress too): once none has
finished or moved on in a walk for CHECK_WAIT s (walks stuck in a hung table, a sqlite read on a hung
NFS), it gives up with LookupRetry (451 4.3.0, mailflow.workers); a blocking table's deadline counts from when
the walk has its thread (TableCache.run). A session cancelled meanwhile (the client gone, a shutdown), or a walk past a
table's deadline (answered 451), marks its walk abandoned: it stops at the next line and logs nothing more (no
reject: or warning: for a message nobody queues).

Actions (the table's value; the first word, any case, ended by a space or a TAB):
    REJECT [text]      the message is refused: ContentRejected, 550 5.7.1 text (default "message content rejected");
                       a text starting with an enhanced code gives that code, a 4.X.Y one defers: TemporaryError, 451
    DISCARD [text]     accepted and dropped (`Inspection.discard`); the inspection stops
    HOLD [text]        queued on hold (`Inspection.hold`), the inspection goes on (a second HOLD: nothing)
    WARN [text]        logged, nothing else
    INFO [text]        the same, logged with `info:` (Postfix 3.2)
    IGNORE             the header (or body line) is removed
    STRIP [text]       the same, logged (`strip: header X-A: 1 from ...: text`; Postfix 3.2)
    PREPEND text       `text` is inserted before the header (or body line)
    REPLACE text       the header (or body line) is replaced by `text`
                       (for a header, `text` must be a header field: otherwise logged and ignored, as Postfix)
    REDIRECT address   every recipient is replaced by `address`; the inspection stops
    BCC address        one more recipient (`Inspection.bcc`, each BCC kept; Postfix 3.0); not an address: ignored
    PASS [text]        the inspection stops (Postfix 3.2)
    FILTER transport:nexthop   the message goes to that after-queue filter
    DUNNO, OK          nothing: next line
An action mailflow does not know is logged and ignored, as Postfix does. Where the inspection stops (REJECT,
DISCARD, REDIRECT, PASS: Postfix's cleanup clears CLEANUP_FLAG_FILTER) no later header, MIME header, nested
header or body line is looked up; edits made before stay.

Failure behaviour: a REJECT raises ContentRejected (or TemporaryError); a table that cannot answer (LookupRetry)
propagates: cleanup does not queue the message and smtpd answers 451 4.3.0; the content file being unreadable
raises OSError (451 as well).
"""
from __future__ import annotations

import logging
import re
import contextlib
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from mailflow.content import Content
from mailflow import address, status
from mailflow.errors import ContentRejected, DeliveryError, LookupRetry, TemporaryError
from mailflow.message import header_fields, starts_header_field
from mailflow.tables import Table, TableCache
from mailflow.workers import BoundedWorkers

log = logging.getLogger("mailflow.cleanup")
T = TypeVar("T")

# The longest key matched on the event loop. A regexp/pcre lookup is linear in the key, but its RE2 set pass costs
# key x rules once RE2's DFA runs out of memory: 300 rules `/^Subject:.*wordN.{0,40}x/` take 0.2 ms on a 3.3 KB
# key and 39 ms on a 4.4 KB one, 2000 rules `/\bwordN\b/` 0.15 ms at 2 KB and seconds at 100 KB. google-re2's
# search releases the GIL (the loop ticked every ms through a 0.9 s search in a thread), so a longer key is
# matched in a worker thread (105 us a round trip here). A body up to this size is walked on the loop.
LONG_KEY = 2048
CHECK_WORKERS = 2  # the content checks' own threads (a walk is CPU: more threads than cores gain nothing)
CHECK_WAIT = 60.0  # seconds a walk waits for one of them while no walk moves on a line (then LookupRetry: hung)
MAX_LINE = 1 << 20  # a "line" longer than this is matched as this much (a body without line ends)
_BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]+)"|([^\s;]+))', re.IGNORECASE)


def check_pool() -> BoundedWorkers:
    """The threads the checks' long walks run in (see the module docstring): daemon ones, as a walk only reads."""
    return BoundedWorkers(CHECK_WORKERS, CHECK_WAIT, "content checks", daemon=True)


@dataclass
class Inspection:
    """What the checks decided: the header section and body to queue (edited or as they were), and marks."""

    head: bytes
    body: Content
    hold: str | None = None
    discard: str | None = None
    redirect: str | None = None
    content_filter: str | None = None
    warnings: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)  # recipients BCC actions add, in order
    stopped: bool = False  # DISCARD, REDIRECT or PASS: nothing more is looked up
    abandoned: bool = False  # the session awaiting it was cancelled: nothing more is looked up or logged


@dataclass
class _Entity:
    """One MIME entity being read: which header checks apply, its boundary once its headers are known."""

    kind: str  # "message" (the primary), "mime" (a part), "nested" (an attached message's)
    content_type: str = ""
    boundary: str | None = None


class ContentChecks:
    """See the module doc."""

    def __init__(self, checks, tables: TableCache | None = None, workers: BoundedWorkers | None = None):
        tables = tables or TableCache()
        self._header = tables.open(checks.header_checks) if checks.header_checks else []
        self._mime = tables.open(checks.mime_header_checks) if checks.mime_header_checks else self._header
        self._nested = tables.open(checks.nested_header_checks) if checks.nested_header_checks else self._header
        self._body = tables.open(checks.body_checks) if checks.body_checks else []
        self._limit = checks.body_checks_size_limit
        self.tables = tables
        self._workers = workers  # the caller's: it ends them (after the last inspection that may use them)
        self._moved = workers.moved if workers is not None else _unwatched  # (a walk's progress, each line)

    @property
    def enabled(self) -> bool:
        return bool(self._header or self._mime or self._nested or self._body)

    @property
    def _walks_body(self) -> bool:
        return bool(self._body or self._mime or self._nested)

    async def inspect(self, queue_id: str, head: bytes, body: Content, describe: str = "") -> Inspection:
        """`head`: the header section as received; `body`: the rest (starting with the empty line).
        `describe`: how the log names the message's origin (`from host[ip]; from=<s> to=<r>`)."""
        result = Inspection(head=head, body=body)
        check = (queue_id, head, self._header, "header", result, describe)
        if long_head(head):
            result.head = await self._off_loop(result, lambda: self._check_headers(*check, top=True))
        else:
            result.head = self._check_headers(*check, top=True)
        if self._walks_body and not result.stopped:
            if body.in_memory and body.size <= LONG_KEY:
                self._walk_body(queue_id, head, result, describe)
            else:
                await self._off_loop(result, lambda: self._walk_body(queue_id, head, result, describe))
        return result

    async def _off_loop(self, result: Inspection, work: Callable[[], T]) -> T:
        """`work` in one of the checks' own threads (else the loop's default executor; a blocking table's deadline
        kept: TableCache.run); when the caller stops waiting for it (cancelled, or a table's deadline passed:
        LookupRetry, answered 451), `result` is marked abandoned and the thread's walk stops logging and looking
        up."""
        try:
            if self._workers is None:
                return await self.tables.run(work, off_loop=True)
            async with contextlib.AsyncExitStack() as reserved:
                try:
                    submit = await reserved.enter_async_context(self._workers.slot())
                except TemporaryError as e:  # every thread held by a hung walk: as a table that cannot answer
                    raise LookupRetry(e.text) from None
                return await self.tables.run(work, off_loop=True, workers=submit)
        except BaseException:  # (the walk's own failure too: it has ended, nothing of it runs after this)
            result.abandoned = True
            raise

    # -------------------------------------------------------------------------------- headers

    def _check_headers(self, queue_id: str, head: bytes, tables: list[Table], what: str, result: Inspection,
                       describe: str, *, top: bool = False) -> bytes:
        """Every header of `head` through `tables` (MIME headers of the top level through mime_header_checks);
        the header section, edited if an action said so."""
        out: list[bytes] = []
        changed = False
        for name, lines in header_fields(head):
            self._moved()
            raw = b"".join(lines)
            if not name:
                out.append(raw)
                continue
            use = self._mime if top and is_mime_header(name) else tables
            key = header_key(raw)
            action = lookup_action(use, key) if use and not (result.stopped or result.abandoned) else None
            if action is None:
                out.append(raw)
                continue
            replacement = self._act(queue_id, action, what, key, result, describe, original=raw)
            if replacement is not None:
                out.extend(replacement)
                changed = True
            else:
                out.append(raw)
        return b"".join(out) if changed else head

    # -------------------------------------------------------------------------------- body

    def _walk_body(self, queue_id: str, head: bytes, result: Inspection, describe: str) -> None:
        """Read the body line by line as Postfix's mime_state does: MIME part headers (a part's header section
        ends at an empty line or at a line that is no header field, which is a body line), nested message headers,
        body lines (boundaries included: Postfix's body_checks see them)."""
        top = _Entity("message", *entity_type(head))
        boundaries = Boundaries(top.boundary)
        state = "nested" if top.content_type == "message/rfc822" else "body"
        part_headers: list[bytes] = []
        part_bytes = 0
        edits: list[tuple[int, int, list[bytes]]] = []  # (offset, length, replacement lines) in the body
        offset = 0
        for line in _lines(result.body):
            if result.stopped or result.abandoned:  # nothing more is looked up: the rest need not be read
                break
            self._moved()
            length = len(line)
            text = line.rstrip(b"\r\n")
            if offset == 0 and not text:  # the empty line that ends the primary headers: no entity's, no body line
                offset += length
                continue
            if state in ("mime", "nested"):
                if _in_header_section(line, text, part_headers):
                    part_headers.append(line)
                    offset += length
                    continue
                state = self._end_part_head(queue_id, state, b"".join(part_headers), boundaries, result, describe,
                                            blank=not text)
                part_headers, part_bytes = [], 0
                if not text:
                    offset += length
                    continue
            delimiter = boundaries.delimiter(text)
            if self._body and part_bytes < self._limit:
                action = lookup_action(self._body, as_key(text[:MAX_LINE]))
                if action is not None:
                    lines = self._act(queue_id, action, "body", as_key(text), result, describe)
                    if lines is not None:
                        edits.append((offset, length, lines))
            part_bytes += length
            if delimiter is not None:
                state, part_bytes = ("mime" if delimiter == "part" else "body"), 0
            offset += length
        if edits:
            result.body = _spliced(result.body, edits)

    def _end_part_head(self, queue_id: str, state: str, entity_head: bytes, boundaries: Boundaries,
                       result: Inspection, describe: str, *, blank: bool) -> str:
        """A part's (or nested message's) header section is complete: checked; the state of what follows."""
        tables = self._mime if state == "mime" else self._nested
        if tables:
            self._check_headers(queue_id, entity_head, tables, "header", result, describe)
        content_type, boundary = entity_type(entity_head)
        boundaries.push(boundary)
        return "nested" if blank and content_type == "message/rfc822" else "body"

    # -------------------------------------------------------------------------------- actions

    def _act(self, queue_id: str, value: str, what: str, line: str, result: Inspection, describe: str,
             *, original: bytes | None = None) -> list[bytes] | None:
        """Carry out one action. Returns replacement lines for an edit (IGNORE: []), else None. Each action but
        DUNNO, OK and IGNORE is logged as Postfix's cleanup logs it: `QID: reject: header Subject: x from
        host[ip]; from=<s> to=<r> proto=ESMTP helo=<h>: 5.7.1 text`."""
        if result.abandoned:  # (the session is gone: its message is not queued, nothing of it is logged)
            return None
        word, text = split_action(value)
        shown = line[:200]
        if word not in ("PREPEND", "REPLACE"):  # (their text goes into the message, its bytes as they are)
            if word in ("REDIRECT", "BCC", "FILTER") and not text.isascii() and _SURROGATES.search(text):
                raise LookupRetry(f"{what}_checks: non-UTF-8 {word} text {text!r}")  # (no address or transport)
            text = reply_text(text)
        if word in ("DUNNO", "OK"):
            return None
        if word == "IGNORE":
            return []
        if word == "HOLD" and result.hold is not None:  # Postfix: only the first HOLD is taken (and logged)
            return None
        if word == "BCC" and address.mailbox_syntax_error(text) is not None:
            log.warning("%s: bad BCC address %r in %s_checks -- need user@domain (ignored)", queue_id, text, what)
            return None
        if word in ("PREPEND", "REPLACE") and what == "header" and text and not starts_header_field(text):
            log.warning("%s: bad %s header text %r in header_checks -- need \"headername: headervalue\" (ignored)",
                        queue_id, word, text)  # Postfix: a line that is no header field would end the section
            return None
        if word == "REJECT":  # (raised as made: a local holding it would be held by its traceback, a cycle)
            raise _logged_rejection(queue_id, text, what, shown, describe)
        _log_action(queue_id, "warning" if word == "WARN" else word.lower(), what, shown, describe, text)
        return self._carry_out(queue_id, word, text, value, what, line, result, original=original)

    @staticmethod
    def _carry_out(queue_id: str, word: str, text: str, value: str, what: str, line: str, result: Inspection,
                   *, original: bytes | None = None) -> list[bytes] | None:
        shown = line[:200]
        if word == "DISCARD":
            result.discard = text or f"{what} {shown}"
            result.stopped = True
        elif word == "PASS":
            result.stopped = True
        elif word == "BCC":
            result.bcc.append(text)
        elif word == "HOLD":
            result.hold = text or f"{what} {shown}"
        elif word == "WARN":
            result.warnings.append(f"{what} {shown}")
        elif word == "INFO":
            pass  # logged, as WARN is, with `info:`
        elif word == "STRIP":  # (Postfix 3.2: IGNORE, logged)
            return []
        elif word == "REDIRECT" and text:
            result.redirect = text
            result.stopped = True
        elif word == "FILTER" and ":" in text:
            result.content_filter = text
        elif word in ("PREPEND", "REPLACE") and text:
            # ($N of a folded header may hold its line breaks, each followed by the folding blank: CR LF there,
            # never an empty line, which would end the header section)
            new = text.rstrip("\n").replace("\n", "\r\n").encode("utf-8", "surrogateescape") + b"\r\n"
            return [new] if word == "REPLACE" else [new, original if original is not None else _original(line)]
        else:
            log.warning("%s: unknown %s_checks action %r (ignored)", queue_id, what, value)
        return None


def reply_text(text: str) -> str:
    """An action's text as Postfix's cleanup passes it on (checked with a private Postfix 3.7, smtputf8_enable =
    yes): each ASCII control (a line break of a folded header's `$1` too) and each byte that is not UTF-8 (a
    surrogate) a space; UTF-8 kept. A REJECT's text is the reply's: one line, no bytes SMTP cannot carry."""
    if text.isascii() and text.isprintable():
        return text
    return _UNPRINTABLE.sub(" ", text)


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_SURROGATES = re.compile("[\ud800-\udfff]")


def _log_action(queue_id: str, action: str, what: str, shown: str, describe: str, logged: str) -> None:
    log.info("%s: %s: %s %s%s%s", queue_id, action, what, shown, f" {describe}" if describe else "",
             f": {logged}" if logged else "")


def _logged_rejection(queue_id: str, text: str, what: str, shown: str, describe: str) -> DeliveryError:
    rejection = _rejection(text, f"{what} {shown}")
    _log_action(queue_id, "reject", what, shown, describe, f"{rejection.dsn} {rejection.text}")
    return rejection


def _rejection(text: str, reason: str) -> DeliveryError:
    """REJECT's refusal, as Postfix's cleanup makes it (dsn_prepend): an enhanced code starting `text` is the
    reply's, and one of class 4 defers the message (451) instead of refusing it (550); no text: 5.7.1 message
    content rejected."""
    if not text:
        return ContentRejected(status.CONTENT_REJECTED.status, status.CONTENT_REJECTED.text, reason)
    leading, text = status.split_leading_dsn(text)
    dsn = leading or "5.7.1"
    if dsn[0] == "5":
        return ContentRejected(dsn, text, reason)
    return TemporaryError("4" + dsn[1:], text, reason)  # (Postfix: a class 2 code is made a 4, with a warning)


def _original(line: str) -> bytes:
    """A matched body line as it goes back after a PREPEND (a header goes back as it came, folded)."""
    return line.encode("utf-8", "surrogateescape") + b"\r\n"


def long_head(head: bytes) -> bool:
    """The header section `head` is longer than LONG_KEY: its header pass is matched off the event loop (cleanup's,
    and the SMTP and LMTP clients'). Its total, as the body walk's: each field's lookups cost its length x rules,
    so many fields just under LONG_KEY cost as much as one long one."""
    return len(head) > LONG_KEY


def lookup_action(tables: list[Table], key: str) -> str | None:
    """The first table's answer (a folded header's key holds its line breaks: a regexp or pcre table's `.` matches
    them). A key's bytes that are not UTF-8 (surrogates: as_key) go to a pattern table as they are (pcre matches
    them, regexp as U+FFFD), to a fixed one as U+FFFD (a database cannot take them). A pcre answer is taken as its
    bytes (lookup_unchecked: a `$1` of such a key, or one that cuts a character), as Postfix's cleanup takes it:
    an action's text may hold surrogates (see ContentChecks._act)."""
    replaced = None
    for table in tables:
        if table.fixed and not key.isascii():
            replaced = replaced or key.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        lookup = getattr(table, "lookup_unchecked", table.lookup)
        value = lookup(replaced if table.fixed and replaced is not None else key)
        if value is not None:
            return value
    return None


def as_key(raw: bytes) -> str:
    """A header field's or body line's bytes as the key checks match: each byte that is not UTF-8 kept as a
    surrogate (surrogateescape), so that a pcre table matches the bytes Postfix's cleanup hands its checks (it
    does not skip such a key: tests/interop/test_pcre_vs_postfix.py), and an edit writes them back unchanged."""
    return raw.decode("utf-8", "surrogateescape")


def split_action(value: str) -> tuple[str, str]:
    """(the action's word in upper case, its text): the word ends at a space or a TAB, as Postfix's
    strcspn(cmd, " \\t"), and the text starts after the blanks that follow it."""
    value = value.strip()
    end = next((i for i, c in enumerate(value) if c in " \t"), len(value))
    return value[:end].upper(), value[end:].strip()


def header_key(raw: bytes) -> str:
    """A header field as header_checks match it (Postfix's cleanup): its lines joined by LF, no final line end."""
    return as_key(raw.replace(b"\r\n", b"\n").removesuffix(b"\n"))


def _logical(raw: bytes) -> str:
    """A header field as one line: continuation line ends removed (the folding whitespace stays)."""
    return as_key(raw.replace(b"\r\n", b"").replace(b"\n", b""))


MIME_HEADERS = frozenset({"content-description", "content-disposition", "content-id", "content-transfer-encoding",
                          "content-type", "mime-version"})  # Postfix's header_opts.c HDR_OPT_MIME


def is_mime_header(name: str) -> bool:
    """`name` (lower case) is a MIME header for mime_header_checks; any other Content-* (Content-Language,
    Content-Base, ...) is an ordinary header, as in Postfix."""
    return name in MIME_HEADERS


def entity_type(head: bytes) -> tuple[str, str | None]:
    """(content type in lower case, multipart boundary or None) of a header section."""
    for name, lines in header_fields(head):
        if name == "content-type":
            value = _logical(b"".join(lines)).partition(":")[2].strip()
            content_type = value.split(";", 1)[0].strip().lower()
            found = _BOUNDARY.search(value) if content_type.startswith("multipart/") else None
            boundary = (found.group(1) or found.group(2)) if found else None
            return content_type, boundary
    return "text/plain", None


MIME_NESTING_LIMIT = 100  # Postfix's mime_nesting_limit: a multipart nested deeper opens no boundary
MIME_BOUNDARY_LIMIT = 2048  # Postfix's mime_boundary_length_limit: a longer boundary is kept (and matched) cut


class Boundaries:
    """The open multipart boundaries, innermost last (Postfix's mime_state stack), bounded: at most
    MIME_NESTING_LIMIT of them, each cut at MIME_BOUNDARY_LIMIT bytes (so a line costs at most their sum to test).

        .push(boundary)        a multipart part's boundary (None: nothing)
        .delimiter(text) -> "part" | "end" | None   a line without its line end, as Postfix's mime_state reads it:
                               `--boundary` of an open boundary starts it (any text after: Postfix ignores trailing
                               cruft), the ones opened after it are closed; "end" when `--` follows the boundary
                               (that one is closed too), "part" otherwise (a part's header section follows)."""

    def __init__(self, boundary: str | None = None) -> None:
        self._open: list[bytes] = []
        self.push(boundary)

    def __bool__(self) -> bool:
        return bool(self._open)

    def push(self, boundary: str | None) -> None:
        if boundary and len(self._open) < MIME_NESTING_LIMIT:
            self._open.append(b"--" + boundary.encode("utf-8", "surrogateescape")[:MIME_BOUNDARY_LIMIT])

    def delimiter(self, text: bytes) -> str | None:
        if not self._open or not text.startswith(b"--"):
            return None
        for i in range(len(self._open) - 1, -1, -1):
            delimiter = self._open[i]
            if text.startswith(delimiter):
                del self._open[i + 1:]
                if text[len(delimiter):len(delimiter) + 2] == b"--":
                    self._open.pop()
                    return "end"
                return "part"
        return None


def _in_header_section(line: bytes, text: bytes, held: list[bytes]) -> bool:
    """`line` goes on a part's header section: a header field, or a continuation of one."""
    if not text:
        return False
    if line[:1] in (b" ", b"\t"):
        return bool(held)
    return starts_header_field(text.decode("latin-1"))


def _lines(content: Content):
    """The lines of `content` with their line ends, read chunk by chunk (a line longer than MAX_LINE is cut)."""
    rest = b""
    for chunk in content.chunks():
        data = rest + chunk
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            yield data[start:end + 1]
            start = end + 1
        rest = data[start:]
        if len(rest) > MAX_LINE:
            yield rest
            rest = b""
    if rest:
        yield rest


def _spliced(body: Content, edits: list[tuple[int, int, list[bytes]]]) -> Content:
    """`body` with each (offset, length) replaced by its lines; the untouched ranges are not copied."""
    parts: list = []
    position = 0
    for offset, length, lines in edits:
        parts.extend(body.after(position).before(offset - position).parts)
        parts.extend(lines)
        position = offset + length
    parts.extend(body.after(position).parts)
    return Content(parts)


def _unwatched() -> None:
    """A walk's progress where nobody waits on it (no BoundedWorkers)."""

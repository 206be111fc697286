"""The capture mailbox: every message the `capture` transport delivered, in memory, oldest first.

    Mailbox(max_messages, max_bytes, clock, transcripts=None, history=None)
        add(envelope, raw, queue_id) -> CapturedMessage     (the capture transport calls it)
        messages -> [CapturedMessage]   get(id) -> CapturedMessage | None   latest()
        delete(ids) / clear()           accepted, accepted_bytes, deleted (counts since the start); dropped
                                        (by the bounds, since the last clear), dropped_note() (for a report)
        await wait(criteria, count, timeout) -> [CapturedMessage]    at least `count` matching messages
        changed()                       a message's read flag changed: waits look again
        close()                         no more messages will come (the embedded Sink stopped): waits end
    CapturedEnvelope     what the server was told: sender, recipients, and per recipient the address first given
                         and the DSN parameters (NOTIFY, ORCPT); ENVID, RET; SMTPUTF8, BODY
    CapturedMessage      envelope, raw bytes, `message` (parsed, email.policy.default), `fields` (the header
                         fields alone), queue id, `transcript`
                         (the SMTP session that submitted it: model.SessionTranscript, None when it did not come
                         over SMTP or no transcripts are kept), `history` (the queue's events for its queue id,
                         as they are now), and helpers: subject, text, html, snippet, attachments, inline, links,
                         header(), contacts (each address header's (name, address) pairs);
                         `await parse_off_loop()` parses it in the mailbox's thread (what the HTTP API does
                         first)
    Criteria(to, sender, subject, match, settled=False)   which messages a wait or a test wants (see `matches`)
    refuse_written_address(name, value)   ValueError for an address written as a report or a header writes it
                         (`Bob <bob@example.com>`), naming the address alone: Criteria's and the Sink's faults'
    WaitTimeout          (an AssertionError) raised by `wait`: its text counts what did arrive and lists the
                         newest REPORT_LIMIT of those messages, and says how many older ones the bounds dropped
    await parsed_off_loop(messages)     each parsed in turn (CapturedMessage.parse_off_loop)
    await parsed_by(messages, deadline) -> those parsed by then
    await sliced(items, fn) -> [fn(item)]   SLICE at a time, handing the loop back before each (a search term
                         or a summary parses its message: a whole mailbox at once held every session 3.7 s)

Bounded: past `max_messages` or `max_bytes` the oldest messages are dropped (counted as deleted). The bytes
counted are each message's raw bytes and, once parse_off_loop has parsed it, what the parse keeps with it (`_made`:
its text, HTML, attachments' bytes, header fields and addresses; not the parsed tree, which held up to 6 times the
raw size), estimated with sys.getsizeof (`footprint`): from about the raw size again up to 13 times it (a To of
12 000 short addresses, each a tuple of two strings; a text and an HTML body with one emoji, kept as 4-byte
characters).
Waiting costs nothing while nothing arrives: each `add` (and each `changed`) wakes the waiters once. A wait whose
criteria cannot change their verdict on a message once captured (no `match`, or one said `settled`: a search
without `is:` terms) looks only at the messages it has not looked at yet, `sliced`: each waiter looking at every
message again for each new one, 64 waits on 1000 messages of 90 KB cost 9 s of the server's loop per message
captured. Any other (`is:read`, a `match` callable, which may read `history` or the read flag) looks at every
message again each time it is woken.

Messages are parsed off the loop in the mailbox's own thread, one message at a time: in asyncio's default pool,
shared with the queue's fsyncs, DKIM signing, pickup and table loads, 8 requests for messages of thousands of parts
kept those waiting 5-11 s for a thread. (Not a workers.BoundedWorkers: its caller gives up when no call ends for
its `wait`, and one parse may rightly take longer.) The thread ends at `close` (a parse under way finishes; one
asked for later runs in asyncio's default pool), else when the mailbox is gone, or at the exit.

A wait whose criteria read the messages (`match`) has each new one parsed off the loop first
(CapturedMessage.parse_off_loop, `parsed_by`), within its timeout: when it runs out, the messages parsed by then
are judged, the others not; but a wait with timeout 0 ("is it there now?") parses every message there first.
`subject` reads the header alone (`fields`).

Failure behaviour: `wait` raises WaitTimeout after `timeout` seconds (loop time, not the injected clock), and
RuntimeError at once when the mailbox is closed, or closes, before enough messages match (the same report).
"""
from __future__ import annotations

import asyncio
import fnmatch
import re
import sys
from collections import OrderedDict
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import Message
from functools import cached_property
from typing import Callable, Iterable, TypeVar

from mailflow.capture import mime
from mailflow.clock import Clock
from mailflow.model import SessionTranscript

SLICE = 25  # messages searched or summarised (about 0.35 ms each when a term parses them) per turn of the loop
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


@dataclass(frozen=True)
class CapturedEnvelope:
    """See the module docstring. Per-recipient tuples are in the order of `recipients` (() when none given)."""

    sender: str
    recipients: tuple[str, ...]
    originals: tuple[str, ...] = ()
    notify: tuple[str, ...] = ()
    orcpts: tuple[str, ...] = ()
    envid: str = ""
    ret: str = ""
    smtputf8: bool = False
    body_type: str = ""


@dataclass(frozen=True)
class QueueEvent:
    """One mail-log event of a queue id (mailflow.logs.MailLog): when (the server's clock), what, its fields."""

    time: float
    event: str
    fields: dict


@dataclass(eq=False)
class CapturedMessage:
    """See the module docstring."""

    id: str
    queue_id: str
    envelope: CapturedEnvelope
    raw: bytes
    received: float
    transcript: SessionTranscript | None = None
    read: bool = False
    _history: Callable[[str], list[QueueEvent]] = field(default=lambda queue_id: [], repr=False)
    _parsing: asyncio.Future | None = field(default=None, repr=False)  # parse_off_loop's thread, while it runs
    _box: Mailbox | None = field(default=None, repr=False)  # its mailbox (whose thread parses it), if any

    @property
    def sender(self) -> str:
        return self.envelope.sender

    @property
    def recipients(self) -> tuple[str, ...]:
        return self.envelope.recipients

    @property
    def history(self) -> list[QueueEvent]:
        """The queue's events for this message's queue id, up to now (the delivery that captured it included
        once it is recorded)."""
        return self._history(self.queue_id)

    @cached_property
    def message(self):
        """The parsed message (`email.message.EmailMessage`, `email.policy.default`), parsed on the loop when first
        asked for: parse_off_loop does not keep it."""
        return mime.parse(self.raw)

    @cached_property
    def fields(self):
        """The header fields alone (mime.header_only): what `subject` and `header()` read, at a small cost
        however many MIME parts the body has."""
        return mime.header_only(self.raw)

    @cached_property
    def subject(self) -> str:
        """Decoded, its lines unfolded as Mailpit unfolds them (mime.decoded_header)."""
        return mime.decoded_header(self.fields, "Subject")

    def header(self, name: str) -> str | None:
        return mime.header(self.fields, name)

    @cached_property
    def text(self) -> str:
        return mime.text_body(self.message)

    @cached_property
    def html(self) -> str:
        return mime.html_body(self.message)

    @cached_property
    def _parts(self) -> tuple[list[mime.Attachment], list[mime.Attachment]]:
        return mime.attachments(self.message)

    @property
    def attachments(self) -> list[mime.Attachment]:
        return self._parts[0]

    @property
    def inline(self) -> list[mime.Attachment]:
        return self._parts[1]

    @cached_property
    def snippet(self) -> str:
        return mime.snippet(self.text, self.html)

    @cached_property
    def contacts(self) -> dict[str, list[tuple[str, str]]]:
        """The (name, address) pairs of each of CONTACT_HEADERS (mime.addresses): made once, a To of 10 000
        addresses took 0.08 s to read (2.4 s as policy.default's header objects), and every listing summarises."""
        return _contacts(self.fields)

    @cached_property
    def links(self) -> list[str]:
        return mime.links(self.text, self.html)

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def parsed(self) -> bool:
        """Has parse_off_loop made what it makes (what a search or a summary reads costs no parse now)?"""
        return _MADE.issubset(self.__dict__)

    async def parse_off_loop(self) -> None:
        """Makes the properties `_made` makes in the mailbox's thread, unless they are all made already; once, however
        many requests and waits ask at the same time. Never raises but for what the thread itself may (a
        MemoryError): that ask fails, and the next one parses again."""
        if self.parsed:
            return
        if self._parsing is None:
            thread = self._box.parse_thread if self._box is not None else None
            self._parsing = asyncio.get_running_loop().run_in_executor(thread, _made, self.raw)
            self._parsing.add_done_callback(self._parsed)
        await asyncio.shield(self._parsing)  # (an asker cancelled leaves it to the others)

    def _parsed(self, parsing: asyncio.Future) -> None:
        """The parse ended (done callback, before any asker resumes): what it made is kept, and counted by its
        mailbox, even when every asker was cancelled meanwhile; if it failed, the next ask parses again."""
        self._parsing = None
        if not parsing.cancelled() and parsing.exception() is None:
            made, size = parsing.result()
            for name, value in made.items():
                self.__dict__.setdefault(name, value)  # (one made on the loop meanwhile stays: it is the same)
            if self._box is not None:
                self._box.kept(self, size)

    def describe(self) -> str:
        """One line: `<sender> -> <rcpt>, <rcpt>: 'Subject' (queue id ID)`."""
        to = ", ".join(f"<{r}>" for r in self.recipients)
        return f"<{self.sender}> -> {to}: {self.subject!r} (queue id {self.queue_id})"


_MADE = frozenset({"fields", "subject", "text", "html", "snippet", "_parts", "contacts"})
CONTACT_HEADERS = ("From", "To", "Cc", "Reply-To")


def _made(raw: bytes) -> tuple[dict, int]:
    """CapturedMessage's properties named in _MADE, made from `raw` off the loop (by CapturedMessage's own
    definitions, on a message of its own): the email package takes about 2 ms a MIME part (policy.default's header
    objects), and the first summary of a 1 MB message of 3000 parts held the server's loop 6 s. The worker thread
    hands the GIL to the loop every switch interval (5 ms). Never raises for a malformed message: mime's helpers
    do not. With it, its `footprint`."""
    message = CapturedMessage("", "", CapturedEnvelope("", ()), raw, 0.0)
    made = {name: getattr(message, name) for name in _MADE}
    return made, footprint(made)


def footprint(value) -> int:
    """The bytes `value` holds, estimated by sys.getsizeof: of itself and of what it holds (lists, tuples, dicts,
    Attachments, a header's fields as their (name, value) items); a string or bytes counts once per place."""
    if isinstance(value, (list, tuple)):
        return sys.getsizeof(value) + sum(map(footprint, value))
    if isinstance(value, dict):
        return sys.getsizeof(value) + sum(footprint(key) + footprint(item) for key, item in value.items())
    if isinstance(value, mime.Attachment):
        return sys.getsizeof(value) + footprint(vars(value))
    if isinstance(value, Message):
        return sys.getsizeof(value) + footprint(list(value.raw_items()))
    return sys.getsizeof(value)


def _contacts(message) -> dict[str, list[tuple[str, str]]]:
    return {name: mime.addresses(message, name) for name in CONTACT_HEADERS}


def address_matches(pattern: str, address: str) -> bool:
    """The address itself, or a glob of `*` and `?`; a `[` is itself (an address literal, `a@[192.0.2.1]`), not
    a character class."""
    pattern, address = pattern.lower(), address.lower()
    if "*" in pattern or "?" in pattern:
        return fnmatch.fnmatchcase(address, pattern.replace("[", "[[]"))
    return pattern == address


def written_address(value: str) -> str | None:
    """The envelope address in `value` when `value` writes it as a report or a header does (`<bob@example.com>`,
    `Bob <bob@example.com>`, `Bob<bob@example.com>`, `bob@example.com (Bob)`, spaces around it or inside the
    brackets), else None: `value` is an address (or a glob) alone. An address itself never ends with `>` or `)`
    (a quoted local part ends with its `"`, or comes before an `@`). Linear in the length of `value`."""
    text = value.strip()
    if text.endswith(">") and "<" in text:
        return text[text.rindex("<") + 1:-1].strip()
    comment = _trailing_comment(text)
    if comment > 0 and text[:comment].strip():
        return text[:comment].strip()
    return text if text != value else None


def _trailing_comment(text: str) -> int:
    """Where the parenthesised comment that ends `text` starts (nested ones counted), else -1."""
    depth = 0
    for at in range(len(text) - 1, -1, -1):
        if text[at] == ")":
            depth += 1
        elif text[at] == "(" and depth:
            depth -= 1
            if depth == 0:
                return at
        elif depth == 0:
            return -1
    return -1


def refuse_written_address(name: str, value: str | None) -> None:
    """ValueError naming the address to write when `value` (the `name=` of a wait or an inbound fault) is one
    written as a report or a header writes it: it would match no envelope address (a wait would time out listing
    the very message, a fault refuse nothing)."""
    bare = None if value is None else written_address(value)
    if bare is not None:
        raise ValueError(f"{name}= takes the envelope address alone, as between the < > of MAIL FROM, RCPT TO or "
                         f"a report: {name}={bare!r}, not {value!r}")


@dataclass(frozen=True)
class Criteria:
    """`to`: an envelope recipient equals it (case-insensitive) or matches it as a glob (`*@example.com`; `*` and
    `?` only, so that `*@[192.0.2.1]` is an address literal);
    `sender`: the envelope sender, alike; `subject`: a string the Subject contains, or a compiled regex it
    matches; `match`: any callable on a CapturedMessage. Unset criteria match everything. An address written
    as a report or a header writes it (`<bob@example.com>`, `Bob <bob@example.com>`, `bob@example.com (Bob)`),
    which matches no envelope address, is a ValueError naming the address to write (refuse_written_address).
    `settled`: `match`'s verdict on a message does not change once it is captured, so a wait asks it once per
    message."""

    to: str | None = None
    sender: str | None = None
    subject: str | re.Pattern | None = None
    match: Callable[[CapturedMessage], bool] | None = None
    settled: bool = False

    @property
    def reads_content(self) -> bool:
        """Does a verdict parse the message? (to and sender are the envelope's; subject its header's alone.)"""
        return self.match is not None

    @property
    def judged_once(self) -> bool:
        """May a wait keep its verdict on a message? (to, sender and subject never change.)"""
        return self.match is None or self.settled

    def __post_init__(self) -> None:
        """A criterion of the wrong type is a TypeError here, not an AttributeError at the first message (or a
        wait that times out when none comes)."""
        for name in ("to", "sender"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name}= takes one address or glob (a str), not {type(value).__name__}")
            refuse_written_address(name, value)
        if self.subject is not None and not isinstance(self.subject, (str, re.Pattern)):
            raise TypeError(f"subject= takes a str or a compiled regex, not {type(self.subject).__name__}")
        if self.match is not None and not callable(self.match):
            raise TypeError(f"match= takes a callable, not {type(self.match).__name__}")

    def matches(self, message: CapturedMessage) -> bool:
        if self.to is not None and not any(address_matches(self.to, r) for r in message.recipients):
            return False
        if self.sender is not None and not address_matches(self.sender, message.sender):
            return False
        if isinstance(self.subject, re.Pattern):
            if not self.subject.search(message.subject):
                return False
        elif self.subject is not None and self.subject not in message.subject:
            return False
        return self.match is None or bool(self.match(message))

    def describe(self) -> str:
        said = [f"to={self.to!r}" if self.to is not None else "",
                f"sender={self.sender!r}" if self.sender is not None else "",
                f"subject={getattr(self.subject, 'pattern', self.subject)!r}" if self.subject is not None else "",
                f"match={getattr(self.match, '__name__', 'callable')}" if self.match is not None else ""]
        return " ".join(s for s in said if s) or "any message"


async def parsed_off_loop(messages: Iterable[CapturedMessage]) -> None:
    """Each message parsed off the loop (CapturedMessage.parse_off_loop), one after the other."""
    for message in messages:
        await message.parse_off_loop()


async def parsed_by(messages: list[CapturedMessage], deadline: float | None) -> list[CapturedMessage]:
    """Those of `messages` parsed off the loop by `deadline` (loop time; None: all of them), in order: a parse
    of thousands of parts takes seconds, and a wait keeps its timeout."""
    try:
        async with asyncio.timeout_at(deadline):
            await parsed_off_loop(messages)
    except TimeoutError:
        pass
    return [m for m in messages if m.parsed]


async def sliced(items: list[_Item], fn: Callable[[_Item], _Result]) -> list[_Result]:
    """`fn` of each item, in order, SLICE at a time with the loop handed back before each slice (so that two
    calls in a row do not make two slices in one turn)."""
    results: list[_Result] = []
    for at in range(0, len(items), SLICE):
        await asyncio.sleep(0)
        results.extend(fn(item) for item in items[at:at + SLICE])
    return results


REPORT_LIMIT = 50  # messages a failed wait lists (the newest): a test's failure stays readable


class WaitTimeout(AssertionError):
    """The messages waited for did not arrive in time; the text lists those that did."""


def timeout_report(criteria: Criteria, count: int, timeout: float, found: list[CapturedMessage],
                   arrived: list[CapturedMessage], *, waited: str = "", limit: int | None = None,
                   dropped: str = "") -> str:
    """What a wait that failed saw: the counts, and each message that arrived (the newest `limit` of them); then
    `dropped`, the mailbox's `dropped_note()`: every message its bounds dropped since the last clear, whether this
    wait judged it before it went or not."""
    waited = waited or f"waited {timeout:g}s"
    lines = [f"{waited} for {count} message{'s' if count != 1 else ''} ({criteria.describe()}): "
             f"{len(found)} matched; {len(arrived)} arrived:"]
    if dropped:
        lines.append(f"  ({dropped})")
    skipped = max(0, len(arrived) - limit) if limit is not None else 0
    if skipped:
        lines.append(f"  ({skipped} older not listed)")
    lines += [f"  {i}. {m.describe()}" for i, m in enumerate(arrived[skipped:], skipped + 1)] or ["  (none)"]
    return "\n".join(lines)


class Mailbox:
    """See the module docstring."""

    def __init__(self, *, max_messages: int, max_bytes: int, clock: Clock, transcripts=None, history=None):
        """`transcripts.get(queue_id)` -> SessionTranscript | None; `history.events(queue_id)` -> [QueueEvent]."""
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._clock = clock
        self._transcripts = transcripts
        self._history = history
        self._messages: OrderedDict[str, CapturedMessage] = OrderedDict()
        self._bytes = 0  # the raw bytes of the messages kept, and what their parses keep (_parsed_bytes)
        self._parsed_bytes: dict[str, int] = {}
        self._sequence = 0
        self._arrived = asyncio.Event()
        self._closed = False
        self._parser = ThreadPoolExecutor(1, thread_name_prefix="capture-parse")  # (see the module docstring)
        self.accepted = 0
        self.accepted_bytes = 0
        self.deleted = 0
        self.dropped = 0  # of those deleted, by the bounds, since the mailbox was last emptied

    def add(self, envelope: CapturedEnvelope, raw: bytes, queue_id: str) -> CapturedMessage:
        self._sequence += 1
        ident = queue_id if queue_id not in self._messages else f"{queue_id}.{self._sequence}"
        transcript = self._transcripts.get(queue_id) if self._transcripts is not None else None
        history = self._history.events if self._history is not None else (lambda queue_id: [])
        message = CapturedMessage(ident, queue_id, envelope, raw, self._clock.time(), transcript, _history=history,
                                  _box=self)
        self._messages[ident] = message
        self._bytes += len(raw)
        self.accepted += 1
        self.accepted_bytes += len(raw)
        self._make_room()
        self._arrived.set()
        self._arrived = asyncio.Event()
        return message

    @property
    def messages(self) -> list[CapturedMessage]:
        return list(self._messages.values())

    def get(self, ident: str) -> CapturedMessage | None:
        return self._messages.get(ident)

    def latest(self) -> CapturedMessage | None:
        return next(reversed(self._messages.values()), None)

    def delete(self, ids: Iterable[str]) -> int:
        removed = 0
        for ident in ids:
            if ident in self._messages:
                self._remove(ident)
                removed += 1
        return removed

    def clear(self) -> None:
        self.delete(list(self._messages))
        self.dropped = 0

    def dropped_note(self) -> str:
        """What a failed wait's report says of the messages the bounds dropped since the last clear ("" for none):
        how many, and the settings that keep more, as a configuration file and as an embedded Sink write them."""
        if not self.dropped:
            return ""
        return (f"and {self.dropped} older dropped: the capture keeps [sink] max_messages = {self._max_messages} and "
                f"max_bytes = {self._max_bytes} (a Sink's sink={{\"max_messages\": …, \"max_bytes\": …}}); raise them "
                "to keep more")

    def changed(self) -> None:
        """A message's read flag changed: each wait looks again (one for `is:read` may now be answered)."""
        self._arrived.set()
        self._arrived = asyncio.Event()

    def close(self) -> None:
        self._closed = True
        self._arrived.set()
        self._parser.shutdown(wait=False)  # (a parse under way finishes)

    @property
    def parse_thread(self) -> Executor | None:
        """Where its messages are parsed: its own thread; asyncio's default pool (None) once it is closed."""
        return None if self._closed else self._parser

    def kept(self, message: CapturedMessage, size: int) -> None:
        """A parse of `message` keeps `size` bytes more with it: counted toward max_bytes, the oldest dropped."""
        if self._messages.get(message.id) is message and message.id not in self._parsed_bytes:
            self._parsed_bytes[message.id] = size
            self._bytes += size
            self._make_room()

    def _make_room(self) -> None:
        while len(self._messages) > 1 and (len(self._messages) > self._max_messages or self._bytes > self._max_bytes):
            self._remove(next(iter(self._messages)))
            self.dropped += 1

    def _remove(self, ident: str) -> None:
        message = self._messages.pop(ident)
        self._bytes -= len(message.raw) + self._parsed_bytes.pop(ident, 0)
        self.deleted += 1

    async def wait(self, criteria: Criteria, count: int = 1, timeout: float = 5.0) -> list[CapturedMessage]:
        """At least `count` messages matching `criteria` (all those that match, oldest first), once they are here;
        WaitTimeout after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        verdicts: dict[CapturedMessage, bool] = {}  # kept when criteria.judged_once (see the module docstring)
        while True:
            arrived = self._arrived  # (before the search hands the loop back: a message added meanwhile wakes it)
            if not criteria.judged_once:
                verdicts = {}
            new = [m for m in self.messages if m not in verdicts]
            if criteria.reads_content:  # (timeout=0 asks "is it there now?": the messages here are all parsed)
                new = await parsed_by(new, deadline if timeout > 0 else None)
            verdicts.update(zip(new, await sliced(new, criteria.matches)))
            verdicts = {m: verdicts[m] for m in self.messages if m in verdicts}  # (none deleted kept alive)
            found = [m for m, hit in verdicts.items() if hit]
            if len(found) >= count:
                return found
            if self._closed:
                raise RuntimeError(timeout_report(criteria, count, timeout, found, self.messages, limit=REPORT_LIMIT,
                                                  waited="the server stopped: no more messages will come; waited",
                                                  dropped=self.dropped_note()))
            left = deadline - loop.time()
            if left <= 0:
                raise WaitTimeout(timeout_report(criteria, count, timeout, found, self.messages, limit=REPORT_LIMIT,
                                                 dropped=self.dropped_note()))
            try:  # (not wait_for: in 3.11 it swallows a cancellation that comes as a message arrives)
                async with asyncio.timeout(left):
                    await arrived.wait()
            except TimeoutError:
                pass

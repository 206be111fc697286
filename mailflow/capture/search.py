"""Mailpit's search syntax (its docs, "Search filters"), the part a test needs, over captured messages.

    parse(query) -> [Term]          words separated by spaces; "double quotes" keep spaces in one word; a
                                    leading `-` or `!` negates a word; `name:value` looks in one place; a term
                                    given twice counts once
    matches(terms, message) -> bool every term holds (case-insensitive substring matches)
    settled(terms) -> bool          the verdict on a message cannot change once it is captured (no `is:` term)
    MAX_TERMS                       the most terms the capture API searches with (mailpit.py refuses more: each
                                    is a scan of every message's text)

Cost: a message's text for a place (its whole body for a plain word) is made once per `matches`, whatever the
number of terms that look there (made per term, 4000 words "e" in a URL held the loop a second per message of
300 KB).

Places: `from:` (the From header and the envelope sender), `to:` (To and the envelope recipients), `cc:`,
`bcc:` (recipients named in neither To nor Cc), `reply-to:`, `subject:`, `message-id:`, `addressed:` (any of
from, to, cc, bcc, reply-to), `is:read` / `is:unread`, `has:attachment`; a plain word (or an unknown
`name:`) looks in the subject, the addresses, and the text and HTML bodies.

Failure behaviour: never raises; an empty query matches every message.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mailflow.capture.mailbox import CapturedMessage

_WORD = re.compile(r'([-!]?)(?:([A-Za-z][A-Za-z-]*):)?("([^"]*)"?|\S+)')
MAX_TERMS = 64
PLACES = ("from", "to", "cc", "bcc", "reply-to", "subject", "message-id", "addressed", "is", "has")


@dataclass(frozen=True)
class Term:
    negated: bool
    place: str  # one of PLACES, or "" for anywhere
    value: str


def parse(query: str) -> list[Term]:
    terms = []
    for negation, place, word, quoted in _WORD.findall(query or ""):
        value = quoted if word.startswith('"') else word
        place = place.lower()
        if place and place not in PLACES:  # not a place Mailpit knows: the whole word is searched for
            value, place = f"{place}:{value}", ""
        if value:
            terms.append(Term(bool(negation), place, value.lower()))
    return list(dict.fromkeys(terms))


def _joined(pairs: list[tuple[str, str]]) -> str:
    return " ".join(f"{name} <{addr}>" for name, addr in pairs).lower()


def bcc(message: CapturedMessage) -> list[str]:
    """Envelope recipients the To and Cc headers do not name (Mailpit's Bcc)."""
    named = {addr.lower() for _, addr in message.contacts["To"] + message.contacts["Cc"]}
    return [r for r in message.recipients if r.lower() not in named]


def _place_text(place: str, message: CapturedMessage) -> str:
    contacts = message.contacts
    if place == "from":
        return _joined(contacts["From"]) + f" <{message.sender}>".lower()
    if place == "to":
        return _joined(contacts["To"]) + " " + " ".join(f"<{r}>" for r in message.recipients).lower()
    if place == "cc":
        return _joined(contacts["Cc"])
    if place == "bcc":
        return " ".join(f"<{r}>" for r in bcc(message)).lower()
    if place == "reply-to":
        return _joined(contacts["Reply-To"])
    if place == "subject":
        return message.subject.lower()
    if place == "message-id":
        return (message.header("Message-ID") or "").lower()
    if place == "addressed":
        return " ".join(_place_text(p, message) for p in ("from", "to", "cc", "bcc", "reply-to"))
    return " ".join((message.subject, _place_text("addressed", message), message.text, message.html)).lower()


def _holds(term: Term, message: CapturedMessage, texts: dict[str, str]) -> bool:
    """Does `term` hold for `message`? `texts`: the places' texts made so far for this message, added to."""
    if term.place == "is":
        return {"read": message.read, "unread": not message.read}.get(term.value, False)
    if term.place == "has":
        return term.value in ("attachment", "attachments") and bool(message.attachments)
    text = texts.get(term.place)
    if text is None:
        text = texts[term.place] = _place_text(term.place, message)
    return term.value in text


def settled(terms: list[Term]) -> bool:
    """Is the verdict of `terms` on a message fixed once it is captured? Not with an `is:` term (the read flag)."""
    return not any(term.place == "is" for term in terms)


def matches(terms: list[Term], message: CapturedMessage) -> bool:
    texts: dict[str, str] = {}
    return all(_holds(term, message, texts) != term.negated for term in terms)

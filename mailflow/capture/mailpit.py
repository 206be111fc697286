"""The capture API over HTTP: a documented subset of Mailpit's API v1, so that Mailpit's client libraries work
against a capture server unchanged, plus what Mailpit lacks (a long-poll wait, each message's envelope, SMTP
session and queue history). docs/testing.md lists every endpoint.

    routes(capture, waiters_limit, wait_time_limit) -> web.RouteTableDef      (registered on mailflow.http)

Mailpit's endpoints (its JSON field names and shapes; IDs are mailflow's queue ids):
    GET    /api/v1/info                       version, message counts, runtime statistics
    GET    /livez, /readyz                    200, empty (the probes of Mailpit's container)
    GET    /api/v1/messages?start=&limit=     summaries, newest first (limit 50 by default, 0 for all)
    PUT    /api/v1/messages                   mark read or unread: {"IDs": [...], "Read": true}, or {"Search":
                                              query, "Read": true}; all without either
    DELETE /api/v1/messages                   {"IDs": [...]}; without IDs every message
    GET    /api/v1/message/{ID}               the message ("latest": the newest, `?query=` the newest that a search
                                              finds, for every /message/latest/... endpoint); marks it read
    GET    /api/v1/message/{ID}/raw           its bytes as queued (`?dl=1`: as the attachment `{ID}.eml`)
    GET    /api/v1/message/{ID}/headers       {"Name": ["value", ...]}: each value as sent (encoded words kept),
                                              unfolded, as Go's net/textproto gives Mailpit
    GET    /api/v1/message/{ID}/part/{PartID} an attachment or inline part, decoded: an image (not SVG), PDF or
                                              plain text inline (its file name percent-encoded), any other as an
                                              application/octet-stream attachment; nosniff, sandboxed
    GET    /api/v1/search?query=&start=&limit=   summaries of the messages matching (capture.search)
    DELETE /api/v1/search?query=              deletes them
mailflow's:
    GET    /api/v1/wait?query=&count=1&timeout=5   long poll: the summaries once `count` messages match; 408
                                              after `timeout` seconds (`0.5` too) with the summaries of what did
                                              arrive
    GET    /api/v1/message/{ID}/history       the envelope (DSN parameters included), the SMTP session that
                                              submitted it (client, HELO, TLS, login, every command and reply)
                                              and its queue history (each attempt and result)

Request bodies are JSON (Mailpit's: read as JSON whatever the Content-Type, field names in any case, as Go's
decoder matches them) or urlencoded form fields (`ids`, as some clients send them). Unlike Mailpit, a DELETE
whose body is not a JSON object (or whose IDs are not a list of strings) is 400, not "delete everything".

A listing (messages, search, wait) makes its summaries, and a search (search, delete by search, mark by search,
latest?query=, wait) looks at the messages, mailbox.SLICE at a time (`mailbox.sliced`), handing the server's loop
back in between: a summary or a text term parses its message, and a whole mailbox of them would hold every
session and delivery. Each message a request reads the body of is parsed first in the mailbox's thread
(CapturedMessage.parse_off_loop), one at a time: one message of thousands of MIME parts takes seconds to parse;
/raw, /headers and /history read its bytes, its header or its envelope and wait for no parse.

Failure behaviour: an unknown ID is 404 ("Message not found"); a bad parameter or body is 400 with the reason
(text/plain, as Mailpit's), and so is a search of more than search.MAX_TERMS terms (Mailpit takes any number);
a multipart body 415; a wait
beyond `waiters_limit` concurrent ones is 503; `timeout` is capped at `wait_time_limit`.
"""
from __future__ import annotations

import email.utils
import json
import os
import time
from datetime import datetime, timezone
from urllib.parse import parse_qsl, quote

from aiohttp import web

from mailflow import __version__
from mailflow.capture import mime, search
from mailflow.capture.mailbox import (REPORT_LIMIT, CapturedMessage, Criteria, WaitTimeout, parsed_off_loop, sliced,
                                      timeout_report)
from mailflow.capture.recorders import Capture
from mailflow.syntax import query_integer, query_seconds

DEFAULT_LIMIT = 50


def iso(timestamp: float) -> str:
    """1970-01-01T00:00:00.000Z, as Mailpit's clients read it."""
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _contact(pair: tuple[str, str]) -> dict:
    return {"Name": pair[0], "Address": pair[1]}


def _contacts(message: CapturedMessage, header: str) -> list[dict]:
    return [_contact(p) for p in message.contacts[header]]


def _sender(message: CapturedMessage) -> dict | None:
    found = message.contacts["From"]
    return _contact(found[0]) if found else None


def _message_id(message: CapturedMessage) -> str:
    return (message.header("Message-ID") or "").strip().strip("<>")


def _login(message: CapturedMessage) -> str:
    return message.transcript.login if message.transcript is not None else ""


def _date(message: CapturedMessage) -> str:
    value = message.header("Date")
    if value:
        try:
            return iso(email.utils.parsedate_to_datetime(value).timestamp())
        except (TypeError, ValueError, IndexError):
            pass
    return iso(message.received)


def summary(message: CapturedMessage) -> dict:
    return {
        "ID": message.id, "MessageID": _message_id(message), "Read": message.read, "From": _sender(message),
        "To": _contacts(message, "To"), "Cc": _contacts(message, "Cc"),
        "Bcc": [_contact(("", r)) for r in search.bcc(message)], "ReplyTo": _contacts(message, "Reply-To"),
        "Subject": message.subject, "Created": iso(message.received), "Username": _login(message), "Tags": [],
        "Size": message.size, "Attachments": len(message.attachments), "Snippet": message.snippet,
    }


def _attachment(item: mime.Attachment) -> dict:
    return {"PartID": item.part_id, "FileName": item.filename, "ContentType": item.content_type,
            "ContentID": item.content_id, "Size": item.size, "Checksums": item.checksums()}


def detail(message: CapturedMessage) -> dict:
    unsubscribe = message.header("List-Unsubscribe") or ""
    return {
        "ID": message.id, "MessageID": _message_id(message), "Read": message.read, "From": _sender(message),
        "To": _contacts(message, "To"), "Cc": _contacts(message, "Cc"),
        "Bcc": [_contact(("", r)) for r in search.bcc(message)], "ReplyTo": _contacts(message, "Reply-To"),
        "ReturnPath": message.sender, "Subject": message.subject,
        "ListUnsubscribe": {"Header": unsubscribe, "Links": mime.URL.findall(unsubscribe), "Errors": "",
                            "HeaderPost": message.header("List-Unsubscribe-Post") or ""},
        "Date": _date(message), "Tags": [], "Username": _login(message), "Text": message.text, "HTML": message.html,
        "Size": message.size, "Inline": [_attachment(a) for a in message.inline],
        "Attachments": [_attachment(a) for a in message.attachments],
    }


def history(message: CapturedMessage) -> dict:
    env, session = message.envelope, message.transcript
    return {
        "ID": message.id, "QueueID": message.queue_id,
        "Envelope": {"From": env.sender, "To": list(env.recipients), "OriginalTo": list(env.originals),
                     "Notify": list(env.notify), "ORCPT": list(env.orcpts), "EnvID": env.envid, "Ret": env.ret,
                     "SMTPUTF8": env.smtputf8, "Body": env.body_type},
        "Session": None if session is None else {
            "Client": session.client, "Helo": session.helo, "TLS": session.tls, "Login": session.login,
            "Lines": [{"From": "client" if who == "C" else "server", "Text": text} for who, text in session.lines],
            "Omitted": session.omitted},
        "Events": [{"Time": iso(e.time), "Event": e.event, "Fields": e.fields} for e in message.history],
    }


def _canonical(name: str) -> str:
    """Go's canonical header key, as Mailpit returns them: `message-id` -> `Message-Id`."""
    return "-".join(word[:1].upper() + word[1:].lower() for word in name.split("-"))


SHOWN_INLINE = ("application/pdf", "text/plain")  # and images but SVG: the parts a browser shows running no script
PART_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}


def _served_as(item: mime.Attachment) -> tuple[str, dict[str, str]]:
    """The part's Content-Type and headers: an image (not SVG), a PDF or plain text as Mailpit's
    DownloadAttachment gives it (its own type, inline, the file name, else the Content-ID, percent-encoded as Go's
    url.PathEscape does: a name with quotes, line breaks or non-ASCII letters stays one well-formed ASCII header);
    any other an application/octet-stream attachment, as Mailpit serves HTML: shown, a mailed script (HTML, SVG,
    XML, and whatever else a browser may run) would run on the API's origin, free to mark and delete every
    message. Never sniffed, and sandboxed."""
    name = quote(item.filename or item.content_id, safe="$&+:=@")
    kind = item.content_type
    if kind in SHOWN_INLINE or (kind.startswith("image/") and "svg" not in kind):
        return kind, {"Content-Disposition": f'inline; filename="{name}"', **PART_HEADERS}
    return "application/octet-stream", {"Content-Disposition": f'attachment; filename="{name}"', **PART_HEADERS}


async def listing(messages: list[CapturedMessage], everything: list[CapturedMessage], start: int, limit: int) -> dict:
    """A page of summaries, made `sliced`: each parses its message, and all 10 000 of a full mailbox (`limit=0`)
    held the server's loop 3.7 s."""
    newest_first = list(reversed(messages))
    page = newest_first[start:start + limit] if limit else newest_first[start:]  # 0: all (Mailpit's)
    await parsed_off_loop(page)
    total, unread, unread_here = len(everything), sum(not m.read for m in everything), sum(not m.read for m in messages)
    summaries = await sliced(page, summary)
    return {"total": total, "unread": unread, "count": len(page), "messages_count": len(messages),
            "messages_unread": unread_here, "start": start, "tags": [], "messages": summaries}


def _int(request: web.Request, name: str, default: int, low: int = 0) -> int:
    value = request.query.get(name, "")
    if not value:
        return default
    number = query_integer(value)  # as Go's strconv.Atoi reads a number (Mailpit's)
    if number is None:
        raise web.HTTPBadRequest(text=f"{name}: not a number: {value[:40]!r}")
    if number < low:
        raise web.HTTPBadRequest(text=f"{name}: must be at least {low}")
    return number


def _seconds(request: web.Request, name: str, default: float) -> float:
    """A span in seconds (`syntax.query_seconds`: `0.5` as `Sink.wait_for(timeout=0.5)` takes it); 400 for
    anything else."""
    value = request.query.get(name, "")
    if not value:
        return default
    seconds = query_seconds(value)
    if seconds is None:
        raise web.HTTPBadRequest(text=f"{name}: not a number of seconds: {value[:40]!r}")
    return seconds


async def _body(request: web.Request) -> dict:
    """The request's fields by lower-case name (Go's JSON decoder matches Mailpit's field names ignoring case):
    a JSON object whatever the Content-Type says (as Mailpit reads it), or urlencoded form fields (`ids`
    repeated, as some clients send them); {} for an empty body. 400 for anything else."""
    body = await request.read()
    if not body.strip():
        return {}
    if request.content_type == "application/x-www-form-urlencoded":
        fields: dict = {}
        for key, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
            fields.setdefault(key.lower(), []).append(value)
        if "read" in fields:
            fields["read"] = [fields["read"][-1].strip().lower() in ("1", "true", "yes", "on")]
        return {key: (value if key == "ids" else value[-1]) for key, value in fields.items()}
    if request.content_type == "multipart/form-data":
        raise web.HTTPUnsupportedMediaType(text="send JSON, or urlencoded form fields")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError; nested deeper than the parser goes
        raise web.HTTPBadRequest(text="the body is not JSON") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text='the body is a JSON object: {"IDs": [...], ...}')
    return {str(key).lower(): value for key, value in data.items()}


def _terms(query: str) -> list[search.Term]:
    """The search's terms; 400 past search.MAX_TERMS (each is a scan of every message's text)."""
    terms = search.parse(query)
    if len(terms) > search.MAX_TERMS:
        raise web.HTTPBadRequest(text=f"Error: the search has {len(terms)} terms, at most {search.MAX_TERMS}")
    return terms


def _ids(data: dict) -> list[str]:
    ids = data.get("ids")
    if ids is None:
        return []
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise web.HTTPBadRequest(text="IDs: a list of message IDs")
    return ids


def _read(data: dict) -> bool:
    value = data.get("read")
    if value is None:  # absent, or null
        return False
    if not isinstance(value, bool):
        raise web.HTTPBadRequest(text="Read: true or false")
    return value


def _search(data: dict) -> str:
    value = data.get("search")
    if value is not None and not isinstance(value, str):
        raise web.HTTPBadRequest(text="Search: a search query")
    return (value or "").strip()


def routes(capture: Capture, *, waiters_limit: int, wait_time_limit: float) -> web.RouteTableDef:
    """The handlers over `capture.mailbox` (see the module docstring)."""
    table = web.RouteTableDef()
    mailbox = capture.mailbox
    started = time.monotonic()
    waiting = {"now": 0}

    async def find(request: web.Request, *, parse: bool = True) -> CapturedMessage:
        """The message the request names, parsed off the loop first unless `parse` is False (what reads only its
        bytes, envelope or header fields has no need to wait for a parse of thousands of parts)."""
        ident, query = request.match_info["id"], request.query.get("query", "").strip()
        if ident != "latest":
            message = mailbox.get(ident)
        elif query:  # Mailpit's: the newest message the search finds
            message = next(reversed(await matching(query)), None)
        else:
            message = mailbox.latest()
        if message is None:
            raise web.HTTPNotFound(text="Message not found")
        if parse:
            await message.parse_off_loop()
        return message

    async def matching(query: str, messages: list[CapturedMessage] | None = None) -> list[CapturedMessage]:
        """The messages (the mailbox's by default) the search finds, searched `sliced`."""
        terms = _terms(query)
        messages = mailbox.messages if messages is None else messages
        await parsed_off_loop(messages)
        return [m for m, hit in zip(messages, await sliced(messages, lambda m: search.matches(terms, m))) if hit]

    @table.get("/livez")
    @table.get("/readyz")  # the listener opens once smtpd listens (Mailflow.start) and closes before it stops
    async def probe(request: web.Request) -> web.Response:
        return web.Response()

    @table.get("/api/v1/info")
    async def info(request: web.Request) -> web.Response:
        messages = mailbox.messages
        return web.json_response({
            "Version": __version__, "LatestVersion": "", "Database": "", "DatabaseSize": 0,
            "Messages": len(messages), "Unread": sum(not m.read for m in messages), "Tags": {},
            "RuntimeStats": {"Uptime": int(time.monotonic() - started), "Memory": _resident_bytes(),
                             "MessagesDeleted": mailbox.deleted, "SMTPAccepted": mailbox.accepted,
                             "SMTPAcceptedSize": mailbox.accepted_bytes, "SMTPRejected": 0, "SMTPIgnored": 0}})

    @table.get("/api/v1/messages")
    async def messages(request: web.Request) -> web.Response:
        everything = mailbox.messages
        return web.json_response(await listing(everything, everything, _int(request, "start", 0),
                                         _int(request, "limit", DEFAULT_LIMIT)))

    @table.put("/api/v1/messages")
    async def mark(request: web.Request) -> web.Response:
        if not (await request.read()).strip():  # (Mailpit's decoder: EOF; {} marks every message)
            raise web.HTTPBadRequest(text='a JSON body: {"IDs": [...], "Read": true}')
        data = await _body(request)
        ids, query, read = _ids(data), _search(data), _read(data)
        if ids and query:
            raise web.HTTPBadRequest(text="You may specify either IDs or a search query, not both")
        if query:
            targets = await matching(query)
        else:
            targets = [m for m in map(mailbox.get, ids) if m is not None] if ids else mailbox.messages
        for message in targets:
            message.read = read
        mailbox.changed()
        return web.Response(text="ok")

    @table.delete("/api/v1/messages")
    async def delete(request: web.Request) -> web.Response:
        ids = _ids(await _body(request))
        if ids:
            mailbox.delete(ids)
        else:
            mailbox.clear()
        return web.Response(text="ok")

    @table.get("/api/v1/message/{id}")
    async def message(request: web.Request) -> web.Response:
        found = await find(request)
        if not found.read:
            found.read = True
            mailbox.changed()
        return web.json_response(detail(found))

    @table.get("/api/v1/message/{id}/raw")
    async def raw(request: web.Request) -> web.Response:
        found = await find(request, parse=False)
        saved = request.query.get("dl") == "1"  # Mailpit's download link
        headers = {"Content-Disposition": f'attachment; filename="{found.id}.eml"'} if saved else None
        return web.Response(body=found.raw, content_type="text/plain", charset="utf-8", headers=headers)

    @table.get("/api/v1/message/{id}/headers")
    async def headers(request: web.Request) -> web.Response:
        out: dict[str, list[str]] = {}
        for name, value in (await find(request, parse=False)).fields.raw_items():
            out.setdefault(_canonical(name), []).append(mime.raw_value(value))  # (as sent: encoded words kept)
        return web.json_response(out)

    @table.get("/api/v1/message/{id}/part/{part}")
    async def part(request: web.Request) -> web.Response:
        found = await find(request)
        for item in found.attachments + found.inline:
            if item.part_id == request.match_info["part"]:
                content_type, headers = _served_as(item)
                return web.Response(body=item.data, content_type=content_type, headers=headers)
        raise web.HTTPNotFound(text="Attachment not found")

    @table.get("/api/v1/message/{id}/history")
    async def message_history(request: web.Request) -> web.Response:
        return web.json_response(history(await find(request, parse=False)))

    @table.get("/api/v1/search")
    async def search_messages(request: web.Request) -> web.Response:
        query = request.query.get("query", "").strip()
        if not query:
            raise web.HTTPBadRequest(text="Error: no search query")
        return web.json_response(await listing(await matching(query), mailbox.messages, _int(request, "start", 0),
                                         _int(request, "limit", DEFAULT_LIMIT)))

    @table.delete("/api/v1/search")
    async def delete_found(request: web.Request) -> web.Response:
        query = request.query.get("query", "").strip()
        if not query:
            raise web.HTTPBadRequest(text="Error: no search query")
        mailbox.delete([m.id for m in await matching(query)])
        return web.Response(text="ok")

    @table.get("/api/v1/wait")
    async def wait(request: web.Request) -> web.Response:
        query = request.query.get("query", "")
        count = _int(request, "count", 1, 1)
        timeout = min(_seconds(request, "timeout", 5.0), wait_time_limit)
        if waiting["now"] >= waiters_limit:
            raise web.HTTPServiceUnavailable(text=f"more than {waiters_limit} waits at once")
        terms = _terms(query)
        criteria = Criteria(match=lambda m: search.matches(terms, m), settled=search.settled(terms))
        waiting["now"] += 1
        try:
            found = await mailbox.wait(criteria, count, timeout)
        except WaitTimeout:  # (the report searches the messages parsed by now: it keeps the timeout too)
            everything = mailbox.messages
            found = await matching(query, [m for m in everything if m.parsed])
            if len(found) < count:
                report = timeout_report(Criteria(), count, timeout, found, everything, limit=REPORT_LIMIT,
                                        dropped=mailbox.dropped_note())
                body = {"error": f"query {query!r}: " + report, **await listing(found, everything, 0, len(found) or 1)}
                return web.json_response(body, status=408)
        finally:
            waiting["now"] -= 1
        return web.json_response(await listing(found, mailbox.messages, 0, len(found)))

    return table


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0

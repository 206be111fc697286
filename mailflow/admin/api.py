"""The admin API: JSON over HTTP on the admin listener, the same queue tools as `mailflow queue` (mailflow.queue_tools:
the selections, the actions, the layouts' JSON) on the running server's store. docs/operations.md, "Admin API".

    routes(server, metrics) -> web.RouteTableDef

    GET  /healthz                      200 "ok" while the server's loop answers (live)
    GET  /readyz                       200 "ready" once the store is open and smtpd listens; else 503 naming what
    GET  /metrics                      Prometheus text format (mailflow.metrics)
    GET  /api/summary                  version, host name, readiness, messages per queue
    GET  /api/queue                    messages (as `mailflow queue list --json`, a damaged one marked
                                       "damaged"): ?queue=incoming,deferred|all
                                       &ids=A,B&from=&to_domain=&older_than=1h&after=ID&limit=100 (at most
                                       1000); {"messages": [...], "next": ID of the last one when more may follow}
    GET  /api/queue/shape              qshape (as `mailflow queue shape --json`; by default the incoming, active
                                       and deferred queues, the backlog the queue page shows): ?queue=&top=20
    GET  /api/queue/{id}               envelope, recipients, header section and history (what this server
                                       logged of it lately); 404 when it is not queued
    GET  /api/queue/{id}/raw           the message as queued (message/rfc822, streamed; cut off if the message
                                       leaves the queue while it is sent)
    POST /api/queue/{action}           hold, release, requeue, delete, flush (postsuper/postqueue -f) with
                                       `mailflow queue ACTION`'s selection as JSON: {"ids": ["A", "B"] or
                                       ["ALL"], "from": "<>", "to_domain": "example.com", "older_than": "1h"}
                                       -> {"action", "messages", "missed": ids not in the action's queues}
    GET  /api/destinations             qmgr's last word on each destination (`mailflow queue destinations --json`)
    GET  /api/deliveries?limit=50      the latest recipient results this server logged, newest first
    GET  /api/config                   every setting (postconf's names), secrets redacted
    json_body(request)                 a request's JSON body, or 400 (accounts.py's endpoints use it too)
    (the account database's endpoints, /api/accounts…, are accounts.py's)

Every change is logged (logger mailflow.admin): who (the token's name and the peer) and what (the action, the
selection, how many messages); and, through the server's mail log (`server.mail_log`), what postsuper logs of it
(queue_tools.apply): the same lines as `mailflow queue ACTION` writes.

Failure behaviour: a bad selection, parameter or body (`json_body`) is 400 with the reason ({"error": ...}), and
so is a field or query parameter a request does not take, or one given twice; an unknown action or queue id
404; the store not open (starting, stopping) 503; aiohttp's own refusals (unknown path, method not allowed, body
too large or too slow) in the same JSON shape (`json_errors`, the listener's outer middleware).
"""
from __future__ import annotations

import functools
import io
import json
import logging
import re
from typing import Iterable, Sequence

from aiohttp import web

from mailflow import __version__
from mailflow import queue_tools as qt
from mailflow.admin.access import who
from mailflow.config import flat_settings
from mailflow.errors import detached
from mailflow.logs import MailLog
from mailflow.metrics import Metrics
from mailflow.syntax import FILE_TABLE_TYPES, echoed, is_utf8_text, query_integer, table_type

log = logging.getLogger("mailflow.admin")

PAGE_LIMIT = 1000  # messages per /api/queue page at most
DEFAULT_PAGE = 100
SELECTORS = ("ids", "from", "to_domain", "older_than")  # an action's fields, and /api/queue's filters
REQUIRES_SELECTION = {"hold", "release", "requeue", "delete"}  # flush alone means every deferred message
# password and SASL user tables, and any setting named for a password or secret (not a `*_file`: a path)
_SECRET = re.compile(r"(password|sasl_user)_maps$|(password|secret)$")
REDACTED = "<redacted>"
_dumps = functools.partial(json.dumps, default=str)  # settings hold paths and the like


def redacted(key: str, value: object) -> object:
    """A setting as `/api/config` shows it: the values of secret settings (password and SASL user tables,
    `*password`, `*secret`) hidden, except file-backed table specs, which only name a file."""
    if not _SECRET.search(key):
        return value
    if isinstance(value, (list, tuple)):
        return [_redacted_item(v) for v in value]
    return _redacted_item(value) if value else value


def _redacted_item(value: object) -> object:
    if isinstance(value, str) and table_type(value) in FILE_TABLE_TYPES:
        return value
    if isinstance(value, str) and table_type(value):
        return f"{table_type(value)}:{REDACTED}"
    return REDACTED


def _error(status: type[web.HTTPException], text: str) -> web.HTTPException:
    return status(text=json.dumps({"error": text}), content_type="application/json")


@web.middleware
async def json_errors(request: web.Request, handler):
    """aiohttp's own refusals (no such path 404, method 405 with its Allow, body 413 or 408) in the API's shape,
    {"error": ...}, as the handlers' own; their headers (Allow, Connection) kept."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400 or e.content_type == "application/json":
            raise
        detached(e)  # (the router's 404 keeps it: with its traceback, in a cycle with the router's frame)
        headers = {k: v for k, v in e.headers.items() if k.lower() not in ("content-type", "content-length")}
        response = web.json_response({"error": e.text or e.reason}, status=e.status, reason=e.reason,
                                     headers=headers)
        if e.keep_alive is False:
            response.force_close()
        return response


async def json_body(request: web.Request) -> object:
    """The request's body as JSON; 400 for a body Python's parser cannot take (not JSON, not in the charset its
    Content-Type names or an unknown one, nested deeper than the parser's recursion limit) and for a lone
    surrogate ("\\ud800"), which is no character: the store, a log line or a hash could not encode it."""
    try:
        body = await request.json()
    except (ValueError, LookupError, RecursionError):
        raise _error(web.HTTPBadRequest, "the body is not JSON") from None
    if not is_utf8_text(json.dumps(body, ensure_ascii=False)):
        raise _error(web.HTTPBadRequest, "the body holds a lone surrogate (\\ud800-\\udfff): not text")
    return body


def refuse_unknown(names: Iterable[str], allowed: Sequence[str]) -> None:
    """400 for a field a request does not take: a misspelt selector ("form", "to_domian") must not be dropped,
    which would widen the selection (`{"ids": ["ALL"], "form": "x@y"}` deleting everything), as `mailflow queue`
    refuses an unknown option."""
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise _error(web.HTTPBadRequest, f"unknown field {echoed(unknown[0])} (use {', '.join(allowed)})")


def _query(request: web.Request, *allowed: str) -> dict[str, str]:
    """The query's parameters: 400 for an unknown one, or one given twice (which of them would count?)."""
    refuse_unknown(request.query.keys(), allowed)
    for name in allowed:
        if len(request.query.getall(name, ())) > 1:
            raise _error(web.HTTPBadRequest, f"{name}: given more than once")
    return dict(request.query)


def _selection(request_args: dict, *, required: bool) -> qt.Selection:
    """`mailflow queue`'s selection from the API's fields (`ids` a list, or a comma/space separated string)."""
    ids = request_args.get("ids") or []
    if isinstance(ids, str):
        ids = ids.replace(",", " ").split()
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise _error(web.HTTPBadRequest, "ids: a list of queue ids (or [\"ALL\"])")
    fields = {}
    for name in ("from", "to_domain", "older_than"):
        value = request_args.get(name)
        if value is not None and not isinstance(value, str):
            raise _error(web.HTTPBadRequest, f"{name}: a string")
        fields[name] = value
    try:
        return qt.parse_selection(ids, sender=fields["from"], to_domain=fields["to_domain"],
                                  older_than=fields["older_than"], required=required)
    except qt.SelectionError as e:
        raise _error(web.HTTPBadRequest, str(e)) from None


def _queues(value: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        return default
    try:
        return qt.parse_queues(value)
    except qt.SelectionError as e:
        raise _error(web.HTTPBadRequest, str(e)) from None


def _int(args: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    value = args.get(name)
    if value is None:
        return default
    number = query_integer(value)  # (as the capture API reads its numbers)
    if number is None:
        raise _error(web.HTTPBadRequest, f"{name}: not a number")
    if not low <= number <= high:
        raise _error(web.HTTPBadRequest, f"{name}: from {low} to {high}")
    return number


def _gone(qid: str) -> web.HTTPException:
    return _error(web.HTTPNotFound, f"{qid}: no longer queued (it left the queue while it was read)")


async def _send_content(request: web.Request, qid: str, content) -> web.StreamResponse:
    """A queued message as the answer (message/rfc822), streamed. Its file may go while it is read (the message
    delivered or deleted meanwhile): before the first byte that is a 404; after, the connection is cut, since an
    answer that ends normally would pass a truncated message for the whole one (one line in the log, not a
    traceback: a ConnectionError is what mailflow.http logs at debug)."""
    response = web.StreamResponse(headers={"Content-Type": "message/rfc822"})
    chunks = content.stream()
    while True:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            break
        except OSError as e:
            if not response.prepared:
                raise _gone(qid) from None
            log.info("%s: the message left the queue while /raw sent it: %s", qid, e.strerror or e)
            raise ConnectionResetError(f"{qid}: left the queue mid-answer") from None
        if not response.prepared:
            await response.prepare(request)
        await response.write(chunk)
    if not response.prepared:
        await response.prepare(request)
    await response.write_eof()
    return response


def first_ids(ids: Sequence[str], shown: int = 20) -> str:
    """`ids` for a log line: the first `shown`, then how many in all (`A,B,…(5000)`): a body of 1 MiB names 90 000."""
    return ",".join(ids[:shown]) + (f",…({len(ids)})" if len(ids) > shown else "")


def describe(selection: qt.Selection) -> str:
    """A selection in the log's words: `ids=A,B from=<s> to_domain=d older_than=3600s` or `ALL`."""
    parts = []
    if selection.ids is not None:
        parts.append(f"ids={first_ids(selection.ids)}")
    if selection.sender is not None:
        parts.append(f"from=<{selection.sender}>")
    if selection.rcpt_domain is not None:
        parts.append(f"to_domain={selection.rcpt_domain}")
    if selection.older_than is not None:
        parts.append(f"older_than={selection.older_than:g}s")
    if selection.queues is not None:
        parts.append(f"queues={','.join(selection.queues)}")
    return " ".join(parts) or "ALL"


def readiness(server) -> str:
    """"" when ready, else what is not up yet."""
    if server.store is None:
        return "the queue store is not open"
    if server.qmgr is None:
        return "qmgr is not running"
    if server.smtpd is None or not server.smtp_addresses:
        return "smtpd is not listening"
    return ""


def routes(server, metrics: Metrics) -> web.RouteTableDef:
    """`server`: the running Mailflow (read at each request: `config`, `clock`, `store`, `qmgr`, `smtpd`,
    `smtp_addresses`, `mail_log`, and `pickup`, which a requeue wakes)."""
    table = web.RouteTableDef()

    def store():
        if server.store is None:
            raise _error(web.HTTPServiceUnavailable, "the queue store is not open")
        return server.store

    @table.get("/healthz")
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    @table.get("/readyz")
    async def readyz(request: web.Request) -> web.Response:
        missing = readiness(server)
        if missing:
            return web.Response(status=503, text=f"not ready: {missing}\n")
        return web.Response(text="ready\n")

    @table.get("/metrics")
    async def metrics_text(request: web.Request) -> web.Response:
        body = await metrics.render()
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    @table.get("/api/summary")
    async def summary(request: web.Request) -> web.Response:
        counts = await store().counts()
        return web.json_response({"version": __version__, "hostname": server.config.myhostname,
                                  "ready": not readiness(server), "time": server.clock.time(),
                                  "queues": {q: counts.get(q, 0) for q in qt.QUEUES}})

    @table.get("/api/queue")
    async def queue_list(request: web.Request) -> web.Response:
        args = _query(request, *SELECTORS, "queue", "after", "limit")
        selection = _selection(args, required=False)
        queues = _queues(args.get("queue"), qt.LISTED_QUEUES)
        limit = _int(args, "limit", DEFAULT_PAGE, 1, PAGE_LIMIT)
        after = args.get("after", "")
        now = server.clock.time()
        s = store()
        if selection.ids is not None:  # at most 500 ids at once, as the tools' pages
            page = await s.message_page(queues=queues, ids=sorted(selection.ids)[:qt.ID_CHUNK], after=after,
                                        limit=limit, **selection.filters(now))
        else:
            page = await s.message_page(queues=queues, after=after, limit=limit, **selection.filters(now))
        rcpts = await s.recipients_of([row.queue_id for row in page])
        return web.json_response({"messages": [qt.entry_json(row, rcpts.get(row.queue_id, ())) for row in page],
                                  "next": page[-1].queue_id if len(page) == limit else None})

    @table.get("/api/queue/shape")
    async def queue_shape(request: web.Request) -> web.Response:
        args = _query(request, "queue", "top")
        queues = _queues(args.get("queue"), ("incoming", "active", "deferred"))
        top = _int(args, "top", 20, 0, 10000)
        counts = await store().shape_counts(queues, server.clock.time(), qt.shape_limits())
        total, domains = qt.shape_rows(counts, top)
        return web.json_response(qt.shape_json(queues, total, domains))

    async def found(request: web.Request):
        try:
            qid = qt.clean_id(request.match_info["id"])
        except qt.SelectionError as e:
            raise _error(web.HTTPBadRequest, str(e)) from None
        detail = await store().message_detail(qid)
        if detail is None:
            raise _error(web.HTTPNotFound, f"{qid}: no such message in the queue")
        return qid, detail

    @table.get("/api/queue/{id}")
    async def queue_show(request: web.Request) -> web.Response:
        qid, detail = await found(request)
        s = store()
        recipients = (await s.recipients_of([qid])).get(qid, [])
        out = io.StringIO()
        try:
            qt.write_show_json(out, detail, recipients, await s.content(qid), qt.HEADERS_ONLY)
        except OSError:  # its file went after the lookup: delivered or deleted meanwhile
            raise _gone(qid) from None
        shown = json.loads(out.getvalue())
        del shown["body"]
        shown["history"] = [{"time": d.time, "recipient": d.recipient, "status": d.status, "dsn": d.dsn,
                             "relay": d.relay, "transport": d.transport, "delay": d.delay, "reason": d.reason}
                            for d in metrics.recent if d.queue_id == qid]
        return web.json_response(shown)

    @table.get("/api/queue/{id}/raw")
    async def queue_raw(request: web.Request) -> web.StreamResponse:
        qid, _ = await found(request)
        content = await store().content(qid)
        if content is None:
            raise _error(web.HTTPNotFound, f"{qid}: its content is missing (a corrupt entry)")
        return await _send_content(request, qid, content)

    @table.post("/api/queue/{action}")
    async def queue_action(request: web.Request) -> web.Response:
        name = request.match_info["action"]
        action = qt.ACTIONS.get(name)
        if action is None:
            raise _error(web.HTTPNotFound, f"no action {name!r} (use {', '.join(qt.ACTIONS)})")
        body = await json_body(request)
        if not isinstance(body, dict):
            raise _error(web.HTTPBadRequest, "the body is a JSON object: {\"ids\": [...], ...}")
        refuse_unknown(body, SELECTORS)
        selection = _selection(body, required=name in REQUIRES_SELECTION)
        done, missed = await qt.apply(store(), action, selection, server.clock.time(), io.StringIO(),
                                      log=server.mail_log or MailLog())  # (before the stages: no observers yet)
        if done and action.wakes_pickup and server.pickup is not None:  # (None before the stages: its start scans)
            server.pickup.wake(requeued=True)  # (in this process: no datagram to its own socket)
        log.info("admin: %s: %s %s: %s%s", who(request), name, describe(selection), qt.plural(done, "message"),
                 f" (not in the {qt.either(action.sources)} queue: {first_ids(missed)})" if missed else "")
        return web.json_response({"action": name, "messages": done, "missed": missed})

    @table.get("/api/destinations")
    async def destinations(request: web.Request) -> web.Response:
        return web.json_response(qt.destinations_json(await store().destination_rows()))

    @table.get("/api/deliveries")
    async def deliveries(request: web.Request) -> web.Response:
        limit = _int(_query(request, "limit"), "limit", 50, 1, metrics.recent.maxlen or 1)
        latest = list(metrics.recent)[-limit:][::-1]
        return web.json_response([{"time": d.time, "queue_id": d.queue_id, "recipient": d.recipient,
                                   "transport": d.transport, "relay": d.relay, "status": d.status, "dsn": d.dsn,
                                   "delay": d.delay, "reason": d.reason} for d in latest])

    @table.get("/api/config")
    async def config(request: web.Request) -> web.Response:
        settings = {key: redacted(key, value) for key, value in flat_settings(server.config).items()}
        return web.json_response({"settings": settings}, dumps=_dumps)

    return table

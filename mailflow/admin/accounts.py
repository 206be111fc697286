"""The admin API's accounts endpoints: `mailflow account user …` over HTTP, by the same code
(mailflow.accounts.database.AccountDatabase, on the database the configuration names: `Config.accounts_path`).

    routes(server) -> web.RouteTableDef

    GET    /api/accounts?domain=              the mailboxes (of one domain): {"users": [{address, domain, home,
                                              quota, enabled}, ...]}
    POST   /api/accounts                      {"address", "password", "quota": 0 | "500M" | "1G"} -> 201, the mailbox
    DELETE /api/accounts/{address}            the mailbox's account (its Maildir stays on disk)
    PUT    /api/accounts/{address}/password   {"password"}: the old one stops working for SMTP, IMAP and POP3

Passwords are checked as `mailflow account` checks them (`[accounts] password_min_length`), hashed by the
database (argon2id), never logged nor answered. Each call runs on a worker thread (hashing takes a while; the
event loop goes on). Every change is logged with who and what (never the password).

Failure behaviour: the database's refusals (AccountError) answer {"error": ...}: bad input 400 (a field the
endpoint does not take too), an unknown user
or a missing database 404, any other conflict (a duplicate, an unknown domain) 409, the database locked 503.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable, TypeVar

from aiohttp import web

from mailflow.accounts.database import (EX_INPUT, EX_TEMPFAIL, AccountDatabase, AccountError, check_password,
                                        parse_size)
from mailflow.admin.access import who
from mailflow.admin.api import json_body, refuse_unknown

log = logging.getLogger("mailflow.admin")
T = TypeVar("T")


def _error(status: type[web.HTTPException], text: str) -> web.HTTPException:
    return status(text=json.dumps({"error": text}), content_type="application/json")


def _refusal(e: AccountError) -> web.HTTPException:
    if e.code == EX_INPUT:
        return _error(web.HTTPBadRequest, e.message)
    if e.code == EX_TEMPFAIL:
        return _error(web.HTTPServiceUnavailable, e.message)
    if e.message.startswith(("no such", "no account database")):
        return _error(web.HTTPNotFound, e.message)
    return _error(web.HTTPConflict, e.message)


async def _body(request: web.Request, *names: str, optional: tuple[str, ...] = ()) -> dict:
    """The JSON object of a request with the string fields `names`; a field it does not take is a 400 (a misspelt
    "qouta" must not make a mailbox without its quota), as the queue endpoints refuse one."""
    body = await json_body(request)
    if not isinstance(body, dict):
        raise _error(web.HTTPBadRequest, "the body is a JSON object")
    refuse_unknown(body, names + optional)
    for name in names:
        if not isinstance(body.get(name), str) or not body[name]:
            raise _error(web.HTTPBadRequest, f"{name}: a string is required")
    return body


def routes(server) -> web.RouteTableDef:
    """`server`: the running Mailflow (its `config` read at each request)."""
    table = web.RouteTableDef()

    async def with_database(work: Callable[[AccountDatabase], T]) -> T:
        path = server.config.accounts_path

        def run() -> T:
            db = AccountDatabase.open(path)
            try:
                return work(db)
            finally:
                db.close()
        try:
            return await asyncio.to_thread(run)
        except AccountError as e:
            raise _refusal(e) from None

    def checked(password: str, address: str) -> str:
        problem = check_password(password, address, server.config.accounts.password_min_length)
        if problem:
            raise AccountError(f"password for {address} refused: {problem}", EX_INPUT)
        return password

    @table.get("/api/accounts")
    async def list_users(request: web.Request) -> web.Response:
        domain = request.query.get("domain") or None
        users = await with_database(lambda db: db.list_users(domain))
        return web.json_response({"users": [u.as_dict() for u in users]})

    @table.post("/api/accounts")
    async def add_user(request: web.Request) -> web.Response:
        body = await _body(request, "address", "password", optional=("quota",))
        quota = body.get("quota", 0)
        if not isinstance(quota, (int, str)) or isinstance(quota, bool):
            raise _error(web.HTTPBadRequest, "quota: bytes, or a size such as \"500M\"")

        def add(db: AccountDatabase):
            address = db.check_new_user(body["address"])
            size = parse_size(str(quota))
            return db.add_user(address, checked(body["password"], address), quota=size)
        user = await with_database(add)
        log.info("admin: %s: account add %s (quota %d)", who(request), user.address, user.quota)
        return web.json_response(user.as_dict(), status=201)

    @table.delete("/api/accounts/{address}")
    async def remove_user(request: web.Request) -> web.Response:
        user = await with_database(lambda db: db.remove_user(request.match_info["address"]))
        log.info("admin: %s: account delete %s", who(request), user.address)
        return web.json_response({**user.as_dict(), "removed": True})

    @table.put("/api/accounts/{address}/password")
    async def set_password(request: web.Request) -> web.Response:
        body = await _body(request, "password")

        def change(db: AccountDatabase):
            address = db.get_user(request.match_info["address"]).address
            return db.set_password(address, checked(body["password"], address))
        user = await with_database(change)
        log.info("admin: %s: account passwd %s", who(request), user.address)
        return web.json_response({**user.as_dict(), "password_changed": True})

    return table

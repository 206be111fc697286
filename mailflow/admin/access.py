"""Who may use the admin listener: bearer tokens from `[admin] token_file`, loopback-only without them.

    read_tokens(path) -> {name: token}     the token file: one `name:token` a line (a line without ':' is the
                                           token named "admin"); blank lines and '#' comments skipped
    Access(tokens)                         the checks, as an aiohttp middleware (`Access.middleware`)
    who(request) -> str                    "name@peer" (token) or "peer" (loopback without tokens): for the log

The checks, in order, for every request but OPEN_PATHS (the health probes, which say nothing):
- With tokens (a token file is set; required beyond loopback): `Authorization: Bearer <token>` must match one
  of them (compared in constant time, every token tried); else 401 with `WWW-Authenticate: Bearer`. The queue
  page's own files (PAGE_FILES: no data in them) are served without one; the page asks for the token.
- Without tokens (loopback only, AdminConfig refuses anything else): the Host header must name a loopback
  address or localhost, so that a web page in the operator's browser cannot reach the API through a name that
  resolves to 127.0.0.1 (DNS rebinding): 403.
- A request that changes something (POST, PUT, DELETE) and has a body (POST always) must be JSON
  (`Content-Type: application/json`, which a cross-site form cannot send without the browser asking first: a
  cross-site PUT or DELETE is asked about whatever its body) and, when it has an Origin header, come from this
  listener's own origin: else 415 or 403.

Failure behaviour: `read_tokens` raises ConfigError(path, "admin.token_file", reason) for a file that cannot be
read (one that is not a regular file included: mailflow.files), has no token, or a token shorter than MIN_TOKEN
characters.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from urllib.parse import urlsplit

from aiohttp import web

from mailflow.errors import ConfigError
from mailflow.files import TEXT_LIMIT, read_regular_file

MIN_TOKEN = 16  # characters: a token an attacker cannot guess by trying
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
PAGE_FILES = frozenset({"/", "/queue.js", "/queue.css"})
WRITES = frozenset({"POST", "PUT", "DELETE", "PATCH"})
TOKEN_NAME = web.RequestKey("admin_token_name", str)  # the name of the token a request came with


def read_tokens(path: str) -> dict[str, str]:
    """The tokens of a token file by name (see the module docstring)."""
    key = "admin.token_file"
    try:
        text = read_regular_file(path, TEXT_LIMIT, null_is_empty=True).decode("utf-8")
    except OSError as e:
        raise ConfigError(path, key, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, key, "not UTF-8 text") from None
    tokens: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        name, token = (name.strip(), token.strip()) if sep else ("admin", name.strip())
        if len(token) < MIN_TOKEN:
            raise ConfigError(path, key, f"line {number}: a token needs at least {MIN_TOKEN} characters")
        if not name or any(c.isspace() for c in name):
            raise ConfigError(path, key, f"line {number}: the name before ':' must be one word")
        if name in tokens:
            raise ConfigError(path, key, f"line {number}: {name!r} is named twice")
        tokens[name] = token
    if not tokens:
        raise ConfigError(path, key, "no token in the file")
    return tokens


def is_loopback_host(host: str) -> bool:
    """A Host header ("127.0.0.1:8026", "[::1]:8026", "localhost") that names this machine's loopback."""
    name = urlsplit(f"//{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def who(request: web.Request) -> str:
    """Who made the request, for the log: the token's name and the peer, or the peer alone."""
    peer = request.remote or "?"
    name = request.get(TOKEN_NAME)
    return f"{name}@{peer}" if name else peer


def _error(status: type[web.HTTPException], text: str, **headers: str) -> web.HTTPException:
    return status(text=json.dumps({"error": text}), content_type="application/json", headers=headers or None)


class Access:
    """See the module docstring. `tokens` empty: loopback only (no token asked)."""

    def __init__(self, tokens: dict[str, str]):
        # compared as SHA-256 digests: equal lengths, so the comparison's time says nothing of a token's length
        self._tokens = [(name, hashlib.sha256(token.encode()).digest()) for name, token in tokens.items()]

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        if request.path in OPEN_PATHS:
            return await handler(request)
        if self._tokens:
            if request.path not in PAGE_FILES:
                request[TOKEN_NAME] = self._token_name(request)
        elif not is_loopback_host(request.host):
            raise _error(web.HTTPForbidden, "this listener answers to loopback names only")
        if request.method in WRITES:
            self._check_write(request)
        return await handler(request)

    def _token_name(self, request: web.Request) -> str:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise _error(web.HTTPUnauthorized, "a bearer token is required", **{"WWW-Authenticate": "Bearer"})
        offered = hashlib.sha256(given.strip().encode()).digest()
        found = ""
        for name, token in self._tokens:  # every token compared, in constant time each
            if hmac.compare_digest(offered, token):
                found = name
        if not found:
            raise _error(web.HTTPUnauthorized, "the bearer token is not valid",
                         **{"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return found

    @staticmethod
    def _check_write(request: web.Request) -> None:
        if (request.method == "POST" or request.body_exists) and request.content_type != "application/json":
            raise _error(web.HTTPUnsupportedMediaType, "send JSON (Content-Type: application/json)")
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            raise _error(web.HTTPForbidden, f"a request from {origin} is not accepted here")

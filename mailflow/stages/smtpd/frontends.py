"""What a trusted front end tells smtpd about the real client: the PROXY protocol header of a load balancer
(haproxy's proxy-protocol.txt, v1 and v2; Postfix smtpd_upstream_proxy_protocol = haproxy) and the XCLIENT
command (Postfix XCLIENT_README).

What it owns
- Reading and checking the bytes: `read_proxy_header(reader)` reads exactly the header and not one byte more
  (what the client sends next stays for the SMTP reader) and returns the real client (`ProxiedClient`), or None
  when the header says to keep the connection's own peer (v2 LOCAL: the balancer's own health check). As in
  Postfix's haproxy_srvr, a header that proxies a client it cannot name (v1 `PROXY UNKNOWN`, v2 PROXY with the
  UNSPEC family) is refused: the client would get the balancer's address, and with it mynetworks.
  `parse_xclient(arg)` turns `NAME=... ADDR=...` into checked values; `apply_xclient(state, attributes)` makes
  them the session's client.
- `FrontEnds.from_config(smtpd)`: a listener's trusted front ends (upstream_proxy_*, authorized_xclient_hosts).
- `FrontEndCommands`, the session layer above protocol.ProtocolCore: with upstream_proxy_protocol "haproxy"
  the PROXY header is read before the greeting (and before the admission, so that limits, mynetworks and logs
  see the real client) and its client becomes `session.peer` (`session.proxied_by` the balancer), the address
  it connected to `session.server_ip`/`server_port` (as Postfix's dest_addr/dest_port); XCLIENT is
  offered to and taken from authorized_xclient_hosts only (judged on the client after any PROXY header, and
  again on each client an XCLIENT names, as Postfix's xclient_cmd), sets what it gives and nothing else (ADDR
  alone keeps the client's names), and starts the session again with a new 220 (or, with delay_reject false,
  the client list's refusal of the client it names: protocol.greet); the handler's XCLIENT hook first closes
  the milters' connections, which the new greeting opens again for the new client (Postfix's xclient_cmd).

aiosmtpd's own PROXY support (`proxy_protocol_timeout`, `handle_PROXY`) is not used: it runs only inside
aiosmtpd's command loop, which mailflow replaces; it reads the header from any peer before anyone may check
that the peer is a trusted balancer; it reads a v1 header up to its line limit before checking the 107-byte
maximum; and the client it names stays in `session.proxy_data`, not `session.peer`, where admission, the
restrictions and the logs look.

Failure behaviour: a malformed header raises `ProxyError`; the session logs a warning, answers `421 4.3.0
<host> Server local error` instead of a greeting and closes, as Postfix's smtpd does; so does a connection
that ends inside the header, a peer outside upstream_proxy_clients, or no header within upstream_proxy_timeout.
A connection that closes before its first byte (a TCP health check), or that was reset before it was accepted
(HAProxy closes its checks with a reset: the connection has no peer address left), is logged at info level only.
A bad XCLIENT attribute raises `XclientError` with the reply to send (501 5.5.4); XCLIENT inside a transaction
gets 503 5.5.1, one without attributes 501 5.5.4, then one from a host not authorized 550 5.7.0 (Postfix's
order). XFORWARD is not supported: every client gets the 550 5.7.0 Postfix gives a client it does not authorize
for it (its default), not a 500 that would read as a command Postfix does not know; after the same two checks.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import struct
from dataclasses import dataclass, field
from typing import Protocol

from mailflow import status
from mailflow.address import hostname_gripe
from mailflow.logs import printable
from mailflow.stages.smtpd.dns_checks import TEMPUNAVAIL, UNAVAILABLE
from mailflow.stages.smtpd.protocol import ProtocolCore
from mailflow.stages.smtpd.state import NEUTERED, SessionState, helo_name
from mailflow.syntax import ascii_upper, command_words
from mailflow.tables.networks import NetworkList

log = logging.getLogger("mailflow.smtpd")

V1_MAX = 107  # the longest v1 header, CRLF included (proxy-protocol.txt section 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX = 536  # the longest v2 header taken, TLVs included: Postfix's HAPROXY_HEADER_MAX_LEN (haproxy_srvr.h)
V2_TCP4, V2_TCP6 = 0x11, 0x21

# offered to authorized_xclient_hosts only, in the order of Postfix 3.7's EHLO reply (with SASL: LOGIN)
XCLIENT_ATTRIBUTES = ("NAME", "ADDR", "PROTO", "HELO", "REVERSE_NAME", "PORT", "LOGIN", "DESTADDR", "DESTPORT")
XCLIENT_KEYWORD = " ".join(("XCLIENT",) + XCLIENT_ATTRIBUTES)


class ProxyError(Exception):
    """A PROXY header that is missing, malformed or unsupported; the text says why (for the log)."""


class NoProxyHeader(ProxyError):
    """The connection closed before its first byte: a TCP health check (connect, then close), not a bad header."""


@dataclass(frozen=True)
class ProxiedClient:
    """The real client as the load balancer saw it, and the address it connected to (the balancer's front end:
    what Postfix takes as the server's address for the policy service and the milters)."""

    addr: str
    port: int
    server_addr: str
    server_port: int


class ExactReader(Protocol):
    """What the PROXY header is read from: an asyncio.StreamReader, or the session's wire.Wire."""

    async def readexactly(self, n: int) -> bytes: ...


async def read_proxy_header(reader: ExactReader) -> ProxiedClient | None:
    """The PROXY header at the start of the connection (v1 or v2). Raises ProxyError."""
    try:
        start = await reader.readexactly(5)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise NoProxyHeader("connection closed before the PROXY header") from None
        raise ProxyError("connection closed inside the PROXY header") from None
    try:
        if start == b"PROXY":
            return _parse_v1(await _read_v1_line(reader, start))
        if start == V2_SIGNATURE[:5]:
            return await _read_v2(reader, start)
    except asyncio.IncompleteReadError:
        raise ProxyError("connection closed inside the PROXY header") from None
    raise ProxyError(f"no PROXY header: the connection starts with {start!r}")


async def _read_v1_line(reader: ExactReader, start: bytes) -> bytes:
    """Byte by byte through the LF (at most 107 bytes): nothing after the header is consumed."""
    line = bytearray(start)
    while not line.endswith(b"\n"):
        if len(line) >= V1_MAX:
            raise ProxyError(f"PROXY v1 header longer than {V1_MAX} bytes")
        line += await reader.readexactly(1)
    if not line.endswith(b"\r\n"):
        raise ProxyError("PROXY v1 header not ended by CRLF")
    return bytes(line[:-2])


def _parse_v1(line: bytes) -> ProxiedClient | None:
    try:
        words = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyError("PROXY v1 header with non-ASCII bytes") from None
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyError(f"malformed PROXY v1 header {line[:V1_MAX]!r}")
    version = 4 if words[1] == "TCP4" else 6
    src, dst = (_v1_address(w, version) for w in words[2:4])
    src_port, dst_port = (_v1_port(w) for w in words[4:6])
    return ProxiedClient(src, src_port, dst, dst_port)


def _v1_address(word: str, version: int) -> str:
    try:
        addr = ipaddress.ip_address(word)
    except ValueError:
        raise ProxyError(f"PROXY v1 header: {word!r} is not an address") from None
    if addr.version != version or "%" in word:
        raise ProxyError(f"PROXY v1 header: {word!r} is not an IPv{version} address")
    return _canonical(addr)


def _canonical(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address as Postfix writes it: an IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, what a dual-stack
    balancer names an IPv4 client with) as IPv4, so that mynetworks, the logs and the limits see `192.0.2.1`."""
    mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    return str(mapped or addr)


def _v1_port(word: str) -> int:
    if not word.isdigit() or not word.isascii() or (len(word) > 1 and word[0] == "0") or int(word) > 65535:
        raise ProxyError(f"PROXY v1 header: {word!r} is not a port")
    return int(word)


async def _read_v2(reader: ExactReader, start: bytes) -> ProxiedClient | None:
    head = start + await reader.readexactly(11)  # 12-byte signature, version/command, family, length
    if head[:12] != V2_SIGNATURE:
        raise ProxyError("PROXY v2 header with a wrong signature")
    version_command, family, length = head[12], head[13], struct.unpack("!H", head[14:16])[0]
    if version_command >> 4 != 2:
        raise ProxyError(f"PROXY v2 header of version {version_command >> 4}")
    if 16 + length > V2_MAX:
        raise ProxyError(f"PROXY v2 header of {16 + length} bytes, longer than {V2_MAX}")
    body = await reader.readexactly(length)
    command = version_command & 0x0F
    if command == 0:  # LOCAL: the balancer's own connection (health check)
        return None
    if command != 1:
        raise ProxyError(f"PROXY v2 header with command {command}")
    if family == V2_TCP4 and length >= 12:
        return _v2_client(ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8]), body[8:12])
    if family == V2_TCP6 and length >= 36:
        return _v2_client(ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32]), body[32:36])
    raise ProxyError(f"PROXY v2 header of unsupported family/protocol {family:#04x} (or too short)")


def _v2_client(src: ipaddress.IPv4Address | ipaddress.IPv6Address, dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
               ports: bytes) -> ProxiedClient:
    src_port, dst_port = struct.unpack("!HH", ports)
    return ProxiedClient(_canonical(src), src_port, _canonical(dst), dst_port)


# -------------------------------------------------------------------------------- XCLIENT

class XclientError(Exception):
    """A refused XCLIENT command; `reply` says why."""

    def __init__(self, reply: status.Reply):
        super().__init__(str(reply))
        self.reply = reply


def parse_xclient(arg: str | None) -> list[tuple[str, str | None]]:
    """[(attribute, value)] from `NAME=... ADDR=...`, in the order given (xclient_cmd applies them in turn: a later
    NAME overrides an earlier REVERSE_NAME), checked word by word as Postfix's xclient_cmd checks them: a value (at
    most 255 octets), xtext-decoded as Postfix decodes it (a value that is not xtext is taken as written, Postfix's
    backwards compatibility), a control character or an octet outside valid UTF-8 masked as "?" (_masked), a known
    attribute, then its syntax.
    None for [UNAVAILABLE] (any case; not PROTO's); NAME's and REVERSE_NAME's [TEMPUNAVAIL] is kept (a temporary
    name status, as Postfix's SMTPD_PEER_CODE_TEMP). ADDR and DESTADDR are normalised ("IPV6:" prefix removed, an
    IPv4-mapped address as IPv4: _canonical, as for a PROXY header); PROTO is upper case."""
    words = command_words(arg)
    if not words:
        raise XclientError(status.XCLIENT_SYNTAX)
    found: list[tuple[str, str | None]] = []
    for word in words:
        name, _, raw = word.partition("=")
        if not raw:
            raise XclientError(status.XCLIENT_VALUE_EXPECTED)
        if len(raw.encode()) > 255:
            raise XclientError(status.XCLIENT_VALUE_TOO_LONG)
        value = _masked(_xtext_decoded(raw))
        if ascii_upper(name) not in XCLIENT_ATTRIBUTES:
            raise XclientError(status.xclient_bad_name(name))
        found.append((ascii_upper(name), _checked(ascii_upper(name), value)))
    return found


def _xtext_decoded(raw: str) -> bytes:
    """xtext as Postfix's xtext_unquote reads it: "+XX" is the byte XX (hex digits in either case), any other
    character is itself (its UTF-8); `raw` itself when a "+" is not followed by two hex digits (xclient_cmd then
    takes the value as sent)."""
    out, i = bytearray(), 0
    while i < len(raw):
        if raw[i] == "+":
            hexa = raw[i + 1:i + 3]
            if not re.fullmatch(r"[0-9A-Fa-f]{2}", hexa):
                return raw.encode()
            out.append(int(hexa, 16))
            i += 3
            continue
        out += raw[i].encode()
        i += 1
    return bytes(out)


_PRINTABLE = re.compile(rb"[ -~]*")  # printable ASCII only: nothing to mask


def _masked(value: bytes) -> str:
    """Postfix's printable(value, '?') as smtpd runs it with SMTPUTF8 (util_utf8_enable): printable ASCII is kept,
    and so is a byte 194-254 with the continuation bytes (128-191) after it, one or more; anything else is one "?"
    per byte (`a.test<U+00A0>` is echoed as it is, as by Postfix 3.7.11). Unlike Postfix, a sequence so kept that
    is still not UTF-8 (`+E2+82`, one byte short) is masked too, a "?" per byte: no reply carries invalid UTF-8."""
    if _PRINTABLE.fullmatch(value):  # (the usual value: an address, a name)
        return value.decode()
    out: list[str] = []
    i = 0
    while i < len(value):
        end = i + 1
        if 194 <= value[i] <= 254:
            while end < len(value) and 128 <= value[end] < 192:
                end += 1
        try:
            kept = value[i:end].decode() if end > i + 1 or 32 <= value[i] <= 126 else None
        except UnicodeDecodeError:
            kept = None
        out.append("?" * (end - i) if kept is None else kept)
        i = end
    return "".join(out)


def _checked(name: str, value: str) -> str | None:
    """The value of attribute `name` as the session takes it; XclientError `Bad NAME syntax: value` (Postfix's
    words, the value as masked; an address neutered first, as xclient_cmd does) when the attribute's syntax
    refuses it."""
    if ascii_upper(value) == UNAVAILABLE and name != "PROTO":  # (PROTO has none: Postfix's `Bad PROTO syntax`)
        return None
    if name in ("NAME", "REVERSE_NAME"):
        if ascii_upper(value) == TEMPUNAVAIL:
            return TEMPUNAVAIL
        if hostname_gripe(value) is not None:  # (Postfix's valid_hostname: a numeric name too)
            raise XclientError(status.xclient_bad_syntax(name, value))
        return value  # as written, as Postfix keeps it (its table lookups fold the case of the key themselves)
    if name in ("ADDR", "DESTADDR"):
        return _address(name, value.translate(NEUTERED))
    if name in ("PORT", "DESTPORT"):  # (alldig, at most five digits: 99999 is taken, as Postfix takes it)
        if not (value.isascii() and value.isdigit()) or len(value) > len("65535"):
            raise XclientError(status.xclient_bad_syntax(name, value))
        return value  # the digits as sent (00025 stays 00025 in logs, policy requests, footers), as Postfix keeps it
    if name == "PROTO":
        if ascii_upper(value) not in ("SMTP", "ESMTP"):
            raise XclientError(status.xclient_bad_syntax(name, value))
        return ascii_upper(value)
    if name == "HELO" and len(value) > 255:
        raise XclientError(status.xclient_bad_syntax(name, value))
    return value


def _address(name: str, value: str) -> str:
    """An ADDR or DESTADDR value as normalize_mailhost_addr takes it (valid_mailhost_addr): IPv4, or IPv6 after
    "IPv6:" (any case); written as Postfix writes it (_canonical: an IPv4-mapped IPv6 address as IPv4)."""
    ipv6 = ascii_upper(value).startswith("IPV6:")
    text = value[5:] if ipv6 else value
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise XclientError(status.xclient_bad_syntax(name, value)) from None
    if "%" in text or (addr.version == 6) != ipv6:
        raise XclientError(status.xclient_bad_syntax(name, value))
    return _canonical(addr)


def apply_xclient(state: SessionState, attributes: list[tuple[str, str | None]]) -> None:
    """The given attributes replace the session's, in turn, as Postfix's xclient_cmd sets them; [UNAVAILABLE] (None)
    makes one unknown. What is not given stays: ADDR alone keeps the client's names, NAME=[UNAVAILABLE] or
    [TEMPUNAVAIL] the reverse name (`_keep_found_names`). The session starts again: HELO name, protocol and login
    are forgotten unless given (the client sends EHLO again)."""
    state.host_name, state.extended_smtp, state.ehlo_said = None, False, False
    state.authenticated, state.auth_data = False, None
    addr, port = (list(state.peer[:2]) + [0])[:2] if isinstance(state.peer, tuple) else ("unknown", 0)
    found = state.client_name if state.xclient_name is None and state.client_name != "unknown" else None
    for name, value in attributes:
        if name == "NAME":  # Postfix's state->name; its reverse_name too when it is a name
            if value in (None, TEMPUNAVAIL):
                _keep_found_names(state, found, verified=False)
            state.xclient_name = value or UNAVAILABLE  # ([TEMPUNAVAIL] stays: the name checks answer it 450)
            state.client_name = "unknown" if value in (None, TEMPUNAVAIL) else value
            if value not in (None, TEMPUNAVAIL):
                state.xclient_reverse_name = value
        elif name == "REVERSE_NAME":
            state.xclient_reverse_name = value or UNAVAILABLE
        elif name == "ADDR":
            _keep_found_names(state, found, verified=True)
            addr = value or "unknown"
        elif name == "PORT":
            port = value
        elif name == "DESTADDR":
            state.server_ip = value or ""
        elif name == "DESTPORT":
            state.server_port = value
        elif name == "HELO":
            state.host_name = helo_name(value) if value is not None else None
        elif name == "PROTO":
            state.extended_smtp = state.ehlo_said = value == "ESMTP"
        elif name == "LOGIN":
            state.authenticated = value is not None
            state.auth_data = value
            state.auth_mechanism = "XCLIENT"  # what Postfix logs as sasl_method for an XCLIENT login
    state.peer = (addr, port)


def _keep_found_names(state: SessionState, found: str | None, *, verified: bool) -> None:
    """The names smtpd found at connect stay the client's when XCLIENT changes the address without naming it (and
    the reverse name when NAME gives none), as Postfix's xclient_cmd keeps state->name, reverse_name and their
    status: `found` (peername.py's verified name, from the hosts file or the DNS) becomes the given name and
    reverse name, so that the checks and the policy service see what Postfix's see. Without one (peername found
    none, or peername_lookup is off), the DNS checks keep asking about the address the front end connected from
    (`names_addr`), whose names Postfix would have looked up at connect."""
    if found is None:
        if verified:
            state.names_addr = state.names_addr or state.peer_ip
        return
    if verified and state.xclient_name is None:
        state.xclient_name = found
    if state.xclient_reverse_name is None:
        state.xclient_reverse_name = found


# -------------------------------------------------------------------------------- the session layer

@dataclass(frozen=True)
class FrontEnds:
    """The trusted front ends of one listener (SmtpdConfig upstream_proxy_*, authorized_xclient_hosts)."""

    proxy_timeout: float | None = None  # None: no PROXY protocol
    proxy_clients: NetworkList = field(default_factory=lambda: NetworkList((), {}))
    xclient_hosts: NetworkList = field(default_factory=lambda: NetworkList((), {}))

    @classmethod
    def from_config(cls, smtpd) -> "FrontEnds":
        return cls(proxy_timeout=smtpd.upstream_proxy_timeout if smtpd.upstream_proxy_protocol == "haproxy" else None,
                   proxy_clients=NetworkList.from_items(smtpd.upstream_proxy_clients,
                                                        setting="smtpd.upstream_proxy_clients"),
                   xclient_hosts=NetworkList.from_items(smtpd.authorized_xclient_hosts,
                                                        setting="smtpd.authorized_xclient_hosts"))


class FrontEndCommands(ProtocolCore):
    """PROXY before the greeting, XCLIENT after it: see the module doc."""

    def __init__(self, handler, *, frontends: FrontEnds | None = None, **kwargs):
        super().__init__(handler, **kwargs)
        self._frontends = frontends or FrontEnds()
        self._xclient_allowed = False
        self._name_kept_logged = False  # "XCLIENT ADDR without NAME" said once a session

    async def _before_greeting(self) -> bool:
        if not await self._upstream_proxy():
            return False
        if not await super()._before_greeting():
            return False
        # judged on address and name (the one found at connect), as smtpd_proto's namadr_list_match(xclient_hosts)
        self._xclient_allowed = self._frontends.xclient_hosts.contains(self.session.peer_ip, self.session.client_name)
        return True

    def _ehlo_keywords(self) -> tuple[str, ...]:
        return super()._ehlo_keywords() + ((XCLIENT_KEYWORD,) if self._xclient_allowed else ())

    async def _upstream_proxy(self) -> bool:
        """The PROXY header of a trusted load balancer (Postfix smtpd_upstream_proxy_protocol = haproxy): its
        client becomes the session's peer. Anything wrong: a warning, and the connection closes silently."""
        timeout = self._frontends.proxy_timeout
        if timeout is None:
            return True
        balancer = self.session.peer_ip
        if not isinstance(self.session.peer, tuple):  # reset before it was accepted: no address, nothing to read
            log.info("unknown[unknown]: connection reset before the PROXY header")  # (HAProxy's checks close so)
            self._close()
            return False
        if not self._frontends.proxy_clients.contains(balancer):
            log.warning("connect from unknown[%s] dropped: not an upstream_proxy_clients address", balancer)
            await self._proxy_failed()
            return False
        try:  # (asyncio.timeout, not wait_for: its frame holds the task it made, the task a failure that holds it)
            async with asyncio.timeout(timeout):
                client = await read_proxy_header(self.wire)
        except TimeoutError:
            log.warning("unknown[%s]: PROXY header: time limit of %gs exceeded, dropped", balancer, timeout)
            await self._proxy_failed()
            return False
        except NoProxyHeader:  # a TCP health check: no warning each time (Postfix warns "haproxy read: EOF")
            log.info("unknown[%s]: closed before the PROXY header", balancer)
            return False
        except ProxyError as e:
            log.warning("unknown[%s]: %s, dropped", balancer, e)
            await self._proxy_failed()
            return False
        if client is not None:
            self.session.peer = (client.addr, client.port)
            self.session.server_ip, self.session.server_port = client.server_addr, client.server_port
            self.session.proxied_by = balancer
        log.debug("[%s]:%s via upstream proxy [%s]", self.session.peer_ip,
                  self.session.peer[1] if len(self.session.peer) > 1 else "?", balancer)
        return True

    async def _proxy_failed(self) -> None:
        """No client to serve: Postfix's smtpd answers `421 4.3.0 <host> Server local error` (SMTPD_FLAG_HANGUP)
        in place of the greeting and hangs up, so that a client that does reach the port learns to retry."""
        if self.transport is None or self.transport.is_closing():
            return
        await self._refuse_and_close(status.proxy_failed(self.hostname))

    def _log_name_kept(self, attributes: list[tuple[str, str | None]]) -> None:
        """ADDR without NAME keeps the front end's name (Postfix's rule): name-based permits (check_client_access
        on the name, permit_rhswl_client, ...) then cover every client it names that way. Said at info level once
        a session, so that the upgrade hazard is seen in the log (Postfix says nothing)."""
        given = {name for name, _ in attributes}
        if self._name_kept_logged or "ADDR" not in given or "NAME" in given or self.session.client_name == "unknown":
            return
        self._name_kept_logged = True
        log.info("%s: XCLIENT ADDR without NAME: the client keeps the name %s found for the front end (name-based "
                 "permits apply to it)", self.session.client, self.session.client_name)

    async def smtp_XFORWARD(self, arg: str | None) -> None:
        """Postfix XFORWARD (a content filter passing on the original client's attributes): not supported, so
        refused as Postfix refuses a client outside smtpd_authorized_xforward_hosts (empty by default), after
        its own first checks: inside a mail transaction 503, no attribute at all a syntax error."""
        await self.push(self._before_authorization("XFORWARD", arg) or status.XCLIENT_DENIED)

    def _before_authorization(self, command: str, arg: str | None) -> status.Reply | None:
        """What Postfix's XCLIENT and XFORWARD refuse before they ask whether the client may use them."""
        if self.envelope.mail_from:
            return status.XCLIENT_IN_TRANSACTION
        return None if (arg or "").strip() else status.syntax(f"{command} attribute=value...")

    def _client_changed(self) -> None:
        """What depends on the client's address and name, judged again (the listener's session: server.py)."""

    async def smtp_XCLIENT(self, arg: str | None) -> None:
        """Postfix XCLIENT: an authorized front end names the real client; the session starts again."""
        refusal = self._before_authorization("XCLIENT", arg)
        if refusal is None and not self._xclient_allowed:  # (not logged: Postfix logs nothing either)
            refusal = status.XCLIENT_DENIED
        if refusal is not None:
            await self.push(refusal)
            return
        try:
            attributes = parse_xclient(arg)
        except XclientError as e:
            await self.push(e.reply)
            return
        before = self.session.client
        apply_xclient(self.session, attributes)
        # judged again on the client it names, as xclient_cmd does: a front end that named an outside client has
        # handed the session over (a second XCLIENT then gets 550, and EHLO no longer offers it)
        self._xclient_allowed = self._frontends.xclient_hosts.contains(self.session.peer_ip, self.session.client_name)
        self._client_changed()
        log.info("%s: XCLIENT: client is now %s:%s helo=<%s> login=%s", before, self.session.client,
                 self.session.port_text, printable(self.session.host_name or ""),
                 printable(self.session.auth_data) if self.session.authenticated else "-")
        self._log_name_kept(attributes)
        self._reset_transaction()
        self._checkpoint(everything=True)  # (Postfix's xclient_cmd: chat_reset(state, 0))
        await self._call_handler_hook("XCLIENT")  # (the milters start again for the new client)
        await self.greet("XCLIENT")

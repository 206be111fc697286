"""smtpd's typed state: who the client is (one per connection) and the mail transaction (one per message).

aiosmtpd makes these through its documented factories `SMTP._create_session()` and `_create_envelope()`; the
session (session.py) returns the subclasses below, so that every field is declared here with its meaning and
read directly (never `getattr(..., default)`).

- `SessionState(aiosmtpd.smtp.Session)`: the client, for the whole connection. aiosmtpd makes a new one after
  STARTTLS (RFC 3207: HELO and login are forgotten); `carry_identity(previous)` keeps who the client is (the
  PROXY or XCLIENT client). XCLIENT replaces its fields (frontends.apply_xclient).
- `SessionMemo`: the session's lookup answers, bounded (the least recently read dropped).
- `Transaction(aiosmtpd.smtp.Envelope)`: one mail transaction. A new one at the connection, at HELO, EHLO,
  RSET, STARTTLS and XCLIENT, and after each message whatever its outcome: so RSET clears exactly the fields of
  `Transaction` and none of `SessionState`. `discard_bdat()` frees a BDAT spool it still holds.
- The values that travel on (mailflow.model): `Transaction.model_envelope()`, `SessionState.client_info()`,
  `SessionState.client_attributes(transaction)` (kept with the message for the delivery agents),
  `received_protocol(session, transaction)`; `helo_name()`: a HELO name as the session keeps it.

Failure behaviour: plain data and pure conversions; nothing here does I/O or raises for a client's input.
"""
from __future__ import annotations

import asyncio
from typing import Any

from aiosmtpd.smtp import Envelope as _AiosmtpdEnvelope
from aiosmtpd.smtp import Session as _AiosmtpdSession

from mailflow import status
from mailflow.content import Content, Spool
from mailflow.logs import client_name, printable
from mailflow.model import ClientAttributes, ClientInfo, Envelope, rfc_addr
from mailflow.stages.smtpd.restrictions import Marks
from mailflow.stages.smtpd.tls import ClientCert
from mailflow.stages.smtpd.wire import ContentCheck

NULL_SENDER = "<>"  # how aiosmtpd spells MAIL FROM:<> in `mail_from`
NEUTERED = str.maketrans({c: "?" for c in ' <>()\\";@'})  # Postfix smtpd's NEUTER_CHARACTERS


MEMO_LIMIT = 32  # lookup answers a session remembers


class SessionMemo(dict):
    """The answers of a session's restriction lookups, by question (SessionState.memo): at most MEMO_LIMIT once
    `trimmed()`, the least recently read dropped first, so that a client asking about many senders or domains
    makes only those be asked again, not the answers every RCPT reads (its name's, SPF's)."""

    def __getitem__(self, key: Any) -> Any:
        value = super().pop(key)  # (KeyError as a dict's) read: now the most recent
        super().__setitem__(key, value)
        return value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key in self:
            return self[key]
        self[key] = default
        return default

    def trimmed(self) -> SessionMemo:
        while len(self) > MEMO_LIMIT:
            del self[next(iter(self))]
        return self


def helo_name(text: str) -> str:
    """A HELO/EHLO (or XCLIENT HELO) name as the session keeps it, as Postfix keeps it: printable(), then the
    characters of ` <>()\\";@` made `?`. It is written into the Received header (`from NAME (host [ip])`),
    whose comment it must not forge, and into the logs and policy requests. The checks of the HELO command
    itself (milters) see it as sent."""
    return printable(text).translate(NEUTERED)


class SessionState(_AiosmtpdSession):
    """The client of one connection. aiosmtpd's fields first, as mailflow uses them, then mailflow's."""

    # `peer`: (ip, port) of the client: the real one after a PROXY header or XCLIENT (port None: [UNAVAILABLE];
    # after XCLIENT PORT the digits as sent, a str); setting it sets `peer_ip`
    peer_ip: str  # the client's address as text, "unknown" when there is none (read a dozen times a message)
    server_ip: str  # the address of this server the client connected to ("" when unknown); behind a PROXY
    server_port: int | str | None  # header the one it names (the balancer's front end), as Postfix; the port (None
    # when unknown: not known from the socket, or XCLIENT DESTPORT=[UNAVAILABLE]; after DESTPORT the digits as sent)
    ssl: dict[str, Any] | None  # None before TLS; then "ssl_object" and "cipher" (name, version, bits)
    client_cert: ClientCert | None  # what the client's TLS certificate says (tls.client_cert); None: none sent
    host_name: str | None  # the HELO/EHLO name (`helo_name`: printable, neutered); None before one
    extended_smtp: bool  # EHLO was said (a HELO after it keeps it, as Postfix keeps its protocol; XCLIENT resets it)
    # the session's HELO name came from an EHLO said in its present state (since TLS began, since XCLIENT; a HELO
    # after it clears it): what opens AUTH (docs/security.md), where extended_smtp is kept over HELO and STARTTLS
    ehlo_said: bool
    authenticated: bool  # a login succeeded (AUTH, or XCLIENT LOGIN)
    auth_data: Any  # that login name (str) while authenticated, else None
    # (aiosmtpd's `loop`; its `proxy_data` stays None: frontends.py says why mailflow reads PROXY itself)
    client_name: str  # the client's host name for logs and checks: found at connect (peername.py), or XCLIENT NAME
    # What XCLIENT NAME said of the client's verified name ([UNAVAILABLE]: no name; [TEMPUNAVAIL]: the front end's DNS
    # could not tell), and NAME or REVERSE_NAME of its reverse (PTR) name; None: not given, the DNS checks ask
    xclient_name: str | None
    xclient_reverse_name: str | None
    # the address the client's names are asked for when not given ("": its own); after XCLIENT ADDR without NAME
    # the front end's when no name was found at connect (else that name is kept as the given one: frontends.py)
    names_addr: str
    proxied_by: str  # the load balancer's address when a PROXY header named the client, else ""
    auth_mechanism: str  # PLAIN or LOGIN as the client wrote it, or XCLIENT: the `sasl_method` of the log and of
    # policy requests (Postfix's, as written)
    milters: Any  # the session's milter connections (filters.milter.MilterSession), made at its greeting
    memo: SessionMemo  # answers of the session's restriction lookups (client name, SPF), by question; kept small
    # delay_reject false (the client and helo lists run at connect or XCLIENT, and HELO/EHLO): the client list's
    # refusal, after which every command but QUIT is refused; each list's DEFER_IF_PERMIT (the helo list's
    # including the client list's), carried to the RCPT lists as Postfix's defer_if_permit_client, _helo
    access_denied: status.Reply | None
    defer_if_permit_client: status.Reply | None
    defer_if_permit_helo: status.Reply | None
    # the DEFER_IF_PERMIT after the sender list last ran in the session (the client and helo lists' included; kept
    # whatever that list's verdict, and over RSET and later transactions, as Postfix's defer_if_permit_sender): what
    # the relay and recipient lists start from, a VRFY outside a transaction's too
    defer_if_permit_sender: status.Reply | None
    # a pipelining violation was met (logged once, refused or not: Postfix's SMTPD_FLAG_ILL_PIPELINING; kept
    # over STARTTLS), what reject_unauth_pipelining refuses
    ill_pipelining: bool
    # the connection's client (as a PROXY header names it; XCLIENT does not change it: Postfix's state->sockaddr)
    # is one of this server's own addresses (set at connect): what permit_inet_interfaces permits
    on_this_host: bool

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(loop)
        self.authenticated = False
        self.server_ip = ""
        self.server_port = None
        self.client_name = "unknown"
        self.xclient_name = self.xclient_reverse_name = None
        self.names_addr = ""
        self.proxied_by = ""
        self.auth_mechanism = ""
        self.client_cert = None
        self.milters = None
        self.memo = SessionMemo()
        self.access_denied = self.defer_if_permit_client = self.defer_if_permit_helo = None
        self.defer_if_permit_sender = None
        self.ill_pipelining = False
        self.on_this_host = False
        self.ehlo_said = False
        self._client_key: tuple[str, str] | None = None  # (client_name, peer_ip) that `_client` was made of
        self._client = ""

    def carry_identity(self, previous: SessionState) -> None:
        """After STARTTLS: the client stays who PROXY or XCLIENT said it is (HELO and login are not kept); its
        milter connections stay open; a client that said EHLO stays an ESMTP one until it says HELO or EHLO
        again (Postfix's helo_reset keeps its protocol name: pipelining before the new EHLO is no violation, the
        Received header says ESMTPS); `ehlo_said` is not kept: AUTH waits for an EHLO inside TLS."""
        self.peer = previous.peer
        self.server_ip = previous.server_ip
        self.server_port = previous.server_port
        self.proxied_by = previous.proxied_by
        self.on_this_host = previous.on_this_host
        self.client_name = previous.client_name
        self.xclient_name = previous.xclient_name
        self.xclient_reverse_name = previous.xclient_reverse_name
        self.names_addr = previous.names_addr
        self.milters = previous.milters  # the same milter connections (a new HELO follows)
        self.access_denied = previous.access_denied  # (Postfix's stay over STARTTLS)
        self.defer_if_permit_client = previous.defer_if_permit_client
        self.defer_if_permit_helo = previous.defer_if_permit_helo
        self.defer_if_permit_sender = previous.defer_if_permit_sender
        self.ill_pipelining = previous.ill_pipelining
        self.extended_smtp = previous.extended_smtp

    @property
    def defer_if_permit_before_mail(self) -> status.Reply | None:
        """What MAIL and ETRN carry from the client and helo lists (Postfix's defer_if_permit_client | _helo): the
        helo list's, which holds the client list's, else the client list's (the client may skip HELO). XCLIENT
        runs the client list again but keeps the helo list's, as Postfix's xclient_cmd keeps
        defer_if_permit_helo."""
        return self.defer_if_permit_helo or self.defer_if_permit_client

    @property
    def peer(self) -> Any:
        return self._peer

    @peer.setter
    def peer(self, peer: Any) -> None:
        self._peer = peer
        self.peer_ip = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"

    @property
    def peer_port(self) -> int:
        """The client's port; 0 when unknown (XCLIENT PORT=[UNAVAILABLE])."""
        peer = self._peer
        return int(peer[1] or 0) if isinstance(peer, tuple) and len(peer) > 1 else 0

    @property
    def port_text(self) -> str:
        """The client's port as Postfix writes it (policy requests, the queue file's client_port, footers):
        `unknown` after XCLIENT PORT=[UNAVAILABLE] (the peer's port None), else the number (`0` for PORT=0)."""
        peer = self._peer
        port = peer[1] if isinstance(peer, tuple) and len(peer) > 1 else None
        return "unknown" if port is None else str(port)

    @property
    def client(self) -> str:
        """`host[ip]` of the client as known now (after PROXY and XCLIENT), for the log: made again only when its
        name or address changed (it is asked for at every log line and check that names the client)."""
        key = (self.client_name, self.peer_ip)
        if key != self._client_key:
            self._client_key, self._client = key, client_name(*key)
        return self._client

    @property
    def login(self) -> str:
        """The SASL login, "" when not authenticated (auth.login_of's, written out: read a few times a message)."""
        data = self.auth_data
        return data if self.authenticated and isinstance(data, str) else ""

    @property
    def protocol(self) -> str:
        """SMTP or ESMTP (the policy protocol's protocol_name, the log's proto=)."""
        return "ESMTP" if self.extended_smtp else "SMTP"

    def client_info(self, transaction: Transaction | None = None, *, login_in_received: bool = False) -> ClientInfo:
        """The client as cleanup records it (Received header, `client=` log line); `login_in_received`: the
        Received header names the login (sasl_authenticated_header)."""
        host = (self._peer or ("unknown", 0))[0]
        port = self.peer_port
        login = self.login
        return ClientInfo(addr=host, port=port, helo=self.host_name or "",
                          protocol=received_protocol(self, transaction), hostname=self.client_name,
                          sasl_method=self.auth_mechanism if login else "", sasl_username=login,
                          received_login=login if login_in_received else "")

    def client_attributes(self, transaction: Transaction) -> ClientAttributes:
        """The client as Postfix's smtpd records it in the queue file for the delivery agents: the address in
        its RFC 5321 form ("IPv6:" before an IPv6 one), the protocol SMTP or ESMTP, the login and AUTH= sender."""
        ip = self.peer_ip
        login = self.login
        return ClientAttributes(name=self.client_name, address=rfc_addr(ip),
                                port=self.port_text,
                                helo=self.host_name or "", protocol=self.protocol,
                                sasl_method=self.auth_mechanism if login else "", sasl_username=login,
                                sasl_sender=transaction.auth_sender or "")  # (an empty one: ignored by cleanup)


class Transaction(_AiosmtpdEnvelope):
    """One mail transaction. aiosmtpd's fields first, as mailflow uses them, then mailflow's."""

    mail_from: str | None  # the sender as given: None before MAIL, "<>" for the null sender
    mail_options: list[str]  # MAIL's parameters for the handler, upper case: BODY=8BITMIME, SIZE=n, SMTPUTF8
    smtp_utf8: bool  # MAIL said SMTPUTF8
    rcpt_tos: list[str]  # the recipients accepted so far, in order
    # (aiosmtpd's `rcpt_options` stays empty: RCPT's parameters are the DSN ones, in `rcpt_dsn`)
    content: Content | None  # type: ignore[assignment]  # the message once its end was read: never bytes
    original_content: Content | None  # type: ignore[assignment]  # the same Content
    dsn_ret: str  # RFC 3461 RET: FULL, HDRS or ""
    dsn_envid: str  # RFC 3461 ENVID, xtext-decoded ("" when not given)
    auth_sender: str | None  # MAIL's AUTH= value as given, printable (None for AUTH=<> or none): sasl_sender
    rcpt_dsn: list[tuple[str, str]]  # one (NOTIFY, ORCPT) per accepted recipient, in the order of rcpt_tos
    rcpt_written: list[str]  # one per accepted recipient: its address as the client wrote it (the original)
    overshoot: int  # recipients refused for recipient_limit (errors only past recipient_overshoot_limit)
    marks: Marks  # what restrictions decided for the whole message (DISCARD / HOLD and why)
    policy_instance: str  # the policy protocol's `instance`, given at the first restriction check ("" before)
    bdat: tuple[Spool, ContentCheck] | None  # (spool, checks) of BDAT content being received; None without BDAT
    bdat_failed: bool  # a chunk was refused (BDAT 0 without LAST, no recipients): the rest is discarded until LAST
    bdat_octets: int | None  # the size of a message given by BDAT as Postfix reports it (None for DATA)
    queue_id: str  # the message's queue id, taken at the first accepted recipient (Postfix: its queue file is
    # opened there); "" before. It names the transaction in the log, policy requests and milter macros
    queued_as: str  # the queue id the handler committed the message as ("" until then)
    # delay_reject false: the sender list's DEFER_IF_PERMIT at MAIL, the client and helo lists' included, carried
    # to the RCPT lists (Postfix's defer_if_permit_sender)
    defer_if_permit_sender: status.Reply | None

    def __init__(self) -> None:
        super().__init__()
        self.dsn_ret = ""
        self.dsn_envid = ""
        self.auth_sender = None
        self.rcpt_dsn = []
        self.rcpt_written = []
        self.overshoot = 0
        self.marks = Marks()
        self.policy_instance = ""
        self.bdat = None
        self.bdat_failed = False
        self.bdat_octets = None
        self.queue_id = ""
        self.queued_as = ""
        self.defer_if_permit_sender = None

    @property
    def sender(self) -> str | None:
        """None before MAIL, "" for the null sender, else the address."""
        if self.mail_from is None:
            return None
        return "" if self.mail_from == NULL_SENDER else self.mail_from

    @property
    def single_recipient(self) -> str:
        """"The recipient" of a DATA-time check: the only one, else ""."""
        return self.rcpt_tos[0] if len(self.rcpt_tos) == 1 else ""

    @property
    def processing_bdat(self) -> bool:
        """BDAT content has begun, or a BDAT was refused and its transaction not ended (Postfix's
        SMTPD_PROCESSING_BDAT): MAIL, RCPT and DATA are out of order until BDAT LAST, RSET or HELO/EHLO."""
        return self.bdat is not None or self.bdat_failed

    def discard_bdat(self) -> None:
        """Free the BDAT content received so far (the transaction ends without it being queued)."""
        if self.bdat is not None:
            self.bdat[0].discard()
            self.bdat = None

    def model_envelope(self) -> Envelope:
        """The envelope that travels to cleanup: NOTIFY only when the client gave some; an ORCPT for every
        recipient, made up as `rfc822;ADDRESS` as written where the client gave none (Postfix's smtpd does so, so
        its notices' Original-Recipient reads `rfc822;ADDRESS`, not bounce(8)'s `rfc822; ADDRESS` of mail that
        came without one); the originals only when one was written otherwise than it is taken."""
        body = next((o[5:] for o in self.mail_options if o.startswith("BODY=")), "")
        dsn: dict = {"envid": self.dsn_envid, "ret": self.dsn_ret}
        if len(self.rcpt_dsn) == len(self.rcpt_written) == len(self.rcpt_tos):
            if any(n for n, _ in self.rcpt_dsn):
                dsn["notify"] = tuple(n for n, _ in self.rcpt_dsn)
            dsn["orcpts"] = tuple(o or f"rfc822;{written}" for (_, o), written in zip(self.rcpt_dsn, self.rcpt_written))
        if self.rcpt_written != self.rcpt_tos and len(self.rcpt_written) == len(self.rcpt_tos):
            dsn["originals"] = tuple(self.rcpt_written)
        return Envelope(self.sender or "", tuple(self.rcpt_tos), smtputf8=self.smtp_utf8, body_type=body, **dsn)


def received_protocol(session: SessionState, transaction: Transaction | None = None) -> str:
    """The `with` word of the Received header, as Postfix writes it: SMTP or ESMTP, UTF8SMTP for an SMTPUTF8
    transaction (RFC 6531), then S over TLS and A after AUTH (RFC 3848; ESMTP only)."""
    if not session.extended_smtp:
        return "SMTP"
    base = "UTF8SMTP" if transaction is not None and transaction.smtp_utf8 else "ESMTP"
    return base + ("S" if session.ssl is not None else "") + ("A" if session.authenticated else "")

"""The SMTP family's client (Postfix smtp(8), which is also its lmtp(8)): MX delivery and relaying over SMTP, and
the core that the LMTP transport (mailflow.transports.lmtp) shares.

    SmtpTransport(config, *, resolver, helo_name, rng=None, clock=time.monotonic, tables=None)   (transport)
    await deliver(request) -> DeliveryReport      one result per recipient, never raises for a delivery problem
    await close()                                 QUITs the cached sessions; no task or timer is left behind

Split by job, as Postfix's src/smtp/ is:
    reply     sans-IO reply parser and the Reply type, with every limit on a reply (line length, line count)
    commands  sans-IO command builders (MAIL and RCPT with SIZE/BODY/SMTPUTF8/DSN), EHLO/LHLO extensions, the
              envelope screening and "the peer cannot take this message" checks
    chat      the connection: its asyncio protocol (replies queued in order, flow control, STARTTLS) and Session
    addr      next hops (smtp and lmtp forms), peers, MX order                            (smtp_addr)
    connect   connect, greeting, EHLO/HELO/LHLO, STARTTLS per the TLS policy, AUTH        (smtp_connect)
    tls       TLS policy, contexts, certificate name matching                              (smtp_tls_policy)
    proto     one mail transaction, pipelined or not; SMTP's one reply or LMTP's per-recipient replies (smtp_proto)
    trouble   the failures (mailflow.errors delivery errors) and what each recipient gets  (smtp_trouble)
    reuse     the connection cache                                                         (smtp_reuse)
    transport SmtpTransport: routing, the first reachable peer, caching
The content is streamed through mailflow.transports.encode (dot-stuffing) and downgrade (8BITMIME to 7 bit); header
fields go as they are, 8-bit bytes too, to a peer with or without SMTPUTF8 (as Postfix's smtp(8)).

Nexthop forms (Postfix semantics):
- `[host]` or `[host]:port`  no MX lookup; connect to host's addresses (port defaults to `config.port`).
- `domain` or `domain:port`  MX lookup of domain: by preference, ties shuffled with the injected RNG; no MX record
  means the domain itself (implicit MX). Each MX host's addresses (A and AAAA) are tried in random order (the
  injected RNG; Postfix's smtp_randomize_addresses, smtp_address_preference = any), all on
  `port` (default `config.port`).

Which peer: the next MX host / address is tried when connecting fails or times out, or when the greeting, EHLO,
STARTTLS (as the TLS policy requires it) or AUTH fails, for at most MX_ADDRESS_LIMIT (5) addresses per delivery
(smtp_mx_address_limit) of the first 100 MX hosts. The first peer that completes the handshake gets the
message; a temporary failure there (a 4xx reply, a lost or timed-out dialogue) leaves the recipients it concerns
to the next peer, as Postfix's smtp_rcpt_fail/smtp_mesg_fail do before the final server, for at most
MX_SESSION_LIMIT (2) sessions per delivery (smtp_mx_session_limit); if no later peer takes a session they get
its failure (none tried: the first session's answers stand). A 5xx is final wherever it comes from. Each reason
left to the next peer is logged (`QID: host ... said: 4xx ...`, Postfix's line for a server that is not the final
one) when that peer is tried, so the session that turns out to be the last logs only its results.
Then smtp.fallback_relay, each relay a next hop of its own, for what is left (transport's docstring).
A cached session for the next hop is used before any of that, after its RSET probe (pipelined with MAIL when
the peer offers PIPELINING: proto); one that fails the probe or turns out dead before MAIL FROM is answered is
dropped and the delivery goes on a fresh connection, counting no failure. After a delivery the session is cached
(RSET first only when a transaction is still open: a finished DATA leaves the server in its initial state) for
connection_cache_time_limit; QUIT is sent without waiting for
its reply (Postfix smtp_skip_quit_response). TLS and AUTH: see connect.

What each recipient gets:
- accepted after end of DATA                        SENT, the remote's reply ("250 2.0.0 Ok: queued as X")
- refused RCPT / MAIL / DATA / end of DATA          5xx BOUNCED, 4xx DEFERRED, with "host h[ip] said: ... (in reply
                                                    to X command)"; a reply without an enhanced code gets x.0.0
- a code that is not 2xx/4xx/5xx where one was due  BOUNCED 5.5.0 (a 2xx to DATA: "Protocol error: host h[ip]
  (354 to RCPT), a 2xx to DATA                      said: 250 ..."), as Postfix's smtp client takes them
- null MX (RFC 7505)                                BOUNCED 5.1.10
- this server (own_addresses, on one of own_ports)  BOUNCED 5.4.6 "mail for X loops back to myself"; only
  is the best MX (or the [host])                    better MX hosts, without addresses: DEFERRED 4.4.4
- domain does not exist (NXDOMAIN), no MX host (or  BOUNCED 5.4.4 "Host or domain name not found. Name service
  the [host]) has an address                        error for name=h type=AAAA: Host not found" (as Postfix)
- DNS failure                                       DEFERRED 4.4.3, site_ok=False
- no peer could be talked to                        DEFERRED (4.4.1 connect, 4.4.2 timeout/lost, 4.5.0 a reply too
                                                    long, 4.7.x TLS/AUTH, ...), naming the last peer tried (its
                                                    relay too, once connected), site_ok=False
- a peer refused EHLO/HELO with 5xx                BOUNCED with its reply, no other peer tried (Postfix bounces a
  (or STARTTLS, when TLS is required)               hard error at once); a 5xx greeting is skipped like a 4xx
                                                    (smtp_skip_5xx_greeting: the next peer, else DEFERRED); a code
                                                    neither 2xx, 4xx nor 5xx there, greeting included: BOUNCED 5.5.0
- connection lost, timed out or garbled during the  those without a final answer DEFERRED 4.4.2 (4.5.0 a reply of
  dialogue                                          over 1000 lines or 64 KB), site_ok=False; the text names the
                                                    stage ("... timed out while sending RCPT TO")
- lines that are no reply lines ("oops")            read on past, as Postfix does: the reply is the next one's,
                                                    their text before it ("host h[ip] said: oops 550 5.1.1 ..."),
                                                    the session not cached (see chat); in an EHLO reply such a
                                                    line offers nothing ("SIZE 10" is no limit)
- needs SMTPUTF8, the peer does not offer it        BOUNCED 5.6.7
- bigger than the peer's advertised SIZE            BOUNCED 5.3.4
- address with a control character (CR, LF, NUL…)   that recipient BOUNCED 5.1.3 (in the sender: all, 5.1.7)
- a TLS policy or password table cannot answer      DEFERRED 4.3.0 (an unusable TLS policy value: 4.7.0 "client TLS
                                                    configuration problem"), site_ok=True: the fault is ours

DSN (RFC 3461): to a peer that offers DSN, MAIL carries RET and ENVID (xtext) and each RCPT its NOTIFY and ORCPT (the
client's, else `rfc822;<the address first given>`), as Postfix's smtp(8) does; its accepted recipients are marked
`next_hop_notifies`, so qmgr sends no success notice of its own (the peer does what NOTIFY asks). To a peer without
DSN nothing is passed on, and a NOTIFY=SUCCESS recipient gets a "relayed" notice from here.
8BITMIME: a message received as 8BITMIME (or marked so by cleanup) goes with BODY=8BITMIME to a peer that offers
it, one received with BODY=7BIT with BODY=7BIT; to a peer without it, every message but one received as 7BIT is
converted (Postfix's default, disable_mime_output_conversion = no): parts labelled 8bit become quoted-printable
(see downgrade). Time limits: connect_timeout (TCP), helo_timeout (greeting, EHLO/HELO),
command_timeout (AUTH, MAIL, each RCPT, DATA, RSET), data_timeout (the content and the reply after it),
starttls_timeout (the reply to STARTTLS, the handshake).

`site_ok` is False only when the destination could not be talked to; refusals and bounces keep it True.
The envelope is sent exactly as queued (no re-parsing); the content as it is, dot-stuffed, ending in CRLF,
streamed from the queue chunk by chunk: a big message is never held whole, and the SIZE given and checked is the
queued size (as Postfix's). A small message goes out in one write.
`relay` is `host[ip]:port`, or "none" before any connection.
"""
from mailflow.transports.smtp.transport import SmtpTransport

__all__ = ["SmtpTransport"]

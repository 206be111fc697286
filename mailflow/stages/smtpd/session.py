"""The SMTP protocol edge: `SmtpSession`, one per client connection, built in layers in the order of a dialogue.

    protocol.ProtocolCore      the connection, replies, deadlines, the command loop and its discipline;
                               HELO, EHLO, VRFY, ETRN, QUIT (RSET, NOOP are aiosmtpd's)
    frontends.FrontEndCommands the PROXY header before the greeting, XCLIENT
    secure.SecureCommands      STARTTLS, AUTH, the sender-login check
    transaction.TransactionCommands  MAIL and RCPT with their parameters (SIZE, BODY, SMTPUTF8, AUTH=, DSN)
    data.DataCommands          DATA and BDAT content into a spool, handed to the handler
    SmtpSession                all of them (server.ListenerSession adds a listener's admission)

The state it keeps is typed (state.py): `session` is a `SessionState` (who the client is), `envelope` a
`Transaction` (the message being given); mailflow.session_log.SessionLog counts the commands for the disconnect line.
Input is read through `wire.Wire`: chunked and strict about CRLF, never aiosmtpd's line-by-line readers.
Policy lives in the handler (handler.py). Every reply after the greeting, except HELO/EHLO's, carries an
enhanced status code (RFC 2034). Whatever ends a session (QUIT, a drop, a refusal, a TLS handshake that fails
or is abandoned, which asyncio never reports to connection_lost), `_session_ended` runs once and frees what it
held.

Failure behaviour (each refusal is a reply from `mailflow.status`; the session never raises out):
- bare LF / bare CR in a command or content: 521 5.5.2 and the session closes; the message is not queued
  (with forbid_bare_newline false a bare LF is a line end, normalised to CRLF; see wire.py).
- a command line that is not valid UTF-8: 500 5.5.2 Error: bad UTF-8 syntax (Postfix with SMTPUTF8).
- MAIL/RCPT: no FROM:/TO: 501 5.5.4; a malformed path 501 5.1.7 / 5.1.3 (logged as Postfix's "Illegal
  address syntax"); an unknown parameter 555 5.5.4; past recipient_limit 452 4.5.3, counted as an error only
  past recipient_overshoot_limit; past the client's message or recipient rate (anvil) 450 4.7.1.
- STARTTLS inside TLS: 554 5.5.1; inside a mail transaction: 503 5.5.1.
- BDAT 0 without LAST: 551 5.7.1 Null BDAT request; the transaction has failed: its later chunks are read and
  discarded (551 5.0.0), the last one ending it (Postfix's replies).
- input before the greeting, or pipelined after a command that must end a group (RFC 2920: EHLO, HELO, DATA,
  VRFY, EXPN, NOOP, STARTTLS, AUTH), or any pipelining after HELO: 554 5.5.0 and the session closes.
- over `hard_error_limit` errors: 421 4.7.0 and close; from `soft_error_limit` errors on each reply waits
  `error_sleep_time`; junk commands (NOOP, VRFY, RSET, ETRN) beyond `junk_command_limit` count as errors.
- a command not complete within `timeout` of the previous one, or DATA slower than `min_data_rate` beyond
  `timeout`, closes the session (slowloris); a session older than `session_time_limit` gets 421 4.4.2 at its
  next command.
- trusted front ends (`frontends.py`): with upstream_proxy_protocol "haproxy" the PROXY header is read before
  the greeting and its client becomes the session's peer; a peer outside upstream_proxy_clients, a malformed
  header or none within upstream_proxy_timeout: a warning is logged and the connection gets 421 4.3.0 in
  place of the greeting, then closes (Postfix); a connection that closes before sending any byte (a health
  check) is logged at info and gets nothing. XCLIENT from authorized_xclient_hosts (judged on the client as
  it was at the greeting) replaces the client's attributes and starts the session again with a new 220; from
  others 550 5.7.0.
- delay_reject false: a client the client list refuses gets the refusal in place of the greeting (or of XCLIENT's
  220), then `503 5.7.0 Error: access denied for host[ip]` to every command but QUIT (a 421 or 521 refusal
  closes the session); a HELO/EHLO the helo list refuses gets the refusal and changes nothing.
"""
from __future__ import annotations

from mailflow.stages.smtpd.data import DataCommands
from mailflow.stages.smtpd.frontends import FrontEnds
from mailflow.stages.smtpd.protocol import ProtocolLimits

__all__ = ["FrontEnds", "ProtocolLimits", "SmtpSession"]


class SmtpSession(DataCommands):
    """One client connection: every layer of the module doc. Keyword arguments: `sessions` (the server's set
    of live sessions), `protocol` (ProtocolLimits), `hostname`, `ident` (the banner), `data_size_limit`,
    `enable_SMTPUTF8`, `decode_data`, `timeout`, `tls_context`, `require_starttls`, `frontends` (FrontEnds),
    `sasl` (auth.Authenticator), `sender_logins` (auth.SenderLogins), `auth_required`, `auth_require_tls`."""

"""smtpd: the SMTP server. aiosmtpd is the I/O edge; this package holds the protocol discipline and the policy.

What it owns (one module each)
- `server.Smtpd`: the listeners (`smtpd.listen` = MTA role; `[[smtpd.listeners]]` with roles mta, submission,
  submissions and per-listener `overrides` as master.cf -o), started on the running loop, changed by a reload
  as `postfix reload` changes master.cf's services (added, removed, changed on the same socket) and stopped
  gracefully; `ListenerSession` adds admission (anvil) to the session.
- `session.SmtpSession`: the protocol edge, an aiosmtpd `SMTP` subclass built in layers, one module each:
  `protocol` (the connection, replies with enhanced status codes, deadlines, the command loop, pipelining and
  error-count discipline; HELO/EHLO/VRFY), `frontends` (PROXY header, XCLIENT), `secure` (STARTTLS, AUTH,
  sender logins), `transaction` (MAIL, RCPT and their parameters, with `dsn`), `data` (DATA, BDAT). Its input
  goes through `wire` (strict CRLF, chunked DATA and BDAT, size and line limits); its typed state is `state`
  (SessionState per connection, Transaction per message); `mailflow.session_log` counts commands for the
  disconnect line (sendmail -bs's too).
- `handler.SmtpdHandler`: the policy hooks: restriction lists (`restrictions`, `policy`), then the hand-over
  to cleanup, answering 250 only once the message is committed.
- `auth` (scrypt password hashes, failure slow-down, sender logins), `tls` (certificates, reload), `anvil`
  (per-client connection count and rate, the session cap).
See docs/security.md for every limit and restriction with its default and Postfix counterpart.

Failure behaviour: every refusal is an SMTP reply from `mailflow.status`; an error that stops a message is
answered through its one table `status.error_reply` and logged once with the error's reason. A message cleanup
could not commit gets 4xx (5xx when cleanup refused it for good) and is not queued; an unexpected exception in
a hook gets 451 4.3.0 and is logged; the session stays usable. No reply text names a config detail.
"""
from mailflow.stages.smtpd.handler import SmtpdHandler
from mailflow.stages.smtpd.server import Smtpd
from mailflow.stages.smtpd.session import SmtpSession

__all__ = ["Smtpd", "SmtpdHandler", "SmtpSession"]

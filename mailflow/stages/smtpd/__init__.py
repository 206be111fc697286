"""smtpd: the SMTP server. aiosmtpd is the I/O edge; this package holds the policy.

What it owns (one module each)
- `session.SmtpSession`: a thin aiosmtpd `SMTP` subclass that tracks live sessions (for graceful shutdown) and
  gives every reply an enhanced status code (ENHANCEDSTATUSCODES), except the greeting and EHLO/HELO.
- `handler.SmtpdHandler`: the aiosmtpd hooks. MAIL checks sender syntax; RCPT checks syntax, resolves the address
  class (trivial-rewrite), refuses relaying for clients outside `mynetworks` (554 5.7.1), refuses recipients
  that neither a rewriting table (canonical, virtual alias) nor their class's recipient table lists
  (550 5.1.1, naming the table), a table that cannot answer (451 4.3.0) and recipients beyond
  `recipient_limit` (452 4.5.3); DATA hands a `Submission` to cleanup and answers 250 only once cleanup has
  committed it.
- `server.Smtpd`: starts the listeners on the running loop (never aiosmtpd's threaded Controller) and stops them:
  close the listeners, let sessions finish within a grace period, then close what is left.

Failure behaviour: every refusal is an SMTP reply from `mailflow.status`. A message cleanup could not
commit gets 451 and is not queued; an unexpected exception in a hook gets 451 4.3.0 and is logged; the
session stays usable. No reply text names a config detail.
"""
from mailflow.stages.smtpd.handler import SmtpdHandler
from mailflow.stages.smtpd.server import Smtpd
from mailflow.stages.smtpd.session import SmtpSession

__all__ = ["Smtpd", "SmtpdHandler", "SmtpSession"]

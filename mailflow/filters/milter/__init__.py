"""The Milter client (Postfix smtpd_milters / non_smtpd_milters): `protocol` is the sans-IO codec of the MTA
side, `client` the asyncio edge (connections, timeouts, milter_default_action, one session per SMTP session),
`message` the end of a message through them (edits applied to the Submission) and the emulated session of mail
that does not come through smtpd."""
from mailflow.filters.milter.client import (CONTINUE, ClientMacros, Edits, MilterSession, MilterSettings, Verdict)
from mailflow.filters.milter.message import Filtered, NonSmtpdMilters, end_of_message

__all__ = ["CONTINUE", "ClientMacros", "Edits", "Filtered", "MilterSession", "MilterSettings", "NonSmtpdMilters",
           "Verdict", "end_of_message"]

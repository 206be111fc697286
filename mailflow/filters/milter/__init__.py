"""The Milter client (Postfix smtpd_milters / non_smtpd_milters): `protocol` is the sans-IO codec of the MTA
side, `client` the asyncio edge (connections, timeouts, milter_default_action, one session per SMTP session)."""
from mailflow.filters.milter.client import (ClientMacros, Edits, MilterSession, MilterSettings, Verdict)

__all__ = ["ClientMacros", "Edits", "MilterSession", "MilterSettings", "Verdict"]

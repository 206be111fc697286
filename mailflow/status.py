"""One catalogue of the SMTP replies mailflow says, each with its enhanced status code (RFC 3463).

Texts are generic and meant for clients: they name the address and the rule, never a config detail.
Every reply smtpd sends is built here; tests compare against these values.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}" if self.status else f"{self.code} {self.text}"

    @property
    def is_ok(self) -> bool:
        return 200 <= self.code < 400


SENDER_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def relay_denied(address: str) -> Reply:
    return Reply(554, "5.7.1", f"<{address}>: Relay access denied")


def user_unknown(address: str, table: str = "local recipient table") -> Reply:
    """`table`: which list lacks the user ("virtual mailbox table", "relay recipient table", ...)."""
    return Reply(550, "5.1.1", f"<{address}>: Recipient address rejected: User unknown in {table}")


def bad_address_syntax(address: str) -> Reply:
    return Reply(501, "5.1.3", f"<{address}>: Bad recipient address syntax")


def bad_sender_syntax(address: str) -> Reply:
    return Reply(501, "5.1.7", f"<{address}>: Bad sender address syntax")


def lookup_failed(address: str) -> Reply:
    return Reply(451, "4.3.0", f"<{address}>: Temporary lookup failure")


SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Must declare SMTPUTF8 to send UTF-8 addresses")
INTERNAL_ERROR = Reply(451, "4.3.0", "Error: internal error, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
QUEUE_FULL = Reply(451, "4.3.1", "Error: queue file write error, try again later")
QUEUE_ERROR = Reply(451, "4.3.0", "Error: queue file write error")

def refused_message(dsn: str, text: str, permanent: bool) -> Reply:
    """A message cleanup refused (a loop, a policy): 554 when permanent, else 451."""
    return Reply(554 if permanent else 451, dsn, text)


# Enhanced codes for replies whose text the SMTP library writes itself, keyed by the basic code.
# smtpd adds these so that every reply carries one (ENHANCEDSTATUSCODES, RFC 2034).
DEFAULT_ENHANCED = {
    211: "2.0.0", 214: "2.0.0", 220: "2.0.0", 221: "2.0.0", 235: "2.7.0", 250: "2.0.0", 252: "2.5.0",
    421: "4.4.2", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4", 530: "5.7.0", 534: "5.7.9",
    535: "5.7.8", 538: "5.7.11", 550: "5.0.0", 551: "5.1.6", 552: "5.3.4", 553: "5.1.3", 554: "5.0.0",
    555: "5.5.4",
}


def with_enhanced_code(line: str) -> str:
    """Give a library-written reply line (`503 Error: …`) its enhanced status code if it lacks one."""
    if len(line) < 4 or not line[:3].isdigit() or line[3] not in " -":
        return line
    code, sep, rest = line[:3], line[3], line[4:]
    first = rest.split(" ", 1)[0]
    if first.count(".") == 2 and first[0] in "245" and first.replace(".", "").isdigit():
        return line
    enhanced = DEFAULT_ENHANCED.get(int(code))
    if enhanced is None:
        return line
    return f"{code}{sep}{enhanced} {rest}"


def dsn_class(dsn: str) -> int:
    """2, 4 or 5: the class digit of an enhanced status code."""
    return int(dsn[0]) if dsn[:1].isdigit() else 4

"""error: fail every recipient with the status the nexthop names (Postfix error(8)).

`error:5.1.1 User unknown` bounces with 5.1.1 and that text; a 4.X.X status defers instead (Postfix retry(8)
behaviour folded in); a nexthop without a status bounces with 5.0.0. Used by transport_maps entries and by
the virtual alias class for addresses without an alias.
"""
from __future__ import annotations

from mailflow.model import DeliveryReport, DeliveryRequest, Outcome
from mailflow.syntax import split_leading_dsn


def parse_error_nexthop(nexthop: str) -> tuple[Outcome, str, str]:
    """'5.1.1 User unknown' -> (BOUNCED, '5.1.1', 'User unknown'); '4.3.2 later' -> DEFERRED."""
    found, rest = split_leading_dsn(nexthop.strip())
    dsn, rest = found or "5.0.0", rest.strip()
    outcome = Outcome.DEFERRED if dsn.startswith("4") else Outcome.BOUNCED
    if dsn.startswith("2"):  # an error transport never reports success
        dsn = "5.0.0"
    return outcome, dsn, rest or "delivery refused by the error transport"


class ErrorTransport:
    program = "error"  # the Postfix delivery agent whose name its result lines are logged under

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        outcome, dsn, text = parse_error_nexthop(request.nexthop)
        return DeliveryReport.uniform(request.recipients, outcome, dsn, text, relay="none")

    async def close(self) -> None:
        pass

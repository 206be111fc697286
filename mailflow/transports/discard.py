"""discard: report every recipient delivered without sending anything (Postfix discard(8)); logged by qmgr.

The reason logged and given in a success notice is the next hop as it is (`discard:reason`; the recipient's
domain when the transport names none), as discard(8) reports it."""
from __future__ import annotations

from mailflow.model import DeliveryReport, DeliveryRequest, Outcome


class DiscardTransport:
    program = "discard"  # the Postfix delivery agent whose name its result lines are logged under

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        reason = request.nexthop or "discarded"
        return DeliveryReport.uniform(request.recipients, Outcome.SENT, "2.0.0", reason, relay="none")

    async def close(self) -> None:
        pass

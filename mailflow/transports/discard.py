"""discard: report every recipient delivered without sending anything (Postfix discard(8)); logged by qmgr."""
from __future__ import annotations

from mailflow.model import DeliveryReport, DeliveryRequest, Outcome


class DiscardTransport:
    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        reason = f"discarded{': ' + request.nexthop if request.nexthop else ''}"
        return DeliveryReport.uniform(request.recipients, Outcome.SENT, "2.0.0", reason, relay="none")

    async def close(self) -> None:
        pass

"""The error transport (mailflow.transports.error): `parse_error_nexthop` and `ErrorTransport.deliver`.

Covered: a 5.X.X status bounces with that code and text, 4.X.X defers, no status bounces with 5.0.0, a 2.X.X
status never reports success, a status glued to its text is not a status; every recipient of a request gets
the same result.
"""
from __future__ import annotations

import pytest

from mailflow.model import DeliveryRequest, Outcome, RcptResult, Recipient
from mailflow.transports.error import ErrorTransport, parse_error_nexthop

BOUNCED, DEFERRED = Outcome.BOUNCED, Outcome.DEFERRED
DEFAULT_TEXT = "delivery refused by the error transport"


@pytest.mark.parametrize("nexthop, expected", [
    ("5.1.1 User unknown", (BOUNCED, "5.1.1", "User unknown")),
    ("  5.7.1   Not here, sorry  ", (BOUNCED, "5.7.1", "Not here, sorry")),
    ("5.1.1 User unknown in virtual alias table", (BOUNCED, "5.1.1", "User unknown in virtual alias table")),
    ("5.123.456 odd but valid", (BOUNCED, "5.123.456", "odd but valid")),
    ("5.2.2", (BOUNCED, "5.2.2", DEFAULT_TEXT)),
    ("4.3.2 Try again later", (DEFERRED, "4.3.2", "Try again later")),
    ("4.4.1", (DEFERRED, "4.4.1", DEFAULT_TEXT)),
    ("User unknown", (BOUNCED, "5.0.0", "User unknown")),
    ("", (BOUNCED, "5.0.0", DEFAULT_TEXT)),
    ("5.1.1User", (BOUNCED, "5.0.0", "5.1.1User")),        # not a status: no space after it
    ("3.1.1 no such class", (BOUNCED, "5.0.0", "3.1.1 no such class")),
    ("text 4.3.2 later", (BOUNCED, "5.0.0", "text 4.3.2 later")),  # a status only counts at the start
])
def test_parse_error_nexthop(nexthop, expected):
    assert parse_error_nexthop(nexthop) == expected


@pytest.mark.parametrize("nexthop", ["2.0.0 Ok", "2.1.5", "  2.0.0   fine  "])
def test_success_status_never_means_success(nexthop):
    outcome, dsn, _ = parse_error_nexthop(nexthop)
    assert outcome is BOUNCED
    assert dsn == "5.0.0"


def test_success_status_keeps_its_text():
    assert parse_error_nexthop("2.0.0 Ok") == (BOUNCED, "5.0.0", "Ok")


def request(nexthop: str, *rcpts: str) -> DeliveryRequest:
    return DeliveryRequest("Q1", "s@remote.test", tuple(Recipient(i, r, r) for i, r in enumerate(rcpts)), nexthop,
                           b"Subject: x\r\n\r\nbody\r\n")


async def test_deliver_bounces_every_recipient():
    req = request("5.1.1 User unknown", "a@example.test", "b@example.test")
    report = await ErrorTransport().deliver(req)
    assert report.results == tuple(RcptResult(r, BOUNCED, "5.1.1", "User unknown", relay="none")
                                   for r in req.recipients)
    assert report.site_ok


async def test_deliver_defers_for_a_4xx_status():
    req = request("4.3.2 Not now", "a@example.test")
    report = await ErrorTransport().deliver(req)
    assert report.results == (RcptResult(req.recipients[0], DEFERRED, "4.3.2", "Not now", relay="none"),)


async def test_deliver_without_status_bounces_with_5_0_0():
    req = request("", "a@example.test")
    [result] = (await ErrorTransport().deliver(req)).results
    assert (result.outcome, result.dsn, result.text) == (BOUNCED, "5.0.0", DEFAULT_TEXT)


async def test_deliver_never_sends():
    req = request("2.0.0 Ok", "a@example.test", "b@example.test")
    report = await ErrorTransport().deliver(req)
    assert all(r.outcome is BOUNCED and r.dsn == "5.0.0" for r in report.results)
    assert len(report.results) == 2

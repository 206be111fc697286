"""relocated_maps (relocated(5)): trivial-rewrite's last step sends a listed recipient to the error transport with
Postfix's `5.1.6 User has moved to <value>`, whatever its class or transport; smtpd refuses it at RCPT."""
from __future__ import annotations

import pytest

from mailflow.config import config_from_dict
from mailflow.errors import LookupRetry
from mailflow.model import AddressClass
from mailflow.routing.rewrite import Rewriter, error_refusal
from mailflow.routing.router import Router

RELOCATED = ("inline:{ moved@local.test=new@place.test, @oldco.test=newco.test, bob=bob@else.test,"
             " x@relay.test=x@elsewhere.test }")
BASE = {"myhostname": "mx.local.test", "mydestination": ["local.test"], "relay_domains": ["relay.test", "oldco.test"],
        "relocated_maps": [RELOCATED]}


def rewriter(**extra) -> Rewriter:
    return Rewriter(config_from_dict({**BASE, **extra}))


@pytest.mark.parametrize("addr, moved_to", [
    ("moved@local.test", "new@place.test"),          # user@domain
    ("Moved+tag@LOCAL.test", "new@place.test"),      # without the extension, any case
    ("anyone@oldco.test", "newco.test"),             # @domain
    ("bob@local.test", "bob@else.test"),             # a bare user: for a local domain only
    ("x@relay.test", "x@elsewhere.test"),            # any class
])
def test_a_listed_recipient_routes_to_the_error_transport(addr, moved_to):
    res = rewriter().resolve(addr)
    assert (res.transport, res.nexthop) == ("error", f"5.1.6 User has moved to {moved_to}")


@pytest.mark.parametrize("addr", ["bob@relay.test", "alice@local.test", "moved@elsewhere.test"])
def test_an_unlisted_recipient_keeps_its_route(addr):
    assert rewriter().resolve(addr) == rewriter(relocated_maps=[]).resolve(addr)


def test_relocated_comes_after_transport_maps():
    """Postfix looks relocated_maps up last, so a transport_maps entry for the address does not hide it."""
    res = rewriter(transport_maps=["inline:{moved@local.test=smtp:[10.0.0.1]}"]).resolve("moved@local.test")
    assert (res.address_class, res.transport) == (AddressClass.LOCAL, "error")


def test_smtpd_refuses_it_as_postfix_does():
    """Postfix 3.7.11's reply (seen on a private instance): 550 5.1.6 ... Recipient address rejected: ..."""
    reply = error_refusal("moved@local.test", rewriter().resolve("moved@local.test"))
    assert str(reply) == "550 5.1.6 <moved@local.test>: Recipient address rejected: User has moved to new@place.test"


def test_explain_names_the_step():
    assert ("relocated_maps", "5.1.6 User has moved to new@place.test") in rewriter().explain("moved@local.test")
    assert ("relocated_maps", "no match") in rewriter().explain("alice@local.test")


def test_a_table_that_cannot_answer_is_a_retry():
    with pytest.raises(LookupRetry):
        rewriter(relocated_maps=["fail:broken"]).resolve("alice@local.test")


def test_a_bare_user_key_also_serves_myorigin():
    """mail_addr_find tries the local part alone for $myorigin as for a local domain."""
    res = rewriter(myorigin="origin.test").resolve("bob@origin.test")
    assert (res.transport, res.nexthop) == ("error", "5.1.6 User has moved to bob@else.test")
    assert rewriter().resolve("bob@origin.test").transport == "smtp"


@pytest.mark.parametrize("soft_bounce, verdicts", [
    (False, ("550 5.1.6 <moved@local.test>: Recipient address rejected: User has moved to new@place.test",
             "accepted from mynetworks only (others: 554 5.7.1 <x@elsewhere.test>: Relay access denied)")),
    (True, ("450 4.1.6 <moved@local.test>: Recipient address rejected: User has moved to new@place.test",
            "accepted from mynetworks only (others: 454 4.7.1 <x@elsewhere.test>: Relay access denied)")),
])
def test_the_address_tool_shows_the_rcpt_reply_smtpd_sends(soft_bounce, verdicts):
    """`mailflow address` (and sendmail -bv) show smtpd's RCPT reply; under soft_bounce its 4xx, as sent."""
    router = Router(config_from_dict({**BASE, "soft_bounce": soft_bounce}))
    assert (router.recipient_verdict("moved@local.test"), router.recipient_verdict("x@elsewhere.test")) == verdicts

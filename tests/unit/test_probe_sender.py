"""Address verification's probe sender (mailflow.stages.verify.ProbeSender): Postfix's address_verify_sender with
address_verify_sender_ttl (verify_sender_addr.c): the stamp it appends, and which addresses smtpd takes as this
server's own probe sender. (tests/interop/test_verify_vs_postfix.py checks the stamp against Postfix's.)"""
from __future__ import annotations

import pytest

from mailflow.clock import VirtualClock
from mailflow.stages.verify import ProbeSender

DAY = 86400
NOW = 1_700_000_000  # 19675 whole days since the epoch: "NGP" in base 31 written without vowels


def qualify(addr: str) -> str:
    return addr if "@" in addr else f"{addr}@example.com"


def probe_sender(sender: str = "double-bounce", ttl: float = DAY) -> tuple[ProbeSender, VirtualClock]:
    clock = VirtualClock(NOW)
    return ProbeSender(sender, ttl, qualify, clock), clock


def test_the_stamp_is_the_count_of_ttl_periods_in_base_31_appended_to_the_local_part():
    sender, clock = probe_sender()
    assert sender.address() == "double-bounceNGP@example.com"
    clock.advance(DAY)
    assert sender.address() == "double-bounceNGQ@example.com"
    assert probe_sender("probe@verify.example.com")[0].address() == "probeNGP@verify.example.com"


def test_without_a_ttl_or_with_the_null_sender_the_address_is_fixed():
    assert probe_sender(ttl=0)[0].address() == "double-bounce@example.com"
    assert probe_sender("<>")[0].address() == probe_sender("")[0].address() == ""


@pytest.mark.parametrize("addr, own", [
    ("double-bounceNGP@example.com", True),
    ("double-bounceNGN@example.com", True),  # the last period and the next: clocks of a site's MTAs differ
    ("double-bounceNGQ@example.com", True),
    ("Double-BounceNGP@EXAMPLE.com", True),  # any case but the stamp's
    ("double-bounceNGM@example.com", False),  # two periods away
    ("double-bounceNGR@example.com", False),
    ("double-bounce@example.com", False),  # no stamp
    ("double-bounceNgp@example.com", False),
    ("double-bounceNGP@example.org", False),
    ("double-bounceNGP", False),
    ("double-bounceNGP+x@example.com", False),
    ("postmaster@example.com", False),
])
def test_smtpd_takes_the_stamps_of_three_periods_as_its_own_probe_sender_without_the_stamp(addr, own):
    sender, _ = probe_sender()
    assert sender.own(addr) == ("double-bounce@example.com" if own else None)


def test_without_a_ttl_only_the_address_itself_is_its_own_and_the_null_sender_owns_none():
    sender, _ = probe_sender(ttl=0)
    assert sender.own("DOUBLE-BOUNCE@example.com") == "double-bounce@example.com"
    assert sender.own("double-bounceNGP@example.com") is None
    assert probe_sender("<>")[0].own("double-bounce@example.com") is None

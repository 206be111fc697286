"""A DNS list's reply filter (`bl.test=127.0.0.[2..11]`: smtpd's reject_rbl_client and the other DNS list items,
postscreen's dnsbl_sites) against Postfix's ip_match: the cases of its own test (postfix-3.7.11
src/util/ip_match.in, its answers in ip_match.ref) and what the review found taken or refused otherwise."""
from __future__ import annotations

import pytest

from mailflow.dnsbl_sites import filter_matches, parse_dnsbl_site, reply_filter

# ip_match.ref: the patterns Postfix refuses ("Error: …")
REFUSED = ["1.2.300.4", "1.2.3000.4", "1.2.3.", "1.2.3", "a", "1.2.3;4", "1.2.[].4", "1.2.[.4", "1.2.].4",
           "1.2.[1-255].5", "1.2.[1..127.128..255].5", "1.2.3.[4..1]", "1.2.3.[4.1]", "1.2.3.[4.x]", "1.2.3.[x]",
           "1.2.3.4x", "[[1;2].3.4.5", "1;2].3.4.5",
           # and, from ip_match.c: an empty pattern (`D=`), one that is brackets only, digits that are not ASCII
           "", "[]", "127.0.0.\u0661\u0661", "127.0.0.2;3"]
# ip_match.ref: the patterns it takes, and for each the addresses it matches (True) or not (False)
TAKEN = {
    "1.2.3.4": {"1.2.3.4": True, "1.2.3.5": False},
    "1.2.[3].4": {"1.2.3.4": True},
    "1.2.[1..127;128..255].5": {"1.2.1.5": True, "1.2.255.5": True, "1.2.0.5": False},
    "1.2.3.[4]": {"1.2.3.4": True},
    "1.2.[3..11].5": {"1.2.3.5": True, "1.2.2.5": False, "1.2.11.5": True, "1.2.12.5": False, "1.2.11.6": False},
    "1.2.[3;5;7;9;11].5": {"1.2.3.5": True, "1.2.2.5": False, "1.2.4.5": False, "1.2.11.5": True,
                           "1.2.12.5": False, "1.2.11.6": False},
    "[1;2].3.4.5": {"1.3.4.5": True, "2.3.4.5": True, "3.3.4.5": False},
    "[[1;2].3.4.5]": {"1.3.4.5": True, "2.3.4.5": True, "3.3.4.5": False},
    # the review's: brackets around the whole pattern, leading zeros (ip_match's tokenizer reads any digits)
    "[127.0.0.2]": {"127.0.0.2": True, "127.0.0.3": False},
    "127.0.0.0002": {"127.0.0.2": True},
}


@pytest.mark.parametrize("pattern", REFUSED)
def test_a_filter_postfix_s_ip_match_refuses_is_refused(pattern):
    with pytest.raises(ValueError):
        reply_filter(pattern)


@pytest.mark.parametrize("pattern, answers", TAKEN.items())
def test_a_filter_postfix_s_ip_match_takes_matches_what_it_matches(pattern, answers):
    octets = reply_filter(pattern)
    assert {answer: filter_matches(octets, answer) for answer in answers} == answers


def test_postscreen_s_sites_take_the_same_filters():
    assert parse_dnsbl_site("bl.test=[127.0.0.[2..3]]*2").matches("127.0.0.3")
    with pytest.raises(ValueError):
        parse_dnsbl_site("bl.test=127.0.0.2;3")
    with pytest.raises(ValueError):
        parse_dnsbl_site("bl.test*\u0662")

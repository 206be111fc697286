"""Numbers that SMTP replies, DSN codes and DNS-published records write as 1*DIGIT are read as ASCII digits only:
str.isdigit takes `²` (int() then raises) and `١` (int() reads it), int() takes `+1`, `-1` and `1_0`. An HTTP API's
number parameter is read as Go's strconv.Atoi reads it (a sign, ASCII digits, a 64-bit int)."""
from __future__ import annotations

import pytest

from mailflow.signing.dkim import _body_key
from mailflow.stages.smtpd.protocol import _final_code
from mailflow.syntax import ascii_digits, query_integer
from mailflow.transports.smtp.mtasts import parse_policy


@pytest.mark.parametrize("text, digits", [("250", True), ("007", True), ("", False), ("\u00b2", False),
                                          ("\u0661", False), ("+1", False), ("-1", False), ("1_0", False),
                                          (b"42", True), (b"-1", False)])
def test_ascii_digits(text, digits):
    assert ascii_digits(text) is digits


@pytest.mark.parametrize("text, number", [
    ("5", 5), ("+5", 5), ("-5", -5), ("007", 7), ("0", 0), ("-0", 0),
    ("9223372036854775807", 2**63 - 1), ("-9223372036854775808", -2**63),
    ("00000000000000000005", 5), ("-09223372036854775808", -2**63), ("+" + "0" * 5000 + "1", 1),  # (Go's Atoi)
    ("9223372036854775808", None), ("-9223372036854775809", None), ("0" * 30 + "9" * 20, None), ("9" * 5000, None),
    ("", None), ("+", None), ("-", None), ("+-1", None), ("1_0", None), (" 1", None), ("1 ", None),
    ("\u0661", None), ("0x10", None), ("1.0", None)])
def test_a_query_integer_is_read_as_gos_atoi_reads_it(text, number):
    assert query_integer(text) == number


def test_a_final_reply_code_of_other_digits_is_no_code_not_a_crash():
    assert _final_code("250 ok") == 250
    assert _final_code("\u00b2\u00b2\u00b2 x") == 0  # (int() raised ValueError)


@pytest.mark.parametrize("max_age", ["+86400", "1_000", "\u0663\u0666\u0660\u0660", "-1"])
def test_an_mta_sts_max_age_is_1_to_10_ascii_digits(max_age):
    with pytest.raises(ValueError, match="max_age"):
        parse_policy(f"version: STSv1\nmode: enforce\nmx: mx.example\nmax_age: {max_age}\n")


@pytest.mark.parametrize("length", [b"-1", b"1_0", b"+5"])
def test_a_dkim_body_length_is_ascii_digits_or_the_signature_unusable(length):
    assert _body_key({b"c": b"relaxed/relaxed", b"a": b"rsa-sha256", b"l": length}) is None
    assert _body_key({b"c": b"relaxed/relaxed", b"a": b"rsa-sha256", b"l": b"10"}) == (b"relaxed", b"rsa-sha256", 10)

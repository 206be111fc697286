"""The DSN parameters (RFC 3461) as smtpd takes them: what Postfix takes, and no more."""
import pytest

from mailflow.dsn_parameters import (DsnError, envid, is_orcpt_value, notify, orcpt, uxtext_decode, without_success,
                                     xtext_decode)


def test_a_notify_word_given_twice_counts_once_and_empty_items_are_skipped():
    assert notify("success,SUCCESS,failure") == "SUCCESS,FAILURE"
    assert notify("NEVER,never") == notify("NEVER,") == "NEVER"
    assert notify(",delay,,success") == "DELAY,SUCCESS"


def test_an_orcpt_without_an_address_or_with_an_odd_type_is_taken_and_reports_nothing():
    assert orcpt("rfc822;") == orcpt("r\u00e9;x@y.test") == ""
    assert orcpt("rfc822;a+2Bb@x.test") == orcpt("rfc822;a+2bb@x.test") == "rfc822;a+b@x.test"
    assert orcpt("utf-8;j\\x{F6}e@x.test") == "utf-8;j\u00f6e@x.test"


def test_an_orcpt_type_is_kept_as_the_client_wrote_it():
    """As Postfix's smtpd keeps it (the next hop and the notice get `RFC822;...`); utf-8 decodes uxtext in any case."""
    assert orcpt("RFC822;a+2Bb@x.test") == "RFC822;a+b@x.test"
    assert orcpt("UTF-8;j\\x{F6}e@x.test") == "UTF-8;j\u00f6e@x.test"
    assert is_orcpt_value("RFC822;a@x.test") and is_orcpt_value("Utf-8;j\u00f6e@x.test")


def test_xtext_as_postfix_reads_it():
    """Either case of hex, any other character as itself, the value ending at a NUL (Postfix's C string)."""
    assert xtext_decode("a+2bb=c") == "a+b=c"
    assert xtext_decode("a+00b") == "a"
    assert uxtext_decode("a+40\\x{}b") == "a+40"


def test_an_envid_is_printable_ascii_once_decoded():
    assert envid("a+00b") == "a"
    assert envid("x" * 500) == "x" * 500  # no length bound in Postfix either


@pytest.mark.parametrize("check, value", [
    (notify, ""), (notify, ","), (notify, "NEVER,SUCCESS"), (notify, "SOMETIMES"),
    (orcpt, "a@x.test"), (orcpt, ";a@x.test"), (orcpt, "rfc822;a+4"), (orcpt, "utf-8;a\\x{zz}"),
    (orcpt, "utf-8;a\\x{110000}"), (orcpt, "utf-8;a\\x{E9"),
    (envid, ""), (envid, "+00"), (envid, "a+09b"), (envid, "caf+C3+A9"), (envid, "\u00e9"), (envid, "a+zz"),
])
def test_malformed_values_are_refused(check, value):
    with pytest.raises(DsnError):
        check(value)


def test_an_expanded_recipients_notify_goes_on_without_success():
    """local(8) (alias.c, forward.c): the addresses an alias expands to get NOTIFY without SUCCESS, NEVER when
    nothing is left; none given stays none."""
    assert [without_success(v) for v in ("", "NEVER", "SUCCESS", "SUCCESS,FAILURE", "DELAY,FAILURE")] == [
        "", "NEVER", "NEVER", "FAILURE", "DELAY,FAILURE"]

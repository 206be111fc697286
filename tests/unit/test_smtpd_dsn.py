"""RCPT's DSN parameters (RFC 3461) as smtpd takes them: what Postfix takes, and no more."""
import pytest

from mailflow.stages.smtpd.dsn import DsnError, rcpt_params


def test_a_notify_word_given_twice_counts_once():
    assert rcpt_params({"NOTIFY": "success,SUCCESS,failure"}) == ("SUCCESS,FAILURE", "")
    assert rcpt_params({"NOTIFY": "NEVER,never"}) == ("NEVER", "")


def test_an_orcpt_without_an_address_is_taken_and_reports_nothing():
    assert rcpt_params({"ORCPT": "rfc822;"}) == ("", "")
    assert rcpt_params({"ORCPT": "RFC822;a+2Bb@x.test"}) == ("", "rfc822;a+b@x.test")


@pytest.mark.parametrize("found", [{"NOTIFY": ""}, {"NOTIFY": "NEVER,SUCCESS"}, {"NOTIFY": "SOMETIMES"},
                                   {"ORCPT": "a@x.test"}, {"ORCPT": ";a@x.test"}, {"ORCPT": "rfc822;a+4"}])
def test_malformed_parameters_are_refused(found):
    with pytest.raises(DsnError):
        rcpt_params(found)

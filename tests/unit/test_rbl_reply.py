"""The DNS lists' reply templates and TXT reasons (mailflow.rbl_reply), and the configuration's check of
default_rbl_reply. What Postfix 3.7 makes of them over SMTP is tests/interop/test_rbl_replies_vs_postfix.py's."""
from __future__ import annotations

import pytest

from mailflow.config import config_from_dict
from mailflow.errors import ConfigError
from mailflow.rbl_reply import DEFAULT_RBL_REPLY, TXT_LIMIT, check_rbl_template, rbl_reply_parts, txt_reason

VALUES = {"rbl_code": "554", "rbl_class": "Client host", "rbl_what": "192.0.2.1", "rbl_domain": "zen.example",
          "rbl_reason": "", "client_name": "unknown"}


def test_the_default_reply_names_the_reason_only_when_the_list_gave_one():
    assert rbl_reply_parts(DEFAULT_RBL_REPLY, VALUES) == (
        554, "4.7.1", "Service unavailable; Client host [192.0.2.1] blocked using zen.example")
    assert rbl_reply_parts(DEFAULT_RBL_REPLY, {**VALUES, "rbl_reason": "see https://zen.example"})[2].endswith(
        "blocked using zen.example; see https://zen.example")


def test_a_reason_is_every_record_joined_non_printable_bytes_as_spaces_and_500_characters_at_most():
    assert txt_reason(["one", "two"]) == "one / two"
    assert txt_reason(["caf\u00e9\tbar"]) == "caf   bar"  # (two bytes, two spaces; a tab too)
    assert len(txt_reason(["x" * 300, "y" * 300])) == TXT_LIMIT
    assert txt_reason(["x" * 497, "y"]) == "x" * 497 + "y"  # (no room for " / ": the next record follows at once)
    assert txt_reason([]) == ""


def test_an_enhanced_code_is_the_templates_or_4_7_1_and_an_empty_text_is_service_unavailable():
    assert rbl_reply_parts("451 5.7.9 go away", VALUES) == (451, "5.7.9", "go away")
    assert rbl_reply_parts("550   text", VALUES) == (550, "4.7.1", "text")
    assert rbl_reply_parts("550 ", VALUES) == (550, "4.7.1", "Service unavailable")
    assert rbl_reply_parts("250 fine", VALUES) is None
    assert rbl_reply_parts("$rbl_class", VALUES) is None


def test_a_value_s_characters_outside_the_expansion_filter_become_underscores():
    assert rbl_reply_parts("554 $client_name", {**VALUES, "client_name": "a\x01b\u00e9"})[2] == "a_b_"


def test_a_default_rbl_reply_with_an_unknown_macro_is_a_configuration_error():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"smtpd": {"default_rbl_reply": "$rbl_code blocked by $rbl_list"}}, "mailflow.toml")
    assert info.value.key == "smtpd.default_rbl_reply" and "unknown macro $rbl_list" in info.value.reason
    with pytest.raises(ValueError):
        rbl_reply_parts("554 ${rbl_reason", VALUES)


def test_postfix_3_forms_choose_a_text_as_postfix_3_7s_mac_expand():
    # (Postfix 2's form took the braces as text: `x {has}:{none}`; tests/interop/test_rbl_replies_vs_postfix.py
    # compares these forms with a real Postfix)
    template = "$rbl_code x ${rbl_reason?{has}:{none}} ${{$rbl_reason} == {r}?{eq}:{ne}}"
    assert rbl_reply_parts(template, {**VALUES, "rbl_reason": "r"}) == (554, "4.7.1", "x has eq")
    assert rbl_reply_parts(template, VALUES) == (554, "4.7.1", "x none ne")
    config_from_dict({"smtpd": {"default_rbl_reply": template}})
    with pytest.raises(ConfigError):
        config_from_dict({"smtpd": {"default_rbl_reply": "$rbl_code ${rbl_reason?{x}:{$rbl_list}}"}})


def test_a_template_that_is_not_ascii_is_refused_as_a_footer_is():
    # (a reply is ASCII, RFC 5321 4.2: Postfix would send the bytes as they are to a client that did not ask for
    # SMTPUTF8)
    with pytest.raises(ConfigError) as info:
        config_from_dict({"smtpd": {"default_rbl_reply": "$rbl_code Rejet\u00e9: $rbl_reason"}})
    assert info.value.key == "smtpd.default_rbl_reply" and "not ASCII" in info.value.reason
    with pytest.raises(ValueError, match="not ASCII"):
        check_rbl_template("554 Rejet\u00e9")


@pytest.mark.parametrize("template", ["554 a\r\n250 b", "554 a\nb", "554 bell\x07", "554 del\x7f"])
def test_a_template_with_a_control_character_is_refused(template):
    with pytest.raises(ValueError, match="control character"):
        check_rbl_template(template)
    assert check_rbl_template("554 a\tb") == "554 a\tb"  # (a tab is text, as in a footer)

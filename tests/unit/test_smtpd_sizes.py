"""Sizes a client declares (RFC 1870 `SIZE=`, RFC 3030 `BDAT`), read as Postfix reads them: any run of ASCII
digits, leading zeros included, up to what an off_t holds; past it, an overflow rather than a syntax error."""
import pytest

from mailflow import status
from mailflow.stages.smtpd.data import bdat_arguments
from mailflow.smtp_parameters import mail_parameters
from mailflow.syntax import OFF_T_MAX, command_words, next_command_word, parse_octet_count


@pytest.mark.parametrize("text, value", [("0", 0), ("000", 0), ("0000000000000000000000004", 4),
                                         (str(OFF_T_MAX), OFF_T_MAX), ("0" + str(OFF_T_MAX), OFF_T_MAX),
                                         (str(OFF_T_MAX + 1), None), ("9" * 40, None), ("1" + "0" * 5000, None)])
def test_an_octet_count_is_its_value_or_none_past_off_t_max(text, value):
    assert parse_octet_count(text) == value


@pytest.mark.parametrize("text", ["", "-1", "+4", "1e3", "١٢", "4 ", "0x10"])
def test_an_octet_count_that_is_not_ascii_digits_is_a_value_error(text):
    with pytest.raises(ValueError):
        parse_octet_count(text)


def test_bdat_takes_leading_zeros_and_refuses_an_overflow_as_malformed():
    assert bdat_arguments("0000000000004 LAST") == (4, True)
    assert bdat_arguments("1000000000000") == (10**12, False)
    assert bdat_arguments("99999999999999999999 LAST") is None
    assert bdat_arguments("4 last") == (4, True) and bdat_arguments("4 MORE") is None


def test_mail_size_past_off_t_max_is_postfixs_file_system_limit_not_a_syntax_error():
    assert mail_parameters(["SIZE=0000000000000000000000100"], 10240) == (["SIZE=100"], "", "", None)
    assert mail_parameters(["SIZE=99999999999999999999999"], 0) == status.SIZE_OVERFLOW
    assert mail_parameters(["SIZE=99999999999999999999999"], 10240) == status.SIZE_OVERFLOW
    assert mail_parameters(["SIZE=10241"], 10240) == status.SIZE_EXCEEDS_LIMIT
    assert mail_parameters(["SIZE=1e3"], 10240) == status.BAD_SIZE_SYNTAX


def test_bdat_words_are_split_at_ascii_white_space_only():
    """As Postfix's smtpd_token (ISSPACE): `4\\x1cLAST` is one malformed word (Postfix: 521), never a last chunk."""
    for sep in " \t\v\f":
        assert bdat_arguments(f"4{sep}LAST") == (4, True)
    for sep in "\x1c\x1d\x1e\x1f\u0085\u00a0\u2000\u2003\u200a\u3000":
        assert bdat_arguments(f"4{sep}LAST") is None, repr(sep)


def test_command_words_split_at_the_six_ascii_white_space_characters_only():
    assert command_words(" a\tb\nc\vd\fe\rf  ") == ["a", "b", "c", "d", "e", "f"]
    assert command_words("a\x1cb\u00a0c\u2003d") == ["a\x1cb\u00a0c\u2003d"]
    assert command_words(None) == [] and command_words(" \t") == []


def test_command_words_keep_a_quoted_bracketed_or_escaped_span_whole_as_postfixs_smtpd_token():
    assert command_words(' ENVID="a b" RET=HDRS') == ['ENVID="a b"', "RET=HDRS"]
    assert command_words("ENVID=<a b> X") == ["ENVID=<a b>", "X"]
    assert command_words("ENVID=a\\ b x\\") == ["ENVID=a\\ b", "x\\"]
    assert command_words('<a "b> c" d> e') == ['<a "b> c" d>', "e"]  # a quote opens inside brackets
    assert command_words('"a <b" c> d') == ['"a <b"', "c>", "d"]  # a bracket does not open inside quotes
    assert command_words('x"unclosed y') == ['x"unclosed y']


def test_command_words_fast_path_agrees_with_the_tokenizer_on_every_character():
    for code in list(range(0x80)) + [0x85, 0xA0, 0x2003, 0x3000]:
        text = f" a{chr(code)}b  c{chr(code)} "
        slow, start = [], 0
        while (word := next_command_word(text, start))[0]:
            slow.append(word[0])
            start = word[1]
        assert command_words(text) == slow, repr(text)

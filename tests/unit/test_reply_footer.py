"""mailflow.reply_footer's expansion filter: a character list as Postfix's unescape() reads it, and what a macro's
value keeps of it."""
from __future__ import annotations

from mailflow.reply_footer import expansion_filtered, footer_lines, unescaped


def test_a_filter_is_read_as_postfix_unescape_reads_it():
    assert unescaped(r"\t\40ab") == "\t ab"
    assert unescaped(r"\\\"x") == '\\"x'  # (an escaped backslash, an escaped quote)
    assert unescaped(r"\1010") == "A0"  # (at most three octal digits)
    assert unescaped(r"\a\b\f\n\r\v") == "\a\b\f\n\r\v"
    assert unescaped("x\\") == "x"  # (a backslash at the end: nothing, as Postfix stops there)


def test_a_values_characters_outside_the_filter_become_underscores():
    assert expansion_filtered({"client_address": "192.0.2.1"}, "0123456789") == {"client_address": "192_0_2_1"}
    assert expansion_filtered({"x": "a\x01b"}) == {"x": "a_b"}  # (the default: a tab and printable ASCII)
    assert footer_lines("at $server_name", {"server_name": "mx.example"}, allowed="mx.") == (False, ["at mx._x_m___"])

"""expand_macros' `missing` callback (mailflow.local_macros): told of each name without a value as mac_expand looks
it up, as postscreen's psc_expand_lookup warns per lookup: both sides of a relation, then only the text chosen; a
name's `?`/`:` text only when chosen; a value never expanded again. The postscreen differential
(tests/interop/test_postscreen_vs_postfix.py) checks the same against Postfix's warnings."""
from __future__ import annotations

import pytest

from mailflow.local_macros import MAX_NESTING, check_macros, expand_macros


@pytest.mark.parametrize("template, values, expanded, missing", [
    ("${{$a} == {$b}?{$c}:{$d}}", {}, "", ["a", "b", "c"]),
    ("${{$a} != {$b}?{$c}:{$d}}", {"a": "1"}, "", ["b", "c"]),
    ("${{$a} != {$b}?{$c}:{$d}}", {"a": "1", "c": "x"}, "x", ["b"]),
    ("${{$a} < {$b}?{$c}:{$d}}", {"a": "2", "b": "10"}, "", ["c"]),
    ("${{$a}=={}}", {}, "true", ["a"]),
    ("${a?{$b}:{$c}}", {}, "", ["a", "c"]),
    ("${a?{$b}:{$c}}", {"a": "1"}, "", ["b"]),
    ("${a:$b}", {}, "", ["a", "b"]),
    ("$a$a", {}, "", ["a", "a"]),
    ("${a?$b}", {"a": "$c", "b": "${d}"}, "${d}", []),
])
def test_missing_is_told_of_each_lookup_of_a_name_without_a_value(template, values, expanded, missing):
    seen: list[str] = []
    assert expand_macros(template, values, missing=seen.append) == expanded
    assert seen == missing


@pytest.mark.parametrize("nested", [
    lambda depth: "${a?{" * depth + "x" + "}}" * depth,
    lambda depth: "${a?" * depth + "x" + "}" * depth,
    lambda depth: "${{" * depth + "x" + "} == {x}}" * depth,
])
def test_texts_nest_at_most_mac_expands_depth_then_a_value_error(nested):
    """mac_expand's "unreasonable macro call nesting" past 100 levels: a ValueError (a configuration error), where
    the recursion would otherwise raise RecursionError (a traceback from check-config, a crash at start)."""
    check_macros(nested(MAX_NESTING), ("a",))  # (at the limit: taken)
    assert expand_macros(nested(MAX_NESTING), {"a": "1"}) in ("x", "true", "")
    for depth in (MAX_NESTING + 1, 5000):
        with pytest.raises(ValueError, match="unreasonable macro call nesting"):
            check_macros(nested(depth), ("a",))
        with pytest.raises(ValueError, match="unreasonable macro call nesting"):
            expand_macros(nested(depth), {"a": "1"})

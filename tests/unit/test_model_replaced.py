"""model.replaced: dataclasses.replace's answer for the model's frozen values (the fast path every message takes)."""
import dataclasses

import pytest

from mailflow.content import Content
from mailflow.model import ConnStats, NewMessage, Outcome, RcptResult, Recipient, replaced


def _result() -> RcptResult:
    return RcptResult(Recipient(0, "a@example.com", "A@example.com", "SUCCESS", "rfc822;a@example.com"),
                      Outcome.SENT, "2.0.0", "250 2.0.0 Ok", "sink[127.0.0.1]:25", transport="smtp",
                      expanded="b@example.com")


def test_replaced_is_what_dataclasses_replace_makes():
    result = _result()
    for changes in ({}, {"conn": ConnStats(1.5, 2)}, {"transport": "relay", "stats": None},
                    {"recipient": Recipient(1, "c@example.com", "c@example.com")}):
        made = replaced(result, **changes)
        assert made == dataclasses.replace(result, **changes) and type(made) is RcptResult
        assert dataclasses.asdict(made) == dataclasses.asdict(dataclasses.replace(result, **changes))
    assert result == _result()  # the original is unchanged
    message = NewMessage("QID1", "s@example.com", 1.0, Content.of(b"x"), (result.recipient,))
    active = replaced(message, queue="active")
    assert active.queue == "active" and active.content is message.content
    assert dataclasses.replace(active, queue="incoming") == replaced(active, queue="incoming")


def test_replaced_refuses_a_name_that_is_no_field():
    with pytest.raises(TypeError):
        replaced(_result(), no_such_field=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        replaced(_result()).dsn = "5.0.0"  # type: ignore[misc]


def test_the_values_replaced_is_used_with_keep_the_shape_it_relies_on():
    """replaced() copies the instance's __dict__ into __init__: each class it serves must keep every field an
    __init__ argument and nothing else in its __dict__ (no slots, no cached_property, no init=False field)."""
    result = _result()
    message = NewMessage("QID1", "s@example.com", 1.0, Content.of(b"x"), (result.recipient,))
    for value in (result, message):
        fields = dataclasses.fields(value)
        assert all(f.init for f in fields), type(value)
        assert set(vars(value)) == {f.name for f in fields}, type(value)

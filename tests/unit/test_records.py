"""mailflow.records.record: a frozen dataclass whose __init__ writes the instance's dict, in every other way the
dataclass(frozen=True) of the same class: the same arguments, defaults, factories, kw_only fields, init=False
fields, __post_init__, equality, hash, repr, frozenness, replace; InitVar refused."""
from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass, field

import pytest

from mailflow.records import record


def both(body: dict) -> tuple[type, type]:
    """The same class body made a record and a dataclass(frozen=True)."""
    return record(type("Rec", (), dict(body))), dataclass(frozen=True)(type("Rec", (), dict(body)))


BODY = {
    "__annotations__": {"a": "int", "b": "str", "tags": "list", "c": "int", "seen": "int", "notes": "list"},
    "b": "x",
    "tags": field(default_factory=list, hash=False),
    "c": field(default=7, kw_only=True),
    "seen": field(default=0, init=False),
    "notes": field(default_factory=list, init=False, repr=False, compare=False),
}


@pytest.mark.parametrize("args, kwargs", [
    ((1,), {}), ((1, "y"), {}), ((1, "y", ["t"]), {}), ((1,), {"c": 3}), ((), {"a": 2, "b": "z", "tags": [1]}),
])
def test_a_record_is_built_as_its_frozen_dataclass_is(args, kwargs):
    rec, frozen = both(BODY)
    made, expected = rec(*args, **kwargs), frozen(*args, **kwargs)
    assert dataclasses.asdict(made) == dataclasses.asdict(expected)
    assert repr(made) == repr(expected)
    assert made == rec(*args, **kwargs) and hash(made) == hash(rec(*args, **kwargs))
    assert made.__dict__ == expected.__dict__


@pytest.mark.parametrize("args, kwargs", [
    ((), {}), ((1, "y", [], 3), {}), ((1,), {"d": 1}), ((1,), {"seen": 1}), ((1,), {"a": 1}),
])
def test_a_record_refuses_the_arguments_its_frozen_dataclass_refuses(args, kwargs):
    rec, frozen = both(BODY)
    with pytest.raises(TypeError):
        frozen(*args, **kwargs)
    with pytest.raises(TypeError):
        rec(*args, **kwargs)


def test_a_record_is_frozen_its_factories_make_one_value_each_and_replace_works():
    rec, _ = both(BODY)
    one, two = rec(1), rec(1)
    assert one.tags is not two.tags and one.notes is not two.notes
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.a = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        del one.b
    changed = dataclasses.replace(one, b="q", c=9)
    assert (changed.a, changed.b, changed.c, one.b) == (1, "q", 9, "x")


def test_post_init_runs_after_the_fields_and_initvar_is_refused():
    @record
    class Derived:
        host: str
        port: int = 25
        where: str = field(default="", init=False)

        def __post_init__(self):
            object.__setattr__(self, "where", f"{self.host}:{self.port}")

    assert Derived("mx.test").where == "mx.test:25"
    with pytest.raises(TypeError, match="InitVar"):
        @record
        class WithInitVar:
            x: int
            y: InitVar[int] = 0

            def __post_init__(self, y):
                pass


def test_a_class_that_writes_its_own_init_keeps_it():
    @record
    class Own:
        x: int

        def __init__(self, text: str):
            object.__setattr__(self, "x", int(text))

    assert Own("5").x == 5

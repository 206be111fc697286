"""mailflow.records.record: a frozen dataclass whose __init__ writes the instance's dict, in every other way the
dataclass(frozen=True) of the same class: the same arguments, defaults, factories, kw_only fields, init=False
fields, InitVars and __post_init__, equality, hash, repr, frozenness, replace, and the same inspect.signature (for
every class mailflow makes a record too); fields named as the generated code's names built as a dataclass builds
them; the forms a dict write would build otherwise (slots, data descriptors, an own __getattribute__ or __dict__, a
field named with the generated code's prefix) refused at definition, naming the class and field."""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import pathlib
import sys
from dataclasses import InitVar, dataclass, field

import pytest

import mailflow
import mailflow.records
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


def test_post_init_runs_after_the_fields():
    @record
    class Derived:
        host: str
        port: int = 25
        where: str = field(default="", init=False)

        def __post_init__(self):
            object.__setattr__(self, "where", f"{self.host}:{self.port}")

    assert Derived("mx.test").where == "mx.test:25"


def test_a_class_that_writes_its_own_init_keeps_it():
    @record
    class Own:
        x: int

        def __init__(self, text: str):
            object.__setattr__(self, "x", int(text))

    assert Own("5").x == 5


def _keep_initvars(self, *given):
    object.__setattr__(self, "given", given)


INITVARS = {
    "__annotations__": {"a": "int", "first": InitVar[int], "b": "str", "given": "tuple", "late": InitVar[str],
                        "k": "int"},
    "first": 1,
    "b": "x",
    "given": field(default=(), init=False),
    "late": field(default="l", kw_only=True),
    "k": field(default_factory=lambda: 5, kw_only=True),
    "__post_init__": _keep_initvars,
}


@pytest.mark.parametrize("args, kwargs", [((0,), {}), ((0, 2, "y"), {"late": "z", "k": 1}), ((), {"a": 3, "first": 4})])
def test_initvars_are_parameters_and_reach_post_init_in_their_order_as_a_dataclass_gives_them(args, kwargs):
    rec, frozen = both(INITVARS)
    made, expected = rec(*args, **kwargs), frozen(*args, **kwargs)
    assert made.__dict__ == expected.__dict__ and made.given == expected.given
    assert made.__dict__.keys() == {"a", "b", "given", "k"}
    with pytest.raises(TypeError):
        rec()
    assert dataclasses.replace(made, first=9).given[0] == 9


def test_initvars_given_to_a_class_without_post_init_are_dropped_as_a_dataclass_drops_them():
    body = {"__annotations__": {"a": "int", "extra": InitVar[int]}, "extra": 0}
    rec, frozen = both(body)
    assert rec(1, 2).__dict__ == frozen(1, 2).__dict__ == {"a": 1}


@pytest.mark.parametrize("name", ["self", "_d", "_FACTORY", "MISSING", "_default_a", "_factory_b",
                                  "__dataclass_self__"])
def test_a_field_named_as_a_name_of_the_generated_code_is_built_as_a_dataclass_builds_it(name):
    body = {"__annotations__": {"a": "int", name: "int", "b": "list"}, "b": field(default_factory=list)}
    rec, frozen = both(body)
    made, expected = rec(1, 2), frozen(1, 2)
    assert made.__dict__ == expected.__dict__ == {"a": 1, name: 2, "b": []}
    assert made == rec(1, 2) and repr(made) == repr(expected)
    assert inspect.signature(rec.__init__) == inspect.signature(frozen.__init__)
    assert rec(**{"a": 1, name: 2, "b": [3]}).b == [3]


def test_a_field_named_with_the_generated_code_s_prefix_is_refused_at_definition():
    with pytest.raises(TypeError, match=r"record Rec: field '__record_d'"):
        record(type("Rec", (), {"__annotations__": {"__record_d": "int"}}))


class _Checked:
    """A descriptor-typed field as the dataclasses docs show one: its __set__ keeps a changed value."""

    def __set_name__(self, owner, name):
        self._name = "_" + name

    def __get__(self, obj, owner):
        return 100 if obj is None else getattr(obj, self._name)

    def __set__(self, obj, value):
        object.__setattr__(obj, self._name, int(value) * 3)


class _SlottedBase:
    __slots__ = ("x",)


class _OwnGetattribute:
    def __getattribute__(self, name):
        return object.__getattribute__(self, name)


def _descriptor_field():
    class Rec:
        x: int = _Checked()  # type: ignore[assignment]

    return Rec


def _slots_in_the_body():
    class Rec:
        __slots__ = ("x",)
        x: int

    return Rec


def _slot_of_a_base():
    class Rec(_SlottedBase):
        x: int

    return Rec


def _property_field():
    class Rec:
        x: int
        x = property(lambda self: 1, lambda self, value: None)  # type: ignore[assignment]  # noqa: F811

    return Rec


def _own_getattribute():
    class Rec(_OwnGetattribute):
        x: int

    return Rec


def _own_dict_attribute():
    class Rec:
        x: int
        __dict__ = {}  # type: ignore[assignment]

    return Rec


@pytest.mark.parametrize("make, refusal", [
    (_descriptor_field, r"record .*Rec: field 'x': .*data descriptor \(_Checked\)"),
    (_slots_in_the_body, r"record .*Rec: __slots__"),
    (_slot_of_a_base, r"record .*Rec: field 'x': .*data descriptor \(member_descriptor\)"),
    (_property_field, r"record .*Rec: field 'x': .*data descriptor \(property\)"),
    (_own_getattribute, r"record .*Rec: a __getattribute__"),
    (_own_dict_attribute, r"record .*Rec: a __dict__"),
])
def test_a_form_whose_instances_a_dict_write_would_build_otherwise_is_refused_at_definition(make, refusal):
    with pytest.raises(TypeError, match=refusal):
        record(make())


def test_the_descriptor_field_refused_is_one_a_dataclass_builds_through_its_set():
    assert dataclass(frozen=True)(_descriptor_field())(10).x == 30  # (a dict write would leave 10 unseen: 100)


def test_a_non_data_descriptor_default_is_built_as_a_dataclass_builds_it():
    body = {"__annotations__": {"f": "object"}, "f": staticmethod(len)}
    rec, frozen = both(body)
    assert rec().__dict__ == frozen().__dict__ and rec(1).f == 1


def _records_of(module):
    return {name: value for name, value in vars(module).items() if isinstance(value, type)
            and value.__module__ == module.__name__ and dataclasses.is_dataclass(value)
            and vars(value).get("__init__") is not None
            and vars(value)["__init__"].__code__.co_filename.startswith("<record ")}


RECORD_MODULES = sorted(str(path.relative_to(pathlib.Path(mailflow.__file__).parent.parent))
                        for path in pathlib.Path(mailflow.__file__).parent.rglob("*.py")
                        if "\n@record\n" in path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", RECORD_MODULES)
def test_every_record_mailflow_makes_has_the_init_signature_of_its_frozen_dataclass(path, monkeypatch):
    """The module run again with record as dataclass(frozen=True): its classes are the records' dataclass twins."""
    real = sys.modules[path.removesuffix(".py").replace("/", ".")]
    twin_name = f"{real.__name__}_as_dataclasses"
    spec = importlib.util.spec_from_file_location(twin_name, real.__file__)
    twin = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, twin_name, twin)
    monkeypatch.setattr(mailflow.records, "record", dataclass(frozen=True))
    spec.loader.exec_module(twin)
    records = _records_of(real)
    assert records, path
    for name, cls in records.items():
        dataclass_twin = getattr(twin, name)
        for made, twin_made in ((cls.__init__, dataclass_twin.__init__), (cls, dataclass_twin)):
            assert _own_defaults_named(inspect.signature(made), real) == \
                _own_defaults_named(inspect.signature(twin_made), twin), name
        assert cls.__init__.__annotations__ == dataclass_twin.__init__.__annotations__, name


def _own_defaults_named(signature, module):
    """The signature with each default that is an instance of the module's own classes (the twin's are others)
    replaced by its class's name and repr; the other defaults (dataclasses' "<factory>" among them) kept as they are."""
    return signature.replace(parameters=[
        parameter.replace(default=("instance", type(parameter.default).__qualname__, repr(parameter.default)))
        if type(parameter.default).__module__ == module.__name__ else parameter
        for parameter in signature.parameters.values()])


def test_the_body_s_records_have_their_dataclass_s_signature():
    for body in (BODY, INITVARS):
        rec, frozen = both(body)
        assert inspect.signature(rec.__init__) == inspect.signature(frozen.__init__)

"""`record`: a frozen dataclass whose `__init__` stores its fields straight into the instance's dict.

    @record                    what @dataclass(frozen=True) makes (no other options: none is needed here)
    class Thing: ...

Why: the `__init__` that `dataclasses` writes for a frozen class sets each field through `object.__setattr__` (its
instances refuse plain assignment), a call through a C wrapper per field. The messages' records (model.NewMessage,
RcptResult, ... and the SMTP replies) are built about 200 fields' worth a message on the event loop: writing the
instance's `__dict__` instead (what `object.__setattr__` does for these classes) saved 4-6 % of its instructions at
one session (docs/performance.md, twentieth pass).

Contract: everything but the speed of `__init__` is the dataclass's own: frozen (assignment and deletion raise
FrozenInstanceError), eq, hash, repr, match_args, `dataclasses.fields`/`replace`/`asdict`. `__init__` has the
signature of the dataclass's (`inspect.signature` is equal: the same parameters, kinds, defaults and annotations; it
is built from that one), fills defaults and default factories (a factory called per instance), sets the
`init=False` fields that have a default factory (one with a plain default reads the class's attribute, as a
dataclass's does), in the fields' order, then calls `__post_init__` if the class has one, with the InitVar
pseudo-fields' values in their order (InitVars given to a class without one are dropped, as a dataclass drops
them). A class that writes its own `__init__` keeps it, and is then the dataclass alone.

Refused when the class is defined (TypeError naming the class, and the field if one is the cause), the forms whose
instances a write to `__dict__` would build otherwise than `object.__setattr__` does:
- `__slots__` in the class body (its fields may have no `__dict__` to go in);
- a field the `__init__` sets whose class attribute is a data descriptor (a slot of a base class, a property, a
  descriptor-typed field as the dataclasses docs show one): `object.__setattr__` calls its `__set__`;
- a `__getattribute__` other than object's (an exception's too), or a `__dict__` attribute that is not the
  instances' dict;
- a field whose name starts with `__record_`, the prefix of the generated code's own names (only `type()` or
  `make_dataclass` can make one: a class body mangles it). Fields named as anything else (`self`, `_d`, ...) are
  built as a dataclass builds them; the instance's parameter is named as the dataclass's (`self`, or
  `__dataclass_self__` when a field is `self`).
"""
from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any, Callable, TypeVar, dataclass_transform

T = TypeVar("T")

_OWN = "__record_"  # the prefix of every name the generated __init__ uses but the instance's and the fields'


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, dataclasses.Field))
def record(cls: type[T], /) -> type[T]:
    """See the module docstring."""
    own_init = "__init__" in cls.__dict__  # (a class that writes its own keeps it, as dataclass leaves it)
    made = dataclasses.dataclass(frozen=True)(cls)
    if not own_init:
        setattr(made, "__init__", _direct_init(made))
    return made


def _direct_init(cls: type) -> Callable[..., None]:
    """An __init__ with the signature of `cls.__init__` (the dataclass's) that writes the instance's dict."""
    _refuse_an_instance_dict_that_is_not_plain(cls)
    dataclass_init: Any = vars(cls)["__init__"]
    signature = inspect.signature(dataclass_init)
    self_name, *parameters = signature.parameters.values()
    written = [f for f in dataclasses.fields(cls) if f.init or f.default_factory is not dataclasses.MISSING]
    for name in [p.name for p in parameters] + [f.name for f in written]:
        if name.startswith(_OWN):
            raise TypeError(f"record {cls.__qualname__}: field {name!r}: the names starting {_OWN!r} are the "
                            "generated __init__'s own")
    namespace: dict[str, Any] = {}
    body = [f"    {_OWN}d = {self_name.name}.__dict__"]
    for index, f in enumerate(written):
        _refuse_a_data_descriptor(cls, f.name)
        if f.default_factory is dataclasses.MISSING:
            body.append(f"    {_OWN}d[{f.name!r}] = {f.name}")
            continue
        namespace[f"{_OWN}factory_{index}"] = f.default_factory
        if not f.init:
            body.append(f"    {_OWN}d[{f.name!r}] = {_OWN}factory_{index}()")
            continue
        namespace[f"{_OWN}unset_{index}"] = signature.parameters[f.name].default  # (dataclasses' "<factory>")
        body.append(f"    {_OWN}d[{f.name!r}] = {_OWN}factory_{index}() if {f.name} is {_OWN}unset_{index} "
                    f"else {f.name}")
    if hasattr(cls, "__post_init__"):  # (as dataclasses decides it)
        field_names = {f.name for f in dataclasses.fields(cls)}
        given = {p.name for p in parameters}
        declared = vars(cls)["__dataclass_fields__"]  # (InitVars among them, in the order dataclasses passes them)
        initvars = [name for name in declared if name in given and name not in field_names]
        body.append(f"    {self_name.name}.__post_init__({', '.join(initvars)})")
    source = f"def __init__({_parameter_list(signature)}):\n" + "\n".join(body) + "\n"
    exec(compile(source, f"<record {cls.__module__}.{cls.__qualname__}>", "exec", dont_inherit=True), namespace)
    init = namespace["__init__"]
    init.__defaults__ = dataclass_init.__defaults__
    init.__kwdefaults__ = dataclass_init.__kwdefaults__
    init.__annotations__ = dict(dataclass_init.__annotations__)
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    return init


def _parameter_list(signature: inspect.Signature) -> str:
    """`self, a, b, *, c`: the names and kinds only (the defaults and annotations are set on the function)."""
    names: list[str] = []
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and "*" not in names:
            names.append("*")
        names.append(parameter.name)
    return ", ".join(names)


def _refuse_an_instance_dict_that_is_not_plain(cls: type) -> None:
    if "__slots__" in cls.__dict__:
        raise TypeError(f"record {cls.__qualname__}: __slots__ in the class body is not supported")
    if cls.__getattribute__ is not object.__getattribute__:  # type: ignore[comparison-overlap]
        raise TypeError(f"record {cls.__qualname__}: a __getattribute__ other than object's is not supported")
    if not isinstance(_class_attribute(cls, "__dict__"), types.GetSetDescriptorType):
        raise TypeError(f"record {cls.__qualname__}: a __dict__ attribute that is not the instances' dict")


def _refuse_a_data_descriptor(cls: type, name: str) -> None:
    attribute = _class_attribute(cls, name)
    if any(hasattr(type(attribute), method) for method in ("__set__", "__delete__")):
        raise TypeError(f"record {cls.__qualname__}: field {name!r}: its class attribute is a data descriptor "
                        f"({type(attribute).__name__}), whose __set__ a dataclass's __init__ would call")


def _class_attribute(cls: type, name: str) -> object:
    """The attribute `name` as the class's MRO holds it (no descriptor called); None when none has it."""
    return next((vars(klass)[name] for klass in cls.__mro__ if name in vars(klass)), None)

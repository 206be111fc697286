"""`record`: a frozen dataclass whose `__init__` stores its fields straight into the instance's dict.

    @record                    what @dataclass(frozen=True) makes (no other options: none is needed here)
    class Thing: ...

Why: the `__init__` that `dataclasses` writes for a frozen class sets each field through `object.__setattr__` (its
instances refuse plain assignment), a call through a C wrapper per field. The messages' records (model.NewMessage,
RcptResult, ... and the SMTP replies) are built about 200 fields' worth a message on the event loop: writing the
instance's `__dict__` instead (what `object.__setattr__` does for these classes) saved 4-6 % of its instructions at
one session (docs/performance.md, twentieth pass).

Contract: everything but the speed of `__init__` is the dataclass's own: frozen (assignment and deletion raise
FrozenInstanceError), eq, hash, repr, match_args, `dataclasses.fields`/`replace`/`asdict`. `__init__` takes the same
arguments (positional and keyword fields in order, `kw_only` ones after `*`), fills defaults and default factories
(a factory called per instance), sets the `init=False` fields that have a default factory (one with a plain default
reads the class's attribute, as a dataclass's does), then calls `__post_init__` if the class has one; a class that
writes its own `__init__` keeps it. A class with InitVar pseudo-fields (a `__post_init__` that takes arguments) is
refused at definition (TypeError): not needed here, and not written.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, TypeVar, dataclass_transform

T = TypeVar("T")


class _Factory:
    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()  # the default of a parameter whose field has a default_factory: "not given"


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, dataclasses.Field))
def record(cls: type[T], /) -> type[T]:
    """See the module docstring."""
    own_init = "__init__" in cls.__dict__  # (a class that writes its own keeps it, as dataclass leaves it)
    made = dataclasses.dataclass(frozen=True)(cls)
    if not own_init:
        setattr(made, "__init__", _direct_init(made))
    return made


def _direct_init(cls: type) -> Callable[..., None]:
    fields = dataclasses.fields(cls)
    post_init = getattr(cls, "__post_init__", None)
    if post_init is not None and len(inspect.signature(post_init).parameters) > 1:
        raise TypeError(f"record {cls.__qualname__}: InitVar fields are not supported")
    namespace: dict[str, Any] = {"_FACTORY": _FACTORY, "MISSING": dataclasses.MISSING}
    positional: list[str] = []
    keyword: list[str] = []
    body = ["    _d = self.__dict__"]
    for f in fields:
        name = f.name
        if f.default is not dataclasses.MISSING:
            namespace[f"_default_{name}"] = f.default
        if f.default_factory is not dataclasses.MISSING:
            namespace[f"_factory_{name}"] = f.default_factory
        if f.init:
            if f.default is not dataclasses.MISSING:
                parameter = f"{name}=_default_{name}"
            elif f.default_factory is not dataclasses.MISSING:
                parameter = f"{name}=_FACTORY"
            else:
                parameter = name
            (keyword if f.kw_only else positional).append(parameter)
            if f.default_factory is not dataclasses.MISSING:
                body.append(f"    _d[{name!r}] = _factory_{name}() if {name} is _FACTORY else {name}")
            else:
                body.append(f"    _d[{name!r}] = {name}")
        elif f.default_factory is not dataclasses.MISSING:  # (init=False with a plain default: the class's attribute)
            body.append(f"    _d[{name!r}] = _factory_{name}()")
    if post_init is not None:
        body.append("    self.__post_init__()")
    parameters = ", ".join(["self", *positional, *(["*", *keyword] if keyword else [])])
    source = f"def __init__({parameters}) -> None:\n" + "\n".join(body) + "\n"
    exec(compile(source, f"<record {cls.__module__}.{cls.__qualname__}>", "exec"), namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    return init

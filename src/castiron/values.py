"""``@value``: frozen dataclasses that cost (almost) nothing to define.

Owns one class decorator. ``@dataclass(frozen=True)`` compiles six methods from generated
source (``__init__``, ``__repr__``, ``__eq__``, ``__hash__``, ``__setattr__``,
``__delattr__``) for every class, about 0.3 ms each on a small machine: the ~50 row and wire
classes a warm rollback imports cost it ~20 ms before any work. ``@value`` gives the same
class — a real dataclass (``dataclasses.fields``, ``replace``, ``asdict``, ``is_dataclass``
and ``__match_args__`` work; type checkers see a frozen dataclass through
``dataclass_transform``) with the same behaviour (keyword or positional construction, defaults
and default factories, ``__post_init__``, field-wise ``==`` between instances of the same
class, hashing of the compared fields, ``repr``, and :class:`dataclasses.FrozenInstanceError`
on assignment) — but its methods are shared closures, nothing is compiled.

Not supported (use ``dataclass`` for these): ``InitVar``, ``kw_only``, ``slots``, ``order``,
inheriting fields from another dataclass.

It knows nothing of castiron; it imports only the standard library.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar, dataclass_transform

_C = TypeVar("_C", bound=type[Any])

_MISSING = dataclasses.MISSING


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def value(cls: _C) -> _C:
    """Make ``cls`` a frozen dataclass without compiling any code (see the module docstring).

    Raises:
        TypeError: when ``cls`` inherits dataclass fields (not supported).
    """
    for base in cls.__mro__[1:]:
        if "__dataclass_fields__" in base.__dict__:
            raise TypeError(f"@value class {cls.__name__} cannot inherit dataclass fields")
    dataclasses.dataclass(cls, init=False, repr=False, eq=False)
    fields = dataclasses.fields(cls)
    name = cls.__name__
    qualname = cls.__qualname__
    init_names = tuple(f.name for f in fields if f.init)
    known = frozenset(init_names)
    n_init = len(init_names)
    optional = tuple(
        (f.name, f.default, None if f.default_factory is _MISSING else f.default_factory)
        for f in fields
        if f.init and (f.default is not _MISSING or f.default_factory is not _MISSING)
    )
    no_init = tuple(
        (f.name, f.default, None if f.default_factory is _MISSING else f.default_factory)
        for f in fields
        if not f.init and (f.default is not _MISSING or f.default_factory is not _MISSING)
    )
    post_init = getattr(cls, "__post_init__", None)
    shown = tuple(f.name for f in fields if f.repr)
    compared = tuple(f.name for f in fields if f.compare)
    hashed = tuple(f.name for f in fields if (f.hash is None and f.compare) or f.hash)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > n_init:
            raise TypeError(
                f"{name}.__init__() takes {n_init + 1} positional arguments "
                f"but {len(args) + 1} were given"
            )
        values = dict(zip(init_names, args, strict=False))
        for key in kwargs:
            if key in values:
                raise TypeError(f"{name}.__init__() got multiple values for argument {key!r}")
            if key not in known:
                raise TypeError(f"{name}.__init__() got an unexpected keyword argument {key!r}")
        values.update(kwargs)
        if len(values) < n_init:
            for field_name, default, factory in optional:
                if field_name not in values:
                    values[field_name] = default if factory is None else factory()
            if len(values) < n_init:
                missing = [n for n in init_names if n not in values]
                raise TypeError(
                    f"{name}.__init__() missing required argument(s): "
                    + ", ".join(repr(m) for m in missing)
                )
        for field_name, default, factory in no_init:
            values[field_name] = default if factory is None else factory()
        self.__dict__.update(values)
        if post_init is not None:
            post_init(self)

    def __repr__(self: Any) -> str:
        inner = ", ".join(f"{n}={self.__dict__[n]!r}" for n in shown)
        return f"{qualname}({inner})"

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        mine, theirs = self.__dict__, other.__dict__
        return tuple(mine[n] for n in compared) == tuple(theirs[n] for n in compared)

    def __hash__(self: Any) -> int:
        mine = self.__dict__
        return hash(tuple(mine[n] for n in hashed))

    def __setattr__(self: Any, attr: str, _value: object) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {attr!r}")

    def __delattr__(self: Any, attr: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {attr!r}")

    own = cls.__dict__
    for method in (__init__, __repr__, __eq__, __hash__, __setattr__, __delattr__):
        # Like dataclass: a method the class body defines itself is kept (the hash of a class
        # that defines ``__eq__`` only is set to None by Python: replaced like dataclass does).
        if method.__name__ in own and own[method.__name__] is not None:
            if method.__name__ in ("__init__", "__setattr__", "__delattr__"):
                raise TypeError(f"@value class {name} must not define {method.__name__}")
            continue
        method.__qualname__ = f"{qualname}.{method.__name__}"
        setattr(cls, method.__name__, method)
    return cls


__all__ = ["value"]

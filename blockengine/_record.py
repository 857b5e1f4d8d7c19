"""Record classes for the start-up path, without the dataclasses module.

``import dataclasses`` pulls in inspect, ast, dis and tokenize: about a quarter of the
start-up time of a short `img` command (qemu-img check answers in 7 ms).  ``record``
covers what our plain data classes use of ``dataclasses.dataclass``: fields declared
as annotations in order, defaults (``factory(fn)`` for a fresh value per instance),
a generated ``__init__`` (as fast as dataclass's), ``__repr__``, ``__eq__`` unless
``eq=False``, and ``frozen`` instances that refuse assignment and hash by value.

    @record
    class CowRegion:
        offset: int
        nb_bytes: int = 0
"""
from __future__ import annotations


class factory:
    """A default made fresh for every instance by calling ``make()``."""

    __slots__ = ("make",)

    def __init__(self, make):
        self.make = make


class FrozenInstanceError(AttributeError):
    pass


def record(cls=None, *, frozen: bool = False, eq: bool = True):
    """Class decorator (see the module docstring); usable bare or with arguments."""
    def wrap(cls):
        return _make_record(cls, frozen, eq)
    return wrap if cls is None else wrap(cls)


def _make_record(cls, frozen: bool, eq: bool):
    names = tuple(cls.__dict__.get("__annotations__", {}))
    defaults = {}
    params, body = [], []
    for name in names:
        if name in cls.__dict__:
            value = cls.__dict__[name]
            defaults[name] = value
            if isinstance(value, factory):
                delattr(cls, name)          # no shared class-level value to leak
                params.append(f"{name}=_MISSING")
                body.append(f"_v = _d[{name!r}].make() if {name} is _MISSING else {name}")
                body.append(_assign(name, "_v", frozen))
                continue
            params.append(f"{name}=_d[{name!r}]")
        else:
            if defaults:
                raise TypeError(f"non-default field {name!r} follows a default one")
            params.append(name)
        body.append(_assign(name, name, frozen))
    source = (f"def __init__(self, {', '.join(params)}):\n    "
              + "\n    ".join(body or ["pass"]) + "\n")
    namespace = {"_d": defaults, "_MISSING": _MISSING, "_set": object.__setattr__}
    exec(source, namespace)      # noqa: S102 (our own generated source, as dataclasses)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init
    cls.__record_fields__ = names
    cls.__match_args__ = names
    if "__repr__" not in cls.__dict__:
        cls.__repr__ = _repr
    if eq and "__eq__" not in cls.__dict__:
        cls.__eq__ = _eq
        cls.__hash__ = _hash if frozen else None
    if frozen:
        cls.__setattr__ = _refuse_set
        cls.__delattr__ = _refuse_del
    return cls


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _assign(name: str, value: str, frozen: bool) -> str:
    return f"_set(self, {name!r}, {value})" if frozen else f"self.{name} = {value}"


def _values(obj) -> tuple:
    return tuple(getattr(obj, n) for n in obj.__record_fields__)


def _repr(self) -> str:
    return "%s(%s)" % (type(self).__qualname__, ", ".join(
        f"{n}={getattr(self, n)!r}" for n in self.__record_fields__))


def _eq(self, other):
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self) -> int:
    return hash(_values(self))


def _refuse_set(self, name, value):
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _refuse_del(self, name):
    raise FrozenInstanceError(f"cannot delete field {name!r}")

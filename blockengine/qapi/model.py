"""The schema's definitions resolved into types the validator walks.

A *type reference* is what schema.py writes: a type name ('str', 'BlockdevOptions')
or a one-element list naming an array's element type (['BlockdevRef']); implicit
types (a simple union's tag enum and variant wrappers) are referenced by the type
object itself.

Unions become objects the way QEMU 7.2 models them: a flat union is an object whose
discriminator member selects extra variant members; a simple union ``{'data': {k: T}}``
is a flat union with the implicit discriminator 'type' and variants ``{'data': T}``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Union

from . import schema


# JSON types as QEMU names them in "expected: ..." messages
OBJECT, ARRAY, STRING, NUMBER, BOOLEAN, NULL = (
    "object", "array", "string", "number", "boolean", "null")

INT64_MIN, INT64_MAX, UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
# builtin integer types -> inclusive range; 'int' is int64, 'size' behaves as uint64
INTEGER_RANGES = {
    "int": (INT64_MIN, INT64_MAX), "int64": (INT64_MIN, INT64_MAX),
    "int8": (-(1 << 7), (1 << 7) - 1), "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint8": (0, (1 << 8) - 1), "uint16": (0, (1 << 16) - 1), "uint32": (0, (1 << 32) - 1),
    "uint64": (0, UINT64_MAX), "size": (0, UINT64_MAX),
}
_BUILTIN_JSON_TYPES = {"str": STRING, "bool": BOOLEAN, "number": NUMBER, "null": NULL,
                       "any": None, **{name: NUMBER for name in INTEGER_RANGES}}


@dataclass(frozen=True)
class Builtin:
    """A builtin scalar: str, bool, number, null, any or an integer type."""
    name: str
    json_type: str | None          # None for 'any', which takes every JSON value


@dataclass(frozen=True)
class Enum:
    name: str
    values: tuple[str, ...]
    json_type = STRING


@dataclass(frozen=True)
class Member:
    name: str
    type: "TypeRef"
    optional: bool


@dataclass(frozen=True)
class Object:
    """A struct, union or command/event argument object.

    ``members`` come base first.  When ``discriminator`` is set, the value of that
    member selects the object ``variants[value]`` whose members are visited next; a
    value without a variant adds no members.
    """
    name: str
    members: tuple[Member, ...]
    discriminator: str | None = None
    variants: dict[str, "TypeRef"] = field(default_factory=dict)
    json_type = OBJECT


@dataclass(frozen=True)
class Alternate:
    """A value of any of ``branches`` (type references), chosen by its JSON type."""
    name: str
    branches: tuple["TypeRef", ...]


@dataclass(frozen=True)
class Array:
    element: "TypeRef"
    json_type = ARRAY


QAPIType = Union[Builtin, Enum, Object, Alternate, Array]
TypeRef = Union[str, list, QAPIType]


def _members(data: dict) -> tuple[Member, ...]:
    return tuple(Member(name.lstrip("*"), type_ref, name.startswith("*"))
                 for name, type_ref in data.items())


def _object_members(data: str | dict | None) -> tuple[Member, ...]:
    """Members of an object given by name (variants excluded), inline dict or nothing."""
    if data is None:
        return ()
    if isinstance(data, str):
        return resolve_name(data).members
    return _members(data)


def _struct(name: str, definition: dict) -> Object:
    return Object(name, _object_members(definition.get("base")) + _members(definition["data"]))


def _union(name: str, definition: dict) -> Object:
    data = definition["data"]
    if "discriminator" in definition:
        return Object(name, _object_members(definition["base"]), definition["discriminator"],
                      dict(data))
    kind = Enum(f"{name}Kind", tuple(data))
    wrappers = {tag: Object(f"q_obj_{type_ref}-wrapper", (Member("data", type_ref, False),))
                for tag, type_ref in data.items()}
    return Object(name, (Member("type", kind, False),), "type", wrappers)


@cache
def resolve_name(name: str) -> QAPIType:
    """The type called ``name``; KeyError if the schema has no such type."""
    if name in _BUILTIN_JSON_TYPES:
        return Builtin(name, _BUILTIN_JSON_TYPES[name])
    if name in schema.ENUMS:
        return Enum(name, tuple(schema.ENUMS[name]))
    if name in schema.STRUCTS:
        return _struct(name, schema.STRUCTS[name])
    if name in schema.UNIONS:
        return _union(name, schema.UNIONS[name])
    if name in schema.ALTERNATES:
        return Alternate(name, tuple(schema.ALTERNATES[name].values()))
    raise KeyError(f"unknown QAPI type {name!r}")


def resolve(type_ref: TypeRef) -> QAPIType:
    """The type a type reference denotes."""
    if isinstance(type_ref, str):
        return resolve_name(type_ref)
    if isinstance(type_ref, list):
        return Array(type_ref[0])
    return type_ref


def json_type(qapi_type: QAPIType) -> str | None:
    """The JSON type values of ``qapi_type`` have (alternates: None, they have several)."""
    return getattr(qapi_type, "json_type", None)


@cache
def command_arguments(command: str) -> Object:
    """The object a command's "arguments" must match (empty if it takes none).

    KeyError if the schema has no such command.
    """
    return _argument_object(f"q_obj_{command}-arg", schema.COMMANDS[command].get("data"))


@cache
def event_data(event: str) -> Object:
    """The object an event's "data" must match; KeyError for an unknown event."""
    return _argument_object(f"q_obj_{event}-arg", schema.EVENTS[event].get("data"))


def _argument_object(implicit_name: str, data: str | dict | None) -> Object:
    if isinstance(data, str):
        named = resolve_name(data)       # a struct or (boxed) union: its members as is
        assert isinstance(named, Object), data
        return named
    return Object(implicit_name, _object_members(data))

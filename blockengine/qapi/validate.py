"""Checking JSON values against the schema the way QEMU 7.2's QObject input visitor does.

Members are visited in schema order (base, then variant members), each nested object
completely, and only then is an object checked for members nobody asked for; the
first problem found is raised as a ValidationError carrying QEMU's exact text.

Names in messages follow qobject-input-visitor.c: "missing", "unexpected" and "invalid
type" messages use the full path ('file.filename', 'children[1].driver'); enum,
alternate and narrow-integer range messages use the bare member name, which is
'null' for array elements.  Of several unexpected members QEMU names whichever its
hash table yields first; here it is the first in the input's order.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from . import model
from .errors import ValidationError
from .model import INT64_MAX, INT64_MIN, UINT64_MAX, Alternate, Array, Builtin, Enum, Object

PathComponent = str | int          # a member name or an array index
Path = tuple[PathComponent, ...]


def full_name(path: Path) -> str:
    """QEMU's full_name(): members joined by '.', indices as '[i]'."""
    text = ""
    for component in path:
        if isinstance(component, int):
            text += f"[{component}]"
        else:
            text += f".{component}" if text else component
    return text or "<anonymous>"


def member_name(path: Path) -> str:
    """The name the visitor was called with: the last member name, 'null' for an element."""
    return path[-1] if path and isinstance(path[-1], str) else "null"


def _invalid_type(path: Path, expected: str) -> ValidationError:
    return ValidationError(
        f"Invalid parameter type for '{full_name(path)}', expected: {expected}")


def check_value(type_name: model.TypeRef, value: Any,
                path: str | Sequence[PathComponent] = ()) -> Any:
    """Validate ``value`` as an input of QAPI type ``type_name`` found at ``path``.

    ``path`` names where the value sits (a member name, or a sequence of member names
    and array indices) for error messages.  Returns the value as QEMU's visitor would
    hand it to a command: fresh dicts/lists with members in schema order, 'number'
    values as float and negative integers given for unsigned types wrapped modulo 2**64.
    Raises ValidationError on the first mismatch, KeyError for an unknown type name.
    """
    path = (path,) if isinstance(path, str) else tuple(path)
    return _visit(model.resolve(type_name), value, path)


def validate_command_args(name: str, args: dict | None) -> dict:
    """Validate a command's "arguments" object (None means {}); see check_value().

    KeyError if the schema has no command ``name``.
    """
    return _visit_object(model.command_arguments(name), {} if args is None else args, ())


def validate_event_data(name: str, data: dict | None) -> dict:
    """Validate an event's "data" object (None means {}); KeyError for unknown events."""
    return _visit_object(model.event_data(name), {} if data is None else data, ())


def _visit(qapi_type: model.QAPIType, value: Any, path: Path) -> Any:
    if isinstance(qapi_type, Object):
        return _visit_object(qapi_type, value, path)
    if isinstance(qapi_type, Builtin):
        return _visit_builtin(qapi_type.name, value, path)
    if isinstance(qapi_type, Enum):
        return _visit_enum(qapi_type, value, path)
    if isinstance(qapi_type, Array):
        return _visit_array(qapi_type, value, path)
    return _visit_alternate(qapi_type, value, path)


def _visit_object(obj: Object, value: Any, path: Path) -> dict:
    if not isinstance(value, dict):
        raise _invalid_type(path, model.OBJECT)
    result: dict = {}
    _visit_members(obj, value, path, result)
    for key in value:
        if key not in result:
            raise ValidationError(f"Parameter '{full_name(path + (str(key),))}' is unexpected")
    return result


def _visit_members(obj: Object, value: dict, path: Path, result: dict) -> None:
    """Visit obj's members, then its selected variant's, into ``result``."""
    for member in obj.members:
        if member.name in value:
            result[member.name] = _visit(model.resolve(member.type), value[member.name],
                                         path + (member.name,))
        elif not member.optional:
            raise ValidationError(f"Parameter '{full_name(path + (member.name,))}' is missing")
    if obj.discriminator is not None:
        variant = obj.variants.get(result[obj.discriminator])
        if variant is not None:
            _visit_members(model.resolve(variant), value, path, result)


def _visit_enum(enum: Enum, value: Any, path: Path) -> str:
    if not isinstance(value, str):
        raise _invalid_type(path, model.STRING)
    if value not in enum.values:
        raise ValidationError(
            f"Parameter '{member_name(path)}' does not accept value '{value}'")
    return value


def _visit_array(array: Array, value: Any, path: Path) -> list:
    if not isinstance(value, list):
        raise _invalid_type(path, model.ARRAY)
    element_type = model.resolve(array.element)
    return [_visit(element_type, element, path + (index,))
            for index, element in enumerate(value)]


def _json_type_of(value: Any) -> str | None:
    if isinstance(value, bool):
        return model.BOOLEAN
    if isinstance(value, (int, float)):
        return model.NUMBER
    if isinstance(value, str):
        return model.STRING
    if value is None:
        return model.NULL
    if isinstance(value, dict):
        return model.OBJECT
    if isinstance(value, list):
        return model.ARRAY
    return None


def _visit_alternate(alternate: Alternate, value: Any, path: Path) -> Any:
    value_json_type = _json_type_of(value)
    for branch in alternate.branches:
        branch_type = model.resolve(branch)
        if model.json_type(branch_type) == value_json_type:
            return _visit(branch_type, value, path)
    raise ValidationError(f"Invalid parameter type for '{member_name(path)}', "
                          f"expected: {alternate.name}")


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _visit_builtin(name: str, value: Any, path: Path) -> Any:
    if name == "any":
        return value
    if name in model.INTEGER_RANGES:
        return _visit_integer(name, value, path)
    if name == "number":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _invalid_type(path, model.NUMBER)
        return _to_float(value)
    expected = model.resolve_name(name).json_type
    if _json_type_of(value) != expected:
        raise _invalid_type(path, expected)
    return value


def _to_float(value: int | float) -> float:
    """A JSON number as the double QEMU's parser makes of it (huge integers overflow)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _visit_integer(name: str, value: Any, path: Path) -> int:
    """QEMU's int64/uint64 visits, then visit_type_intN()'s range check."""
    low, high = model.INTEGER_RANGES[name]
    if low < 0:
        if not _is_integer(value) or not INT64_MIN <= value <= INT64_MAX:
            raise _invalid_type(path, "integer")
    else:
        # QEMU takes negative int64 values for unsigned types, as their two's complement
        if not _is_integer(value) or not INT64_MIN <= value <= UINT64_MAX:
            raise ValidationError(f"Parameter '{full_name(path)}' expects uint64")
        value &= UINT64_MAX
    if not low <= value <= high:        # only int8..int32 and uint8..uint32 can get here
        raise ValidationError(f"Parameter '{member_name(path)}' expects {name}_t")
    return value

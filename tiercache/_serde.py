"""The versioned JSON envelope remote tiers store, and type-faithful value conversion.

Envelope, format 1 (a JSON object, so a Cloudflare Worker or any other reader can ``JSON.parse`` it)::

    {"tc": 1,            # envelope format
     "k": "app:user:42", # the full cache key (lets a tier that hashes long keys detect collisions)
     "v": <value>,       # the value as JSON (see ``to_json_default``)
     "c": 1767225600.0,  # created_at, Unix seconds
     "f": 1767225660.0,  # fresh_until, Unix seconds
     "s": 1767225720.0,  # stale_until (hard expiry), Unix seconds
     "t": ["users"],     # tags
     "n": 1767225600000000000,  # version (ordering of writes to this key)
     "d": 0.012}         # duration of the load that produced the value, seconds

Values are encoded with orjson: dataclasses, datetime/date/time, UUID, Enum natively; Decimal as a
string, bytes as base64, sets as lists, pydantic models through ``model_dump(mode="json")``. On the
way back a *converter* built from the caller's type (a return annotation or ``value_type=``) turns
the JSON back into that type, so a dataclass comes back as the dataclass, not a dict.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import enum
import threading
import types
import typing
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Protocol

import orjson

from ._entry import Entry
from ._errors import SerializationError

__all__ = ["Codec", "JsonCodec", "converter_for", "ENVELOPE_FORMAT"]

ENVELOPE_FORMAT = 1
_DUMPS_OPTIONS = orjson.OPT_NON_STR_KEYS


class Codec(Protocol):
    """Turns entries into bytes for remote tiers and back. ``loads`` raises SerializationError."""

    def dumps(self, entry: Entry) -> bytes: ...

    def loads(self, data: bytes) -> Entry: ...


def to_json_default(obj: Any) -> Any:
    """orjson ``default=`` hook for the types orjson does not encode by itself."""
    if isinstance(obj, Decimal):
        return str(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, (set, frozenset)):
        try:
            return sorted(obj)
        except TypeError:
            return list(obj)
    model_dump = getattr(obj, "model_dump", None)  # pydantic v2, without importing pydantic
    if model_dump is not None and callable(model_dump):
        return model_dump(mode="json")
    raise TypeError(f"Type is not JSON serializable: {type(obj).__qualname__}")


def _refuse_non_finite(data: bytes, value: Any) -> None:
    """orjson writes NaN and +-inf as ``null``: refuse them rather than change the value. Only an
    encoding that contains ``null`` at all is searched, so most writes pay one bytes scan."""
    if b"null" in data and _has_non_finite(value, 0):
        raise SerializationError("cannot serialise NaN or infinity: JSON has no such numbers")


def _has_non_finite(obj: Any, depth: int) -> bool:
    if isinstance(obj, float):
        return obj != obj or obj in (_INF, -_INF)
    if depth > 64 or isinstance(obj, (str, bytes, int, bool)) or obj is None:
        return False
    if isinstance(obj, dict):
        return any(_has_non_finite(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return any(_has_non_finite(v, depth + 1) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return any(_has_non_finite(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj))
    attrs = getattr(obj, "__dict__", None)
    return attrs is not None and _has_non_finite(attrs, depth + 1)


_INF = float("inf")


class JsonCodec:
    """The default codec: the format-1 JSON envelope, no signature."""

    def dumps(self, entry: Entry) -> bytes:
        doc = {
            "tc": ENVELOPE_FORMAT,
            "k": entry.key,
            "v": entry.value,
            "c": entry.created_at,
            "f": entry.fresh_until,
            "s": entry.stale_until,
            "t": list(entry.tags),
            "n": entry.version,
            "d": entry.delta,
        }
        try:
            data = orjson.dumps(doc, default=to_json_default, option=_DUMPS_OPTIONS)
        except TypeError as exc:
            raise SerializationError(
                f"cannot serialise value of type {type(entry.value).__qualname__} for key "
                f"{entry.key!r}: {exc}"
            ) from None
        _refuse_non_finite(data, entry.value)
        return data

    def loads(self, data: bytes) -> Entry:
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise SerializationError("not a tiercache envelope: invalid JSON") from None
        return entry_from_document(doc)


def _number(v: Any, name: str) -> float:
    if type(v) is float:  # what JsonCodec writes
        return v
    if type(v) is int:
        return float(v)
    raise SerializationError(f"not a tiercache envelope: field {name!r} is not a number")


def entry_from_document(doc: Any) -> Entry:
    """Validate a decoded envelope and build an (untyped) Entry; SerializationError if malformed.

    Every read below L1 lands here: one ``get`` per field, and exact type checks, which the
    envelopes JsonCodec writes pass at the first test."""
    if type(doc) is not dict or doc.get("tc") != ENVELOPE_FORMAT:
        raise SerializationError("not a tiercache envelope (format 1)")
    get = doc.get
    key, tags, version, delta = get("k"), get("t", []), get("n", 0), get("d", 0.0)
    if type(key) is not str or "v" not in doc:
        raise SerializationError("not a tiercache envelope: missing key or value")
    if type(tags) is not list or (tags and not all(type(t) is str for t in tags)):
        raise SerializationError("not a tiercache envelope: tags are not a list of strings")
    if type(version) is not int:
        raise SerializationError("not a tiercache envelope: version is not an integer")
    return Entry(
        key,
        doc["v"],
        created_at=_number(get("c"), "c"),
        fresh_until=_number(get("f"), "f"),
        stale_until=_number(get("s"), "s"),
        tags=tuple(tags),
        version=version,
        delta=delta if type(delta) is float else float(delta) if type(delta) is int else 0.0,
        typed=False,
    )


# --- converters: JSON-shaped data back to the caller's type -------------------------------------

Converter = Callable[[Any], Any]
_converters: dict[Any, Converter | None] = {}
_converters_lock = threading.Lock()


def converter_for(tp: Any) -> Converter | None:
    """A function that rebuilds a value of type ``tp`` from its JSON form (None: use as is).

    Built once per type and cached. Raises ConfigurationError-free: unknown types convert as is.
    """
    try:
        return _converters[tp]
    except KeyError:
        pass
    except TypeError:  # unhashable annotation object
        return _build(tp)
    conv = _build(tp)
    with _converters_lock:
        _converters[tp] = conv
    return conv


def _identity_types() -> tuple[Any, ...]:
    return (Any, object, str, int, bool, type(None), None, typing.Literal)


def _build(tp: Any) -> Converter | None:
    if tp in _identity_types():
        return None
    if tp is float:
        return lambda v: float(v) if type(v) is int else v
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return converter_for(typing.get_args(tp)[0])
    if origin is typing.Literal or origin is typing.ClassVar:
        return None
    if origin is typing.Union or origin is types.UnionType:
        return _union_converter(typing.get_args(tp))
    if origin is not None:
        return _generic_converter(origin, typing.get_args(tp))
    if isinstance(tp, type):
        return _class_converter(tp)
    return None


def _union_converter(args: tuple[Any, ...]) -> Converter | None:
    members = [a for a in args if a is not type(None)]
    convs = [converter_for(a) for a in members]
    if all(c is None for c in convs):
        return None
    if len(members) == 1:
        only = convs[0]
        assert only is not None
        return lambda v: None if v is None else only(v)

    def convert(v: Any) -> Any:
        if v is None:
            return None
        for c in convs:
            if c is None:
                return v
            try:
                return c(v)
            except (TypeError, ValueError, KeyError):
                continue
        return v

    return convert


def _each(item: Converter, container: Callable[[Any], Any]) -> Converter:
    return lambda v: container(item(x) for x in v)


def _generic_converter(origin: Any, args: tuple[Any, ...]) -> Converter | None:
    import collections.abc as cabc

    item = converter_for(args[0]) if args else None
    if origin in (list, cabc.Sequence, cabc.MutableSequence, cabc.Iterable, cabc.Collection):
        return None if item is None else _each(item, list)
    if origin in (set, cabc.Set, cabc.MutableSet):
        return set if item is None else _each(item, set)
    if origin is frozenset:
        return frozenset if item is None else _each(item, frozenset)
    if origin is tuple:
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            return tuple if item is None else _each(item, tuple)
        convs = [converter_for(a) for a in args]
        return lambda v: tuple(x if c is None else c(x) for c, x in zip(convs, v, strict=False))
    if origin in (dict, cabc.Mapping, cabc.MutableMapping):
        kconv = item
        vconv = converter_for(args[1]) if len(args) > 1 else None
        if kconv is None and vconv is None:
            return None
        return lambda v: {
            (k if kconv is None else kconv(k)): (x if vconv is None else vconv(x)) for k, x in v.items()
        }
    if isinstance(origin, type):
        return _class_converter(origin)
    return None


def _class_converter(tp: type) -> Converter | None:
    if issubclass(tp, bool):
        return None
    if issubclass(tp, enum.Enum):
        return tp
    if issubclass(tp, _dt.datetime):
        return lambda v: v if isinstance(v, _dt.datetime) else _dt.datetime.fromisoformat(v)
    if issubclass(tp, _dt.date):
        return lambda v: v if isinstance(v, _dt.date) else _dt.date.fromisoformat(v)
    if issubclass(tp, _dt.time):
        return lambda v: v if isinstance(v, _dt.time) else _dt.time.fromisoformat(v)
    if issubclass(tp, uuid.UUID):
        return lambda v: v if isinstance(v, uuid.UUID) else uuid.UUID(v)
    if issubclass(tp, Decimal):
        return lambda v: Decimal(v) if isinstance(v, str) else Decimal(str(v))
    if issubclass(tp, (bytes, bytearray)):
        return lambda v: tp(base64.b64decode(v)) if isinstance(v, str) else v
    if issubclass(tp, (str, int)):
        return None if tp in (str, int) else tp
    if issubclass(tp, float):
        return lambda v: tp(v)
    validate = getattr(tp, "model_validate", None)  # pydantic v2 model
    if validate is not None and callable(validate):
        return validate  # type: ignore[no-any-return]
    if dataclasses.is_dataclass(tp):
        return _dataclass_converter(tp)
    if issubclass(tp, tuple) and hasattr(tp, "_fields"):  # NamedTuple
        hints = typing.get_type_hints(tp)
        convs = [converter_for(hints.get(f, Any)) for f in tp._fields]
        return lambda v: tp(*(x if c is None else c(x) for c, x in zip(convs, v, strict=False)))
    if tp in (list, dict):
        return None
    if tp in (set, frozenset, tuple):
        return tp
    return None


def _dataclass_converter(tp: type) -> Converter:
    hints = typing.get_type_hints(tp)
    fields = [(f.name, converter_for(hints.get(f.name, Any))) for f in dataclasses.fields(tp) if f.init]

    def convert(v: Any) -> Any:
        if isinstance(v, tp):
            return v
        if not isinstance(v, dict):
            raise SerializationError(f"cannot rebuild {tp.__qualname__} from {type(v).__qualname__}")
        kwargs = {name: (v[name] if conv is None else conv(v[name])) for name, conv in fields if name in v}
        return tp(**kwargs)

    return convert


def convert_entry(entry: Entry, conv: Converter | None) -> Entry:
    """The entry with its JSON-shaped value rebuilt into the caller's type (SerializationError)."""
    if entry.typed:
        return entry
    if conv is None:
        entry.typed = True  # safe: nothing else holds this freshly decoded entry yet
        return entry
    try:
        value = conv(entry.value)
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(f"cannot rebuild the cached value for {entry.key!r}: {exc}") from None
    return entry.replace(value=value, typed=True, payload=entry.payload)

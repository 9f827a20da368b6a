"""The versioned JSON envelope remote tiers store, its tagged value form, and typed decoding.

Envelope, format 1 (a JSON object, so a Cloudflare Worker or any other reader can ``JSON.parse`` it)::

    {"tc": 1,            # envelope format
     "k": "app:user:42", # the full cache key (lets a tier that hashes long keys detect collisions)
     "v": <value>,       # the value in the tagged JSON form below
     "c": 1767225600.0,  # created_at, Unix seconds
     "f": 1767225660.0,  # fresh_until, Unix seconds
     "s": 1767225720.0,  # stale_until (hard expiry), Unix seconds
     "t": ["users"],     # tags
     "n": 1767225600000000000,  # version (ordering of writes to this key)
     "d": 0.012,         # duration of the load that produced the value, seconds
     "y": "app.models:User"}  # optional: the declared dataclass/pydantic class of the value
                              # (a reader with no type of its own honours it only for a class
                              # it declared itself: rebuilding one runs the class's code)

The value form (plain JSON; one rule: the value a caller gets back is equal to, and of the same
type as, the one written, whichever tier answered):

* ``str``, ``bool``, ``None``, ``int`` (64-bit), finite ``float``, ``list`` and ``dict`` with
  ``str`` keys are themselves.
* Anything else JSON cannot hold as such is a *tagged object*: an object of exactly one member
  whose name starts with ``$``::

      {"$tuple": [..]}  {"$set": [..]}  {"$frozenset": [..]}  {"$bytes": "<base64>"}
      {"$map": [[key, value], ..]}          a dict with any non-str key (keys tagged as values)
      {"$datetime": "<ISO 8601>"}  {"$date": "..."}  {"$time": "..."}   ([text, 1] when fold=1)
      {"$timedelta": [days, seconds, microseconds]}
      {"$decimal": "<str(d)>"}  {"$uuid": "<hex with dashes>"}  {"$int": "<decimal digits>"}
      {"$enum": ["module:QualName", <value>]}   {"$namedtuple": ["module:QualName", [..]]}
      {"$dict": {..}}        a str-keyed dict that itself has one member whose name starts with $

  Enum and NamedTuple classes are found by name among the already imported modules (never
  imported because a record says so) or among the types the cache was given; the look-up runs no
  code (namespaces read directly), Enum members are found by value and NamedTuples filled in
  without calling the class.
* Instances of user classes (dataclasses, pydantic models) are plain objects of their fields.
  They need a declared type -- the decorated function's or the loader's return annotation, or
  ``value_type=`` -- to come back as the class; writing one without a declared type fails with
  SerializationError rather than handing other processes a dict.

Decoding validates against the declared type: a value of the wrong shape (an ``int`` field holding
``"x"``, a ``tuple[int, ...]`` holding a string) is a SerializationError, which the cache counts as
a corrupt read and treats as a miss. The converter is hand-written: it reads the tagged form
directly and costs no import; msgspec.convert is faster per value but cannot read the tagged form
(docs/reliability.md has the measurements, benchmarks/bench_convert.py the code).
"""

from __future__ import annotations

import base64
import collections.abc as cabc
import dataclasses
import datetime as _dt
import enum
import functools
import sys
import threading
import types
import typing
import uuid
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

import orjson

from ._entry import Entry
from ._errors import SerializationError

__all__ = [
    "ENVELOPE_FORMAT",
    "Codec",
    "Converter",
    "JsonCodec",
    "converter_for",
    "decode_value",
    "encode_value",
]

ENVELOPE_FORMAT = 1
MAX_DEPTH = 200  # nesting deeper than this is refused both ways (orjson stops at 254 anyway)
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
# A Decimal's exponent beyond decimal128's range is refused: 1E+999999999 is a valid string, but
# turning it into an int or quantizing it can take minutes.
_DECIMAL_EXP = 6176


class Codec(Protocol):
    """Turns entries into bytes for remote tiers and back. ``loads`` raises SerializationError."""

    def dumps(self, entry: Entry) -> bytes: ...

    def loads(self, data: bytes) -> Entry: ...


# --- encoding: Python value -> tagged JSON form ---------------------------------------------------


def encode_value(value: Any, tp: Any = None) -> Any:
    """``value`` in the tagged JSON form; ``tp`` is its declared type (None: not declared)."""
    return _enc(value, Any if tp is None else tp, 0)


class _KeyMode:
    """The declared type while building a cache key: any dataclass or model, tagged by class."""


KEY_MODE: Any = _KeyMode()


def encode_key_args(args: tuple[Any, ...]) -> Any:
    """The arguments of a call in the tagged form, typed (1, "1", a UUID and its str differ)."""
    return [_enc(a, KEY_MODE, 1) for a in args]


def _fail(msg: str) -> SerializationError:
    return SerializationError(msg)


def _enc(v: Any, tp: Any, depth: int) -> Any:
    t = type(v)
    if t is str or t is bool or v is None:
        return v
    if t is int:
        return v if _INT_MIN <= v <= _INT_MAX else {"$int": str(v)}
    if t is float:
        if v != v or v in (_INF, -_INF):
            raise _fail("cannot serialise NaN or infinity: JSON has no such numbers")
        return v
    if depth > MAX_DEPTH:
        raise _fail(f"value is nested more than {MAX_DEPTH} levels deep")
    d = depth + 1
    keying = tp is KEY_MODE
    if t is list:
        it = tp if keying else _item_type(tp, (list,))
        return [_enc(x, it, d) for x in v]
    if t is dict:
        kt, vt = (tp, tp) if keying else _mapping_types(tp)
        if all(type(k) is str for k in v):
            out = {k: _enc(x, vt, d) for k, x in v.items()}
            if len(out) == 1 and next(iter(out))[:1] == "$":
                return {"$dict": out}
            return out
        pairs = [[_enc(k, kt, d), _enc(x, vt, d)] for k, x in v.items()]
        if keying:  # equal dicts, one key, whatever their insertion order
            pairs.sort(key=lambda p: orjson.dumps(p[0], option=orjson.OPT_SORT_KEYS))
        return {"$map": pairs}
    if t is tuple:
        args = (tp, Ellipsis) if keying else _args_of(tp, tuple)
        if args and not (len(args) == 2 and args[1] is Ellipsis) and len(args) == len(v):
            return {"$tuple": [_enc(x, a, d) for x, a in zip(v, args, strict=True)]}
        it = args[0] if args else Any
        return {"$tuple": [_enc(x, it, d) for x in v]}
    if t is set or t is frozenset:
        it = tp if keying else _item_type(tp, (set, frozenset))
        items = [_enc(x, it, d) for x in v]
        # a stable order, so equal sets encode to equal bytes (and hash to one key)
        items.sort(key=lambda x: orjson.dumps(x, option=orjson.OPT_SORT_KEYS))
        return {"$set" if t is set else "$frozenset": items}
    if t is bytes:
        return {"$bytes": base64.b64encode(v).decode("ascii")}
    if isinstance(v, enum.Enum):
        return {"$enum": [_class_name(t, keying), _enc(v.value, Any, d)]}
    if t is _dt.datetime:
        return {"$datetime": [v.isoformat(), 1] if v.fold else v.isoformat()}
    if t is _dt.date:
        return {"$date": v.isoformat()}
    if t is _dt.time:
        return {"$time": [v.isoformat(), 1] if v.fold else v.isoformat()}
    if t is _dt.timedelta:
        return {"$timedelta": [v.days, v.seconds, v.microseconds]}
    if t is Decimal:
        if not v.is_finite():
            raise _fail("cannot serialise a non-finite Decimal (NaN or infinity)")
        if abs(int(v.as_tuple().exponent)) > _DECIMAL_EXP:
            raise _fail(f"cannot serialise a Decimal with an exponent beyond +-{_DECIMAL_EXP}")
        return {"$decimal": str(v)}
    if t is uuid.UUID:
        return {"$uuid": str(v)}
    if isinstance(v, tuple) and hasattr(t, "_fields"):  # NamedTuple
        hints = _hints(t)
        return {
            "$namedtuple": [
                _class_name(t, keying),
                [_enc(x, tp if keying else hints.get(f, Any), d) for f, x in zip(t._fields, v, strict=True)],
            ]
        }
    return _enc_declared(v, t, tp, d)


def _enc_declared(v: Any, t: type, tp: Any, depth: int) -> Any:
    """A user class instance: plain fields, allowed only where its class is the declared type."""
    dump: Any = getattr(v, "model_dump", None)  # pydantic v2, without importing pydantic
    is_model = dump is not None and callable(dump)
    if not (is_model or (dataclasses.is_dataclass(v) and not isinstance(v, type))):
        raise _fail(
            f"cannot serialise a {t.__qualname__}: supported are JSON types, tuple, set, frozenset, "
            "bytes, dict with any keys, datetime/date/time/timedelta, Decimal, UUID, Enum, "
            "NamedTuple, dataclasses and pydantic models"
        )
    if tp is KEY_MODE:  # a key names the class: equal fields of two classes are two keys
        fields = (
            dump(mode="json") if is_model else {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
        )
        return {"$obj": [f"{t.__module__}:{t.__qualname__}", _enc(fields, tp, depth)]}
    if not _declares(tp, t):
        raise _fail(
            f"cannot serialise a {t.__qualname__} without a declared type: other processes would "
            "read it back as a dict. Annotate the function's or the loader's return type, or pass "
            f"value_type= (declared here: {_type_name(tp)})"
        )
    if is_model:
        return _enc(dump(mode="json"), Any, depth)
    hints = _hints(t)
    return {f.name: _enc(getattr(v, f.name), hints.get(f.name, Any), depth) for f in dataclasses.fields(v)}


def _declares(tp: Any, cls: type) -> bool:
    """Is ``cls`` named by the declared type ``tp`` (itself, a generic alias of it, a union member)?"""
    if tp is cls:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _declares(typing.get_args(tp)[0], cls)
    if origin is typing.Union or origin is types.UnionType:
        return any(_declares(a, cls) for a in typing.get_args(tp))
    return origin is cls


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _args_of(tp: Any, container: type) -> tuple[Any, ...]:
    """The type arguments of ``tp`` if it declares ``container`` (alone or as one union member)."""
    tp = _strip(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        found = [a for a in typing.get_args(tp) if typing.get_origin(_strip(a)) is container]
        return typing.get_args(_strip(found[0])) if len(found) == 1 else ()
    if origin is container:
        return typing.get_args(tp)
    if isinstance(origin, type) and issubclass(container, origin):  # Sequence[T], Mapping[K, V]...
        return typing.get_args(tp)
    return ()


def _item_type(tp: Any, containers: tuple[type, ...]) -> Any:
    for c in containers:
        args = _args_of(tp, c)
        if args:
            return args[0]
    return Any


def _mapping_types(tp: Any) -> tuple[Any, Any]:
    args = _args_of(tp, dict)
    return (args[0], args[1]) if len(args) == 2 else (Any, Any)


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "none"
    return getattr(tp, "__qualname__", None) or repr(tp)


# --- classes named in records ---------------------------------------------------------------------

_known: dict[str, type] = {}  # Enum/NamedTuple classes met in declared types, by record name
_hints_cache: dict[type, dict[str, Any]] = {}


def _class_name(cls: type, keying: bool = False) -> str:
    name = f"{cls.__module__}:{cls.__qualname__}"
    if keying:
        return name
    if _known.get(name) is not cls and _find_class(name) is not cls:
        if "<locals>" in cls.__qualname__ and name not in _known:
            raise _fail(
                f"cannot serialise a {cls.__qualname__}: a class defined inside a function cannot "
                "be found by name in another process; declare it in the value type or move it to "
                "module level"
            )
        _known.setdefault(name, cls)
    return name


def _find_class(name: str) -> type | None:
    """The class a record names, from already imported modules only.

    A record is untrusted input, so the look-up runs no code: it never imports, and it reads
    module and class ``__dict__``s directly (no ``getattr``: no module ``__getattr__``, no
    properties or ``__getattr__`` of objects on the way). Only classes are walked through."""
    known = _known.get(name)
    if known is not None:
        return known
    module_name, sep, qualname = name.partition(":")
    module = sys.modules.get(module_name) if sep else None
    if not isinstance(module, types.ModuleType):
        return None
    namespace: Any = object.__getattribute__(module, "__dict__")
    obj: Any = None
    for part in qualname.split("."):
        if namespace is None:
            return None
        obj = namespace.get(part) if type(namespace) is dict else None
        # only a class leads further (its own namespace; inherited names are not looked at)
        namespace = dict(_CLASS_DICT(obj)) if issubclass(type(obj), type) else None
    return obj if issubclass(type(obj), type) else None


_CLASS_DICT = type.__dict__["__dict__"].__get__  # a class's own namespace, past any metaclass


def _declared_value_class(name: str) -> type | None:
    """The dataclass or pydantic model an envelope's ``y`` names, if this process declared it.

    Rebuilding one runs its code (``__init__``, ``__post_init__``, validators) on the record's
    fields, so ``y`` only selects among classes this process has itself declared as value types
    (a return or loader annotation, ``value_type=``), never any class that happens to be imported."""
    return _value_classes.get(name)


_value_classes: dict[str, type] = {}  # dataclasses/pydantic models met in declared types


def _register_value_class(tp: type) -> None:
    name = _declared_class_name(tp)
    if name is not None:
        _value_classes.setdefault(name, tp)


def _static_attr(cls: type, name: str) -> Any:
    """``cls.name`` from the class namespaces along its MRO, running no descriptor or hook."""
    for base in type.__dict__["__mro__"].__get__(cls):
        namespace = _CLASS_DICT(base)
        if name in namespace:
            return namespace[name]
    return None


def _hints(cls: type) -> dict[str, Any]:
    try:
        return _hints_cache[cls]
    except KeyError:
        pass
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception as exc:
        raise _fail(f"cannot read the field types of {cls.__qualname__}: {exc}") from None
    _hints_cache[cls] = hints
    return hints


# --- decoding: tagged JSON form -> Python value ---------------------------------------------------


def decode_value(raw: Any) -> Any:
    """The Python value of a tagged JSON form, without a declared type (SerializationError)."""
    return _untag(raw, 0)


def _untag(j: Any, depth: int) -> Any:
    t = type(j)
    if t is str or t is int or t is float or t is bool or j is None:
        return j
    if depth > MAX_DEPTH:
        raise _fail(f"value is nested more than {MAX_DEPTH} levels deep")
    d = depth + 1
    if t is list:
        return [_untag(x, d) for x in j]
    if t is not dict:
        raise _fail(f"not a JSON value: {t.__qualname__}")
    if len(j) == 1:
        ((tag, body),) = j.items()
        if tag[:1] == "$":
            return _untag_tagged(tag, body, d)
    return {k: _untag(x, d) for k, x in j.items()}


def _str_body(tag: str, body: Any) -> str:
    if type(body) is not str:
        raise _fail(f"{tag} holds a {type(body).__qualname__}, not a string")
    return body


def _list_body(tag: str, body: Any) -> list[Any]:
    if type(body) is not list:
        raise _fail(f"{tag} holds a {type(body).__qualname__}, not a list")
    return body


def _untag_tagged(tag: str, body: Any, d: int) -> Any:
    try:
        if tag == "$tuple":
            return tuple(_untag(x, d) for x in _list_body(tag, body))
        if tag == "$set":
            return {_untag(x, d) for x in _list_body(tag, body)}
        if tag == "$frozenset":
            return frozenset(_untag(x, d) for x in _list_body(tag, body))
        if tag == "$map":
            out = {}
            for pair in _list_body(tag, body):
                if type(pair) is not list or len(pair) != 2:
                    raise _fail("$map holds an item that is not a [key, value] pair")
                out[_untag(pair[0], d)] = _untag(pair[1], d)
            return out
        if tag == "$dict":
            if type(body) is not dict:
                raise _fail("$dict holds no object")
            return {k: _untag(x, d) for k, x in body.items()}
        if tag == "$bytes":
            return base64.b64decode(_str_body(tag, body), validate=True)
        if tag == "$int":
            s = _str_body(tag, body)
            if not 0 < len(s) <= 4300 or not s.lstrip("-").isdigit() or not s.isascii():
                raise _fail("$int holds no decimal integer")
            return int(s)
        if tag == "$datetime" or tag == "$time":
            cls: Any = _dt.datetime if tag == "$datetime" else _dt.time
            if type(body) is list:  # [iso, 1]: the second of two equal wall-clock times (fold=1)
                if len(body) != 2 or body[1] != 1 or type(body[1]) is not int:
                    raise _fail(f"{tag} holds no [ISO text, 1]")
                return cls.fromisoformat(_str_body(tag, body[0])).replace(fold=1)
            return cls.fromisoformat(_str_body(tag, body))
        if tag == "$date":
            return _dt.date.fromisoformat(_str_body(tag, body))
        if tag == "$timedelta":
            parts = _list_body(tag, body)
            if len(parts) != 3 or not all(type(p) is int for p in parts):
                raise _fail("$timedelta holds no [days, seconds, microseconds]")
            return _dt.timedelta(days=parts[0], seconds=parts[1], microseconds=parts[2])
        if tag == "$decimal":
            return _decimal(_str_body(tag, body))
        if tag == "$uuid":
            return uuid.UUID(_str_body(tag, body))
        if tag == "$enum" or tag == "$namedtuple":
            parts = _list_body(tag, body)
            if len(parts) != 2 or type(parts[0]) is not str:
                raise _fail(f"{tag} holds no [class name, value]")
            named: Any = _find_class(parts[0])
            if tag == "$enum":
                if named is None or not issubclass(named, enum.Enum):
                    raise _fail(f"$enum names {parts[0]!r}, which is no imported Enum")
                return _enum_member(named, _untag(parts[1], d))
            fields = _static_attr(named, "_fields") if named is not None else None
            if named is None or not issubclass(named, tuple) or type(fields) is not tuple:
                raise _fail(f"$namedtuple names {parts[0]!r}, which is no imported NamedTuple")
            items = _list_body(tag, _untag(parts[1], d))
            if len(items) != len(fields):
                raise _fail(f"$namedtuple {parts[0]!r} holds {len(items)} fields, not {len(fields)}")
            # Filled in like pickle would, without calling the class: a record chooses the class,
            # so no constructor of it runs (a declared NamedTuple is rebuilt by its check later).
            return tuple.__new__(named, items)
    except SerializationError:
        raise
    except RecursionError:
        raise _fail("value is nested too deeply") from None
    except Exception as exc:  # a class's own look-up hook (an Enum's _missing_) included
        raise _fail(f"bad {tag} value: {exc}") from None
    raise _fail(f"unknown tag {tag!r}")


def _enum_member(cls: type[enum.Enum], value: Any) -> Any:
    """The member of ``cls`` with ``value``: a dict look-up, else the standard ``cls(value)`` (a
    Flag's combined members, an Enum's own ``_missing_``), never a custom metaclass's call."""
    members = _static_attr(cls, "_value2member_map_")
    try:
        member = members.get(value) if type(members) is dict else None
    except TypeError:  # an unhashable value
        member = None
    if member is not None:
        return member
    if type(cls).__call__ is not enum.EnumMeta.__call__:
        raise _fail(f"{cls.__qualname__} has no member with the value {value!r}")
    return cls(value)


def _decimal(s: str) -> Decimal:
    if len(s) > 4400:
        raise _fail("$decimal holds too many digits")
    try:
        value = Decimal(s)
    except InvalidOperation:
        raise _fail("$decimal holds no number") from None
    if not value.is_finite():
        raise _fail("$decimal holds NaN or infinity")
    if abs(int(value.as_tuple().exponent)) > _DECIMAL_EXP:
        raise _fail(f"$decimal exponent beyond +-{_DECIMAL_EXP}")
    return value


# --- the envelope ---------------------------------------------------------------------------------


_INF = float("inf")


class JsonCodec:
    """The default codec: the format-1 JSON envelope, no signature."""

    def dumps(self, entry: Entry) -> bytes:
        # An entry read from a tier and not yet converted holds the tagged form already.
        value = (
            _enc(entry.value, Any if entry.vtype is None else entry.vtype, 0) if entry.typed else entry.value
        )
        doc = {
            "tc": ENVELOPE_FORMAT,
            "k": entry.key,
            "v": value,
            "c": entry.created_at,
            "f": entry.fresh_until,
            "s": entry.stale_until,
            "t": list(entry.tags),
            "n": entry.version,
            "d": entry.delta,
        }
        declared = _declared_class_name(entry.vtype) if entry.typed else entry.vtype
        if declared is not None:
            doc["y"] = declared
        try:
            return orjson.dumps(doc)
        except TypeError as exc:  # a str with lone surrogates, for one
            raise SerializationError(
                f"cannot serialise value of type {type(entry.value).__qualname__} for key "
                f"{entry.key!r}: {exc}"
            ) from None

    def loads(self, data: bytes) -> Entry:
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise SerializationError("not a tiercache envelope: invalid JSON") from None
        return entry_from_document(doc)


def _declared_class_name(tp: Any) -> str | None:
    """``module:QualName`` when ``tp`` is a dataclass or pydantic model defined at module level:
    the envelope's ``y``, which lets a reader that declares no type still rebuild the class."""
    if not isinstance(tp, type) or "<locals>" in tp.__qualname__:
        return None
    if dataclasses.is_dataclass(tp) or callable(getattr(tp, "model_validate", None)):
        return f"{tp.__module__}:{tp.__qualname__}"
    return None


def _number(v: Any, name: str) -> float:
    if type(v) is float:  # what JsonCodec writes
        return v
    if type(v) is int:
        return float(v)
    raise SerializationError(f"not a tiercache envelope: field {name!r} is not a number")


def entry_from_document(doc: Any) -> Entry:
    """Validate a decoded envelope and build an (untyped) Entry; SerializationError if malformed.

    Every read below L1 lands here: one ``get`` per field, and exact type checks, which the
    envelopes JsonCodec writes pass at the first test. The value stays in its tagged JSON form
    until ``convert_entry`` decodes it for the caller's type."""
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
    declared = get("y")
    if declared is not None and type(declared) is not str:
        raise SerializationError("not a tiercache envelope: y is not a class name")
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
        vtype=declared,  # until converted: the class name the writer declared, if any
    )


# --- converters: tagged JSON form -> the caller's declared type, validated -----------------------

Check = Callable[[Any], Any]


class Converter:
    """Decodes the tagged JSON form of a value and checks (and rebuilds) it as type ``tp``.

    ``__call__`` raises SerializationError when the value does not have that type."""

    __slots__ = ("check", "decode", "tp")

    def __init__(self, tp: Any, check: Check | None) -> None:
        self.tp = tp
        self.check = check
        self.decode = _decoder_for(tp)

    def __call__(self, raw: Any) -> Any:
        return self.decode(raw)

    def __repr__(self) -> str:
        return f"Converter({_type_name(self.tp)})"


_converters: dict[Any, Converter] = {}
_checks: dict[Any, Check | None] = {}
_converters_lock = threading.Lock()


def converter_for(tp: Any) -> Converter:
    """The converter for declared type ``tp``, built once per type and cached.

    Raises SerializationError (a TypeError) for a type that cannot be checked or rebuilt."""
    try:
        return _converters[tp]
    except KeyError:
        pass
    except TypeError:  # unhashable annotation object
        return Converter(tp, _check_for(tp))
    conv = Converter(tp, _check_for(tp))
    with _converters_lock:
        _converters[tp] = conv
    return conv


def _check_for(tp: Any) -> Check | None:
    try:
        return _checks[tp]
    except KeyError:
        pass
    except TypeError:
        return _build(tp)
    _checks[tp] = None  # a recursive dataclass refers to itself: resolved lazily below
    check = _build(tp)
    _checks[tp] = check
    return check


# --- decoders: the common shapes decoded and checked in one pass over the raw JSON ---------------
# (anything else: the generic two passes, _untag then the type's check). Same results, same errors.

_decoders: dict[Any, Check] = {}
_LEAF_TAGS: dict[Any, str] = {
    Decimal: "$decimal",
    _dt.date: "$date",
    _dt.datetime: "$datetime",
    uuid.UUID: "$uuid",
    bytes: "$bytes",
}
_COLLECTION_TAGS: dict[Any, tuple[str, Callable[[Any], Any]]] = {
    set: ("$set", set),
    frozenset: ("$frozenset", frozenset),
}


def _untag0(raw: Any) -> Any:
    return _untag(raw, 0)


def _decoder_for(tp: Any) -> Check:
    try:
        return _decoders[tp]
    except KeyError:
        pass
    except TypeError:
        return _build_decoder(tp)
    _decoders[tp] = lambda raw: _decoders[tp](raw)  # a self-referencing dataclass: resolved later
    dec = _build_decoder(tp)
    _decoders[tp] = dec
    return dec


def _generic_decoder(tp: Any) -> Check:
    check = _check_for(tp)
    if check is None:
        return _untag0
    return lambda raw: check(_untag(raw, 0))


def _plain_object(raw: Any) -> bool:
    """A JSON object that is not a tagged one."""
    if type(raw) is not dict:
        return False
    if len(raw) == 1:
        first: str = next(iter(raw))
        return first[:1] != "$"
    return True


def _build_decoder(tp: Any) -> Check:
    generic = _generic_decoder(tp)
    if tp is int or tp is str or tp is bool:
        exact = tp

        def scalar(raw: Any) -> Any:
            return raw if type(raw) is exact else generic(raw)

        return scalar
    leaf_tag = _LEAF_TAGS.get(tp)
    if leaf_tag is not None:  # a tagged scalar of exactly this type

        def leaf(raw: Any) -> Any:
            if type(raw) is dict and len(raw) == 1 and leaf_tag in raw:
                return _untag_tagged(leaf_tag, raw[leaf_tag], 1)
            return generic(raw)

        return leaf
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _COLLECTION_TAGS and len(args) == 1:
        tag, build = _COLLECTION_TAGS[origin]
        element = _decoder_for(args[0])

        def collection(raw: Any) -> Any:
            if type(raw) is dict and len(raw) == 1 and type(raw.get(tag)) is list:
                try:
                    return build(element(x) for x in raw[tag])
                except TypeError as exc:  # an unhashable element
                    raise SerializationError(f"bad {tag} value: {exc}") from None
            return generic(raw)

        return collection
    if origin is list and len(args) == 1:
        item = _decoder_for(args[0])

        def items(raw: Any) -> Any:
            return [item(x) for x in raw] if type(raw) is list else generic(raw)

        return items
    if origin is dict and len(args) == 2 and args[0] is str:
        value = _decoder_for(args[1])

        def mapping(raw: Any) -> Any:
            return {k: value(x) for k, x in raw.items()} if _plain_object(raw) else generic(raw)

        return mapping
    if (origin is typing.Union or origin is types.UnionType) and len(args) == 2 and type(None) in args:
        (member,) = [a for a in args if a is not type(None)]
        some = _decoder_for(member)
        return lambda raw: None if raw is None else some(raw)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        names = frozenset(f.name for f in dataclasses.fields(tp))
        init = frozenset(f.name for f in dataclasses.fields(tp) if f.init)
        fields: list[tuple[str, Check]] = []

        def instance(raw: Any) -> Any:
            if not _plain_object(raw):
                return generic(raw)
            if not fields:
                fields.extend((n, _decoder_for(hints.get(n, Any))) for n in names)
            if not raw.keys() <= names:
                extra = sorted(raw.keys() - names)[0]
                raise SerializationError(f"{tp.__qualname__} has no field {extra!r}")
            return _rebuild(tp, init, {name: dec(raw[name]) for name, dec in fields if name in raw})

        return instance
    return generic


def _bad(v: Any, what: str) -> SerializationError:
    return SerializationError(f"expected {what}, found {type(v).__qualname__}")


def _instance_check(cls: type | tuple[type, ...], what: str) -> Check:
    def check(v: Any) -> Any:
        if not isinstance(v, cls):
            raise _bad(v, what)
        return v

    return check


def _build(tp: Any) -> Check | None:
    if tp is Any or tp is object:
        return None
    if tp is None or tp is type(None):
        return _instance_check(type(None), "None")
    if tp is float:
        return _instance_check((int, float), "a number")
    if tp is int:
        return _instance_check(int, "an int")
    if tp is bool:
        return _instance_check(bool, "a bool")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _check_for(args[0])
    if origin is typing.Literal:
        allowed = args

        def literal(v: Any) -> Any:
            if not any(type(v) is type(a) and v == a for a in allowed):
                raise SerializationError(f"expected one of {allowed!r}, found {v!r}")
            return v

        return literal
    if origin is typing.ClassVar or origin is typing.Final:
        return _check_for(args[0]) if args else None
    if origin is typing.Union or origin is types.UnionType:
        return _union_check(args)
    if isinstance(tp, typing.TypeVar) or tp is getattr(typing, "LiteralString", None):
        return None
    if isinstance(tp, typing.NewType):
        return _check_for(tp.__supertype__)
    if typing.is_typeddict(tp):
        return _instance_check(dict, f"a dict for {tp.__qualname__}")
    if origin is not None:
        return _generic_check(origin, args)
    if isinstance(tp, type):
        return _class_check(tp)
    raise SerializationError(f"cannot check values against the type {tp!r}")


def _union_check(args: tuple[Any, ...]) -> Check | None:
    checks = [_check_for(a) for a in args]
    if any(c is None for c in checks):
        return None

    def check(v: Any) -> Any:
        errors = []
        for c in checks:
            assert c is not None
            try:
                return c(v)
            except SerializationError as exc:
                errors.append(str(exc))
        raise SerializationError("no member of the union matches: " + "; ".join(errors))

    return check


_SEQUENCES = (list, cabc.Sequence, cabc.MutableSequence, cabc.Iterable, cabc.Collection)


def _generic_check(origin: Any, args: tuple[Any, ...]) -> Check | None:
    if origin is tuple:
        if not args:
            return _instance_check(tuple, "a tuple")
        if len(args) == 2 and args[1] is Ellipsis:
            return _each(tuple, "a tuple", _check_for(args[0]))
        if args == ((),):
            args = ()
        checks = [_check_for(a) for a in args]
        n = len(checks)

        def fixed(v: Any) -> Any:
            if type(v) is not tuple or len(v) != n:
                raise _bad(v, f"a tuple of {n}")
            return tuple(x if c is None else c(x) for c, x in zip(checks, v, strict=True))

        return fixed
    if origin in (dict, cabc.Mapping, cabc.MutableMapping):
        kc = _check_for(args[0]) if args else None
        vc = _check_for(args[1]) if len(args) > 1 else None

        def mapping(v: Any) -> Any:
            if type(v) is not dict:
                raise _bad(v, "a dict")
            if kc is None and vc is None:
                return v
            return {(k if kc is None else kc(k)): (x if vc is None else vc(x)) for k, x in v.items()}

        return mapping
    item = _check_for(args[0]) if args else None
    if origin is list:
        return _each(list, "a list", item)
    if origin is set or origin is cabc.MutableSet:
        return _each(set, "a set", item)
    if origin is frozenset:
        return _each(frozenset, "a frozenset", item)
    if origin is cabc.Set:
        return _each((set, frozenset), "a set", item)
    if origin in _SEQUENCES:
        return _each((list, tuple), "a sequence", item)
    if isinstance(origin, type):
        return _class_check(origin)
    raise SerializationError(f"cannot check values against the type {origin!r}{list(args)!r}")


def _each(cls: type | tuple[type, ...], what: str, item: Check | None) -> Check:
    def check(v: Any) -> Any:
        if not isinstance(v, cls) or isinstance(v, (str, bytes, dict)):
            raise _bad(v, what)
        if item is None:
            return v
        seq: Any = v
        return type(seq)(item(x) for x in seq)

    return check


def _class_check(tp: type) -> Check | None:
    if tp is str:
        return _instance_check(str, "a str")
    if tp is bytes or tp is bytearray:
        return _instance_check(bytes, "bytes")
    if tp is list:
        return _instance_check(list, "a list")
    if tp is dict:
        return _instance_check(dict, "a dict")
    if tp in (set, frozenset, tuple):
        return _instance_check(tp, f"a {tp.__name__}")
    if issubclass(tp, enum.Enum):
        _known.setdefault(f"{tp.__module__}:{tp.__qualname__}", tp)
        return _instance_check(tp, tp.__qualname__)
    if issubclass(tp, (_dt.date, _dt.time, _dt.timedelta, Decimal, uuid.UUID, int, float, str)):
        return _instance_check(tp, tp.__qualname__)
    if issubclass(tp, tuple) and hasattr(tp, "_fields"):  # NamedTuple
        _known.setdefault(f"{tp.__module__}:{tp.__qualname__}", tp)
        hints = _hints(tp)
        fields = [_check_for(hints.get(f, Any)) for f in tp._fields]

        def named(v: Any) -> Any:
            if type(v) is not tp:
                raise _bad(v, tp.__qualname__)
            if all(c is None for c in fields):
                return v
            return tp(*(x if c is None else c(x) for c, x in zip(fields, v, strict=True)))

        return named
    validate = getattr(tp, "model_validate", None)  # pydantic v2 model
    if validate is not None and callable(validate):
        _register_value_class(tp)

        def model(v: Any) -> Any:
            try:
                return validate(v)
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                raise SerializationError(f"not a valid {tp.__qualname__}: {exc}") from None

        return model
    if dataclasses.is_dataclass(tp):
        _register_value_class(tp)
        return _dataclass_check(tp)
    raise SerializationError(
        f"cannot rebuild values of type {tp.__qualname__}: use JSON types, tuple, set, bytes, "
        "datetime, Decimal, UUID, Enum, NamedTuple, a dataclass or a pydantic model"
    )


def _dataclass_check(tp: type) -> Check:
    hints = _hints(tp)
    names = {f.name for f in dataclasses.fields(tp)}
    init = frozenset(f.name for f in dataclasses.fields(tp) if f.init)
    # Field checks are looked up on first use: a dataclass may refer to itself.
    fields: list[tuple[str, Check | None]] = []

    def check(v: Any) -> Any:
        if type(v) is not dict:
            raise _bad(v, f"an object for {tp.__qualname__}")
        if not fields:
            fields.extend((n, _check_for(hints.get(n, Any))) for n in names)
        extra = v.keys() - names
        if extra:
            raise SerializationError(f"{tp.__qualname__} has no field {sorted(extra)[0]!r}")
        values = {name: (v[name] if c is None else c(v[name])) for name, c in fields if name in v}
        return _rebuild(tp, init, values)

    return check


def _rebuild(tp: type, init: frozenset[str], values: dict[str, Any]) -> Any:
    """A dataclass from its fields: ``init=False`` ones (written too, as they count in ``==``)
    are set after construction, as the writer's instance held them."""
    later = [(k, x) for k, x in values.items() if k not in init]
    for k, _ in later:
        del values[k]
    try:
        obj = tp(**values)
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"cannot rebuild {tp.__qualname__}: {exc}") from None
    for k, x in later:
        object.__setattr__(obj, k, x)  # frozen dataclasses too
    return obj


def loader_type(loader: Any) -> Any:
    """The declared return type of a loader (its annotation), or None when it has none.

    Resolved once per code object and raw annotation (a loader defined inside a function is a new
    function object on every call, with the same code and an equal annotation)."""
    fn = loader
    while isinstance(fn, functools.partial):
        fn = fn.func
    annotations = getattr(fn, "__annotations__", None)
    if not annotations:
        return None
    raw = annotations.get("return", None)
    if raw is None:
        return None
    code = getattr(fn, "__code__", None)
    cached = _loader_types.get(code) if code is not None else None
    if cached is not None and cached[0] == raw:
        return cached[1]
    try:
        tp = typing.get_type_hints(fn, include_extras=True).get("return")
    except Exception:
        tp = None  # a loader is no place for a configuration error: undeclared
    if tp is not None and typing.get_origin(tp) in (cabc.Awaitable, cabc.Coroutine):
        tp = typing.get_args(tp)[-1]
    if tp is not None:
        try:
            converter_for(tp)
        except SerializationError:  # not a type a value can be rebuilt as: undeclared
            tp = None
    if code is not None and len(_loader_types) < 4096:
        _loader_types[code] = (raw, tp)
    return tp


_loader_types: dict[Any, tuple[Any, Any]] = {}


def convert_entry(entry: Entry, conv: Converter | None) -> Entry:
    """The entry with its tagged JSON value decoded into the caller's type (SerializationError)."""
    if entry.typed:
        return entry
    try:
        if conv is None and isinstance(entry.vtype, str):  # no type asked: the writer's, if declared
            cls = _declared_value_class(entry.vtype)
            if cls is not None:
                conv = converter_for(cls)
        value = _untag(entry.value, 0) if conv is None else conv(entry.value)
    except SerializationError:
        raise
    except RecursionError:
        raise SerializationError(f"cached value for {entry.key!r} is nested too deeply") from None
    except Exception as exc:
        raise SerializationError(f"cannot rebuild the cached value for {entry.key!r}: {exc}") from None
    return entry.replace(
        value=value, typed=True, payload=entry.payload, vtype=None if conv is None else conv.tp
    )

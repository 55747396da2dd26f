"""Typed payloads: a handler's annotation says what the body is, and the body is decoded and
validated into it before the handler runs; published objects are encoded to JSON.

Everything is worked out once, when the handler is registered (:func:`handler_plan`): the
annotations are resolved with :func:`typing.get_type_hints`, and each type becomes a small
decoder. A handler taking only the :class:`~mqkit.Delivery` is returned as it is, so the bytes
path costs nothing extra.

Supported payload types: pydantic v2 models (pydantic is never imported here: a model's
class is recognised through the already imported module), dataclasses (required and unknown
keys checked, fields validated by type, nested dataclasses included), ``TypedDict`` (required
keys), ``dict``, ``list``, ``str`` (the body as UTF-8), ``bytes`` (the body untouched) and
``Any`` (the decoded JSON). A body that fails is dead-lettered once with a
:class:`~mqkit.SerializationError` carrying the detail, never retried.

Added in 0.3.0.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import json
import sys
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

from mqkit.codecs import Codec, JsonCodec
from mqkit.errors import NonRetryable, SerializationError
from mqkit.message import _NO_VALUE, Delivery

__all__ = ["HandlerPlan", "adapt_handler", "encode_body", "handler_plan"]

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"

_json = JsonCodec()
_NoneType = type(None)

Convert = Callable[[Any, str], Any]
"""Validate/convert a decoded JSON value (second argument: where it is, for messages)."""


# ------------------------------------------------------------------ encoding (publish)
def _pydantic_model_class() -> type | None:
    module = sys.modules.get("pydantic")
    return getattr(module, "BaseModel", None) if module is not None else None


def encode_body(value: object) -> tuple[bytes, str]:
    """The body and ``content-type`` of a published object that is not bytes.

    pydantic models: ``model_dump_json()``; dataclasses, dicts, lists and tuples: compact JSON
    (with :class:`~mqkit.JsonCodec`'s conversions for dates, UUIDs, decimals, enums);
    ``str``: its UTF-8 bytes as ``text/plain; charset=utf-8``.

    Raises:
        SerializationError: any other type, or a value inside that JSON cannot encode.
    """
    if isinstance(value, str):
        return value.encode(), TEXT
    model = _pydantic_model_class()
    if model is not None and isinstance(value, model):
        return value.model_dump_json().encode(), JSON  # type: ignore[attr-defined]
    if isinstance(value, dict | list | tuple) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type)
    ):
        try:
            return _json.encode(value), JSON
        except (TypeError, ValueError) as exc:
            raise SerializationError(
                f"cannot JSON-encode the {type(value).__name__} body: {exc}"
            ) from exc
    raise SerializationError(
        f"message body must be bytes, a pydantic model, a dataclass, a dict, a list or a str; "
        f"got {type(value).__name__}: encode it first (for example json.dumps(obj).encode()) "
        "or pass a codec"
    )


# ------------------------------------------------------------------ converters (consume)
def _fail(where: str, text: str) -> SerializationError:
    return SerializationError(f"{where}: {text}" if where else text)


def _name(tp: Any) -> str:
    return getattr(tp, "__qualname__", None) or repr(tp)


def _is_typeddict(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__required_keys__")


def _is_pydantic(tp: Any) -> bool:
    model = _pydantic_model_class()
    return model is not None and isinstance(tp, type) and issubclass(tp, model)


def _any(value: Any, where: str) -> Any:
    return value


def _scalar(tp: type) -> Convert:
    label = tp.__name__

    def convert(value: Any, where: str) -> Any:
        if value.__class__ is tp:
            return value
        if tp is float and value.__class__ is int:
            return float(value)
        raise _fail(where, f"expected {label}, got {type(value).__name__} {value!r:.60}")

    return convert


def converter(tp: Any, owner: str = "payload") -> Convert:
    """A converter for ``tp`` (built once).

    Raises:
        TypeError: ``tp`` is a type mqkit cannot validate a payload into.
    """
    if tp is Any or tp is object:
        return _any
    if tp in (int, float, str, bool):
        return _scalar(tp)
    if tp is None or tp is _NoneType:

        def none(value: Any, where: str) -> Any:
            if value is not None:
                raise _fail(where, f"expected null, got {value!r:.60}")
            return None

        return none
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is list or origin is list:
        item = converter(args[0], owner) if args else _any
        return _sequence(item)
    if tp is dict or origin is dict:
        val = converter(args[1], owner) if len(args) == 2 else _any
        return _mapping(val)
    if origin is Union or origin is types.UnionType:
        options = [converter(a, owner) for a in args]

        def union(value: Any, where: str) -> Any:
            errors = []
            for option in options:
                try:
                    return option(value, where)
                except SerializationError as exc:
                    errors.append(str(exc))
            raise _fail("", " or ".join(errors))

        return union
    if origin is Literal:
        allowed = args

        def literal(value: Any, where: str) -> Any:
            if value not in allowed:
                raise _fail(where, f"expected one of {allowed!r}, got {value!r:.60}")
            return value

        return literal
    if isinstance(tp, type) and issubclass(tp, enum.Enum):

        def member(value: Any, where: str) -> Any:
            try:
                return tp(value)
            except ValueError:
                raise _fail(where, f"{value!r:.60} is not a {tp.__name__}") from None

        return member
    if _is_pydantic(tp):
        return _pydantic(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        conv = _dataclass(tp)
        _resolve_now(conv)  # nested ones too, so a bad annotation fails at registration
        return conv
    if _is_typeddict(tp):
        return _typeddict(tp)
    raise TypeError(
        f"{owner}: mqkit cannot validate a payload into {_name(tp)}: use a pydantic model, a "
        "dataclass, a TypedDict, dict, list, str, bytes or Any (or take the mqkit.Delivery and "
        "decode delivery.body yourself)"
    )


def _sequence(item: Convert) -> Convert:
    plain = item is _any

    def convert(value: Any, where: str) -> Any:
        if value.__class__ is not list:
            raise _fail(where, f"expected a list, got {type(value).__name__}")
        if plain:
            return value
        return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]

    return convert


def _mapping(val: Convert) -> Convert:
    plain = val is _any

    def convert(value: Any, where: str) -> Any:
        if value.__class__ is not dict:
            raise _fail(where, f"expected an object, got {type(value).__name__}")
        if plain:
            return value
        return {k: val(v, f"{where}.{k}") for k, v in value.items()}

    return convert


def _pydantic(tp: Any) -> Convert:
    validate = tp.model_validate

    def convert(value: Any, where: str) -> Any:
        try:
            return validate(value)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise _fail(where, f"{tp.__name__} validation failed: {_detail(exc)}") from exc

    return convert


def _detail(exc: ValueError) -> str:
    """A pydantic ValidationError as ``field: message; ...`` (no documentation links)."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    try:
        items = errors(include_url=False)
    except TypeError:
        return str(exc)
    return "; ".join(
        f"{'.'.join(map(str, e.get('loc', ()))) or '(root)'}: {e.get('msg', '')}" for e in items
    )


@functools.cache
def _dataclass(tp: type) -> Convert:
    fields: dict[str, Convert] = {}
    required: set[str] = set()
    scalars: dict[str, type] = {}  # fields whose value passes as is when of exactly this type
    hints: Mapping[str, Any] = {}

    def build() -> None:  # deferred: a dataclass may refer to itself
        nonlocal hints
        try:
            hints = typing.get_type_hints(tp)
        except NameError as exc:
            raise TypeError(
                f"dataclass {tp.__qualname__}: annotation {exc.name!r} cannot be resolved"
            ) from None
        for f in dataclasses.fields(tp):
            if not f.init:
                continue
            hint = hints.get(f.name, Any)
            fields[f.name] = converter(hint, f"{tp.__qualname__}.{f.name}")
            if hint in (int, float, str, bool):
                scalars[f.name] = hint
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.add(f.name)

    def convert(value: Any, where: str) -> Any:
        if value.__class__ is not dict:
            raise _fail(where, f"expected an object for {tp.__name__}, got {type(value).__name__}")
        keys = value.keys()
        if keys != fields.keys():  # every field given: no set arithmetic on the common path
            unknown = keys - fields.keys()
            if unknown:
                raise _fail(
                    where, f"{tp.__name__} has no field {', '.join(map(repr, sorted(unknown)))}"
                )
            missing = required - keys
            if missing:
                raise _fail(
                    where,
                    f"{tp.__name__} misses required {', '.join(map(repr, sorted(missing)))}",
                )
        kwargs = {}
        for k, v in value.items():
            exact = scalars.get(k)
            if exact is not None and v.__class__ is exact:  # the common case, inline
                kwargs[k] = v
            else:
                kwargs[k] = fields[k](v, f"{where}.{k}" if where else k)
        return tp(**kwargs)

    build_once = [build]

    def first(value: Any, where: str) -> Any:
        if build_once:
            build_once.pop()()
        return convert(value, where)

    # fields are resolved now (at registration); nested references resolve on first use
    first.build = build_once  # type: ignore[attr-defined]
    return first


def _resolve_now(conv: Convert) -> None:
    pending = getattr(conv, "build", None)
    if pending:
        pending.pop()()


def _typeddict(tp: Any) -> Convert:
    required = frozenset(tp.__required_keys__)
    name = tp.__name__

    def convert(value: Any, where: str) -> Any:
        if value.__class__ is not dict:
            raise _fail(where, f"expected an object for {name}, got {type(value).__name__}")
        missing = required - value.keys()
        if missing:
            raise _fail(where, f"{name} misses required {', '.join(map(repr, sorted(missing)))}")
        return value

    return convert


# ------------------------------------------------------------------ handler plans
Decode = Callable[[Delivery], Any]


@dataclass(frozen=True, slots=True)
class HandlerPlan:
    """How a handler is called, worked out at registration.

    Attributes:
        payload: the payload annotation (None: the handler takes the delivery only).
        decode: body (or the codec's value) to the payload, raising SerializationError.
        delivery: the delivery parameter: its position, its name for a keyword-only one, or
            None when the handler does not take it.
    """

    payload: Any
    decode: Decode | None
    delivery: int | str | None


def _is_delivery(tp: Any, batch: bool) -> bool:
    if batch:
        return typing.get_origin(tp) is list and typing.get_args(tp) in ((Delivery,),)
    return tp is Delivery


def _raw_is_delivery(raw: Any, batch: bool) -> bool:
    text = raw if isinstance(raw, str) else getattr(raw, "__name__", "")
    text = text.replace(" ", "")
    return text.endswith("Delivery]") if batch else text.endswith("Delivery")


def _target(handler: Any) -> Any:
    while isinstance(handler, functools.partial):
        handler = handler.func
    if not (inspect.isfunction(handler) or inspect.ismethod(handler)):
        call = getattr(type(handler), "__call__", None)  # noqa: B004
        if call is not None and not isinstance(handler, type):
            return call
    return handler


def handler_plan(handler: Any, *, batch: bool = False, name: str = "") -> HandlerPlan | None:
    """Resolve ``handler``'s annotations: None for a handler taking only the delivery (a list
    of them with ``batch``), else the :class:`HandlerPlan` of a typed one.

    The first required positional parameter is the payload when its annotation is not
    ``mqkit.Delivery`` (``list[mqkit.Delivery]`` for batches; unannotated: the delivery); the
    delivery may follow it, recognised by its annotation (positional or keyword).

    Raises:
        TypeError: an annotation that cannot be resolved (named), an unsupported payload type,
            or parameters that are not (payload[, delivery]).
    """
    try:
        sig = inspect.signature(handler)
    except (TypeError, ValueError):
        return None  # builtins and some C callables: nothing to plan
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        return None  # (*args) and friends: the one-argument check decides
    first = positional[0]
    raw = first.annotation
    if raw is inspect.Parameter.empty:
        return None
    hints = _hints(handler, name)
    if hints is None:  # unresolvable: fine only for a delivery handler
        if _raw_is_delivery(raw, batch):
            return None
        unresolved = raw if isinstance(raw, str) else _name(raw)
        raise TypeError(
            f"handler {name}: the annotation {unresolved!r} of {first.name!r} cannot be "
            "resolved: import it at module level (not only under TYPE_CHECKING)"
        )
    tp = hints.get(first.name, raw)
    if _is_delivery(tp, batch) or (batch and tp is list):
        return None
    # `async def h(d: Any)` has always meant the delivery; Any is the payload only when a
    # delivery parameter follows it
    if (tp is Any or tp is object) and not any(
        _is_delivery(hints.get(p.name, p.annotation), batch) for p in params[1:]
    ):
        return None
    what = "list[mqkit.Delivery]" if batch else "mqkit.Delivery"
    if batch:
        if typing.get_origin(tp) is not list:
            raise TypeError(
                f"handler {name}: a batch handler's payload parameter {first.name!r} must be "
                f"list[YourType] (or {what}), got {_name(tp)}"
            )
        (item,) = typing.get_args(tp) or (Any,)
    else:
        item = tp
    delivery: int | str | None = None
    for index, p in enumerate(params[1:], start=1):
        ptp = hints.get(p.name, p.annotation)
        if _is_delivery(ptp, batch):
            delivery = index if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else p.name
            if p.kind is p.VAR_POSITIONAL or p.kind is p.VAR_KEYWORD:
                delivery = None
                continue
            break
    for p in params[1:]:
        taken = delivery == p.name or (isinstance(delivery, int) and params[delivery] is p)
        if not taken and p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(
                f"handler {name}{sig}: parameter {p.name!r} has no default; a typed handler "
                f"takes the payload and optionally the delivery (annotated {what})"
            )
    return HandlerPlan(tp, _decoder(item, f"handler {name}"), delivery)


def _hints(handler: Any, name: str) -> dict[str, Any] | None:
    target = _target(handler)
    try:
        return typing.get_type_hints(target)
    except NameError:
        return None
    except Exception:
        return {}


def _decoder(tp: Any, owner: str) -> Decode:
    if tp is bytes:
        return _body
    if tp is str:
        return _text
    convert = converter(tp, owner)
    _resolve_now(convert)
    if _is_pydantic(tp):
        from_json = tp.model_validate_json

        def pydantic_json(d: Delivery) -> Any:
            if d._value is not _NO_VALUE:  # the consumer's codec decoded it
                return convert(d._value, "")
            try:
                return from_json(d.body)
            except ValueError as exc:
                text = f"{tp.__name__} validation failed: {_detail(exc)}"
                raise SerializationError(text) from exc

        return pydantic_json

    def decode(d: Delivery) -> Any:
        return convert(_value(d), "")

    return decode


def _body(d: Delivery) -> Any:
    return d.body


def _text(d: Delivery) -> Any:
    try:
        return d.body.decode()
    except UnicodeDecodeError as exc:
        raise SerializationError(f"the body is not UTF-8 text: {exc}") from exc


def _value(d: Delivery) -> Any:
    """The codec's value when the consumer has one, else the body as JSON."""
    if d._value is not _NO_VALUE:
        return d._value
    try:
        return json.loads(d.body)
    except ValueError as exc:
        raise SerializationError(f"the body is not JSON: {exc}") from exc


def _marker(exc: SerializationError) -> NonRetryable:
    marker = NonRetryable("invalid payload")
    marker.__cause__ = exc
    return marker


def adapt_handler(
    handler: Callable[..., Awaitable[Any]],
    *,
    batch: bool = False,
    codec: Codec | None = None,
) -> Callable[..., Awaitable[Any]]:
    """The handler as the pipeline calls it: unchanged when it takes the delivery, else a
    wrapper that decodes and validates the payload first (a failure raises a
    :class:`~mqkit.NonRetryable` caused by the :class:`~mqkit.SerializationError`, so it is
    dead-lettered once).

    Raises:
        TypeError: see :func:`handler_plan`.
    """
    name = getattr(_target(handler), "__qualname__", None) or type(handler).__name__
    plan = handler_plan(handler, batch=batch, name=name)
    if plan is None:
        return handler
    assert plan.decode is not None
    decode = plan.decode
    pos = plan.delivery
    if batch:
        return _batch_adapter(handler, decode, pos)
    if pos is None:

        async def payload_only(d: Delivery) -> Any:
            try:
                value = decode(d)
            except SerializationError as exc:
                raise _marker(exc) from exc
            return await handler(value)

        return payload_only
    if pos == 1:

        async def with_delivery(d: Delivery) -> Any:
            try:
                value = decode(d)
            except SerializationError as exc:
                raise _marker(exc) from exc
            return await handler(value, d)

        return with_delivery
    if isinstance(pos, str):
        key = pos

        async def keyword(d: Delivery) -> Any:
            try:
                value = decode(d)
            except SerializationError as exc:
                raise _marker(exc) from exc
            return await handler(value, **{key: d})

        return keyword
    raise TypeError(
        f"handler {name}: put the delivery parameter right after the payload, or make it "
        "keyword-only"
    )


def _batch_adapter(
    handler: Callable[..., Awaitable[Any]], decode: Decode, pos: int | str | None
) -> Callable[[list[Delivery]], Awaitable[Any]]:
    from mqkit.pipeline.workers import BatchFailure

    async def call(items: list[Delivery]) -> None:
        values: list[Any] = []
        good: list[Delivery] = []
        failures: dict[Delivery, BaseException] = {}
        for d in items:
            try:
                values.append(decode(d))
            except SerializationError as exc:
                failures[d] = _marker(exc)
                continue
            good.append(d)
        if good:
            try:
                if pos is None:
                    await handler(values)
                elif isinstance(pos, str):
                    await handler(values, **{pos: good})
                else:
                    await handler(values, good)
            except BatchFailure as bf:
                failures.update(bf.failures)
            except Exception as exc:
                failures.update(dict.fromkeys(good, exc))
        if failures:
            raise BatchFailure(failures)

    return call

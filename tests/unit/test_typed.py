"""Typed payloads (mqkit.payloads): handlers annotated with a model get validated objects; a
body that fails is dead-lettered once with a SerializationError; publish encodes objects."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from typing import Any, TypedDict

import pydantic
import pytest

import mqkit
from mqkit.payloads import adapt_handler, encode_body, handler_plan

T = 5.0


class Order(pydantic.BaseModel):
    id: int
    total: float


@dataclasses.dataclass
class Line:
    sku: str
    qty: int = 1


@dataclasses.dataclass
class Basket:
    owner: str
    lines: list[Line]
    note: str | None = None


class Point(TypedDict):
    x: int
    y: int


def url() -> str:
    return f"memory://{uuid.uuid4().hex}"


class Outcomes(mqkit.Middleware):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_outcome(self, delivery: mqkit.Delivery, outcome: Any) -> None:
        if delivery.topic == "orders":  # not the dead-letter reader's acks
            self.seen.append(outcome)


async def serve(
    broker: mqkit.Broker,
    topic: str,
    handler: Any,
    bodies: list[Any],
    *,
    expect: int,
    **options: Any,
) -> tuple[list[Any], list[mqkit.Delivery]]:
    """Publish ``bodies``, run ``handler`` until it was called ``expect`` times, and return
    what it got and what reached the dead-letter topic."""
    await broker.declare(topic, groups=["g"])
    await broker.declare(f"{topic}-dlq", groups=["g"])
    for body in bodies:
        await broker.publish(topic, body, key="k")
    got: list[Any] = []
    done = asyncio.Event()

    async def record(*args: Any, **kwargs: Any) -> None:
        got.append(args + tuple(kwargs.values()))
        if len(got) >= expect:
            done.set()

    consumer = broker.consumer(topic, "g", dead_letter=f"{topic}-dlq", **options)
    run = asyncio.create_task(consumer.run(handler(record)))
    async with asyncio.timeout(T):
        await done.wait()
    dead: list[mqkit.Delivery] = []
    async with broker.consumer(f"{topic}-dlq", "g") as dc:
        while (d := await dc.receive(timeout=0.3)) is not None:
            dead.append(d)
            await d.ack()
    await consumer.close()
    await run
    return got, dead


# ---------------------------------------------------------------- consuming
async def test_pydantic_model_with_delivery_and_dead_letter_once() -> None:
    outcomes = Outcomes()
    calls = 0

    def make(record: Any) -> Any:
        async def handle(order: Order, delivery: mqkit.Delivery) -> None:
            nonlocal calls
            calls += 1
            await record(order, delivery.headers.get("content-type"))

        return handle

    async with mqkit.connect(url(), middleware=[outcomes]) as b:
        got, dead = await serve(
            b,
            "orders",
            make,
            [Order(id=1, total=2.5), {"id": "x"}, b'{"id": 3, "total": 4}'],
            expect=2,
            retry=mqkit.Retry(attempts=3, initial_delay=0.01),
        )
    assert got == [(Order(id=1, total=2.5), "application/json"), (Order(id=3, total=4.0), None)]
    assert calls == 2
    (d,) = dead
    assert d.body == b'{"id":"x"}'
    assert d.headers["x-mqkit-error-type"] == "SerializationError"
    assert d.headers["x-mqkit-attempts"] == "1"  # never retried
    assert "id: Input should be a valid integer" in d.headers["x-mqkit-error-message"]
    assert "total: Field required" in d.headers["x-mqkit-error-message"]
    assert sorted(outcomes.seen) == ["acked", "acked", "dead_lettered"]


async def test_dataclass_nested_and_field_validation() -> None:
    def make(record: Any) -> Any:
        async def handle(basket: Basket) -> None:
            await record(basket)

        return handle

    good = {"owner": "ann", "lines": [{"sku": "a", "qty": 2}, {"sku": "b"}]}
    async with mqkit.connect(url()) as b:
        got, dead = await serve(
            b,
            "baskets",
            make,
            [
                good,
                {"owner": "bob"},  # missing required
                {"owner": "cy", "lines": [], "colour": "red"},  # unknown key
                {"owner": "di", "lines": [{"sku": "a", "qty": "2"}]},  # wrong nested type
                b"not json",
            ],
            expect=1,
        )
    assert got == [(Basket("ann", [Line("a", 2), Line("b", 1)]),)]
    errors = sorted(d.headers["x-mqkit-error-message"] for d in dead)
    assert len(errors) == 4
    assert all(d.headers["x-mqkit-error-type"] == "SerializationError" for d in dead)
    assert any("misses required 'lines'" in e for e in errors)
    assert any("has no field 'colour'" in e for e in errors)
    assert any("lines[0].qty: expected int" in e for e in errors)
    assert any("not JSON" in e for e in errors)


@pytest.mark.parametrize(
    ("annotation", "body", "expected"),
    [
        (dict, b'{"a": 1}', {"a": 1}),
        (list, b"[1, 2]", [1, 2]),
        (str, "héllo".encode(), "héllo"),
        (bytes, b"\xff raw", b"\xff raw"),
        (Point, b'{"x": 1, "y": 2}', {"x": 1, "y": 2}),
        (dict[str, int], b'{"a": 1}', {"a": 1}),
    ],
)
async def test_plain_types(annotation: Any, body: bytes, expected: Any) -> None:
    def make(record: Any) -> Any:
        async def handle(value: Any) -> None:
            await record(value)

        handle.__annotations__ = {"value": annotation, "return": None}
        return handle

    async with mqkit.connect(url()) as b:
        got, dead = await serve(b, "plain", make, [body], expect=1)
    assert got == [(expected,)]
    assert dead == []


@pytest.mark.parametrize(
    ("annotation", "body"),
    [
        (dict, b"[1]"),
        (list, b'{"a": 1}'),
        (str, b"\xff"),
        (Point, b'{"x": 1}'),
        (dict[str, int], b'{"a": "1"}'),
    ],
)
async def test_plain_types_refused(annotation: Any, body: bytes) -> None:
    def make(record: Any) -> Any:
        async def handle(value: Any) -> None:
            await record(value)

        handle.__annotations__ = {"value": annotation, "return": None}
        return handle

    async with mqkit.connect(url()) as b:
        await b.declare("bad", groups=["g"])
        await b.declare("bad-dlq", groups=["g"])
        await b.publish("bad", body)
        consumer = b.consumer("bad", "g", dead_letter="bad-dlq")
        run = asyncio.create_task(consumer.run(make(None)))
        async with b.consumer("bad-dlq", "g") as dc:
            d = await dc.receive(timeout=T)
        await consumer.close()
        await run
    assert d is not None
    assert d.body == body
    assert d.headers["x-mqkit-error-type"] == "SerializationError"


async def test_codec_value_is_validated() -> None:
    class Upper:
        content_type = "application/json"

        def encode(self, value: Any) -> bytes:
            return json.dumps(value).encode()

        def decode(self, body: bytes) -> Any:
            return {k.lower(): v for k, v in json.loads(body).items()}

    def make(record: Any) -> Any:
        async def handle(order: Order) -> None:
            await record(order)

        return handle

    async with mqkit.connect(url()) as b:
        got, _ = await serve(b, "codec", make, [b'{"ID": 5, "TOTAL": 1}'], expect=1, codec=Upper())
    assert got == [(Order(id=5, total=1.0),)]


async def test_batch_handler_takes_models_and_deliveries() -> None:
    def make(record: Any) -> Any:
        async def handle(orders: list[Order], deliveries: list[mqkit.Delivery]) -> None:
            assert len(orders) == len(deliveries)
            for o in orders:
                await record(o)

        return handle

    bodies = [Order(id=i, total=i).model_dump_json().encode() for i in range(4)]
    bodies.insert(2, b'{"id": "bad"}')
    async with mqkit.connect(url()) as b:
        got, dead = await serve(
            b, "batched", make, bodies, expect=4, batch=mqkit.Batch(max_messages=10, max_delay=0.05)
        )
    assert sorted(o.id for (o,) in got) == [0, 1, 2, 3]
    (d,) = dead
    assert d.body == b'{"id": "bad"}'
    assert d.headers["x-mqkit-attempts"] == "1"


async def test_delivery_keyword_only_and_partial_order() -> None:
    seen: list[Any] = []

    async def handle(order: Order, *, delivery: mqkit.Delivery) -> None:
        seen.append((order.id, delivery.topic))

    adapted = adapt_handler(handle)
    async with mqkit.connect(url()) as b:
        await b.declare("kw", groups=["g"])
        await b.publish("kw", Order(id=9, total=1))
        async with b.consumer("kw", "g") as c:
            d = await c.receive(timeout=T)
            assert d is not None
            await adapted(d)
            await d.ack()
    assert seen == [(9, "kw")]


# ---------------------------------------------------------------- registration
async def _delivery_only(delivery: mqkit.Delivery) -> None: ...


async def _unannotated(d):  # type: ignore[no-untyped-def]
    ...


async def _any(d: Any) -> None: ...


def test_delivery_handlers_are_unchanged() -> None:
    for fn in (_delivery_only, _unannotated, _any):
        assert handler_plan(fn) is None
        assert adapt_handler(fn) is fn
        mqkit.registration.check_handler(fn)

    async def batch(ds: list[mqkit.Delivery]) -> None: ...

    assert adapt_handler(batch, batch=True) is batch


def test_unresolvable_annotation_is_a_type_error_naming_it() -> None:
    async def handle(order: NoSuchModel) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(TypeError, match="NoSuchModel"):
        mqkit.registration.check_handler(handle)


def test_unsupported_annotation_and_shapes_refused_at_registration() -> None:
    async def weird(value: set[int]) -> None: ...

    async def extra(order: Order, other: int) -> None: ...

    def not_async(order: Order) -> None: ...

    async def batch_not_list(order: Order) -> None: ...

    with pytest.raises(TypeError, match="cannot validate a payload"):
        mqkit.registration.check_handler(weird)
    with pytest.raises(TypeError, match="'other' has no default"):
        mqkit.registration.check_handler(extra)
    with pytest.raises(TypeError, match="not an async function"):
        mqkit.registration.check_handler(not_async)
    with pytest.raises(TypeError, match=r"list\[YourType\]"):
        mqkit.registration.check_handler(batch_not_list, batch=True)
    router = mqkit.Router()
    with pytest.raises(TypeError, match="cannot validate"):
        router.subscribe("t", "g")(weird)


def test_typed_handler_registers_on_router() -> None:
    router = mqkit.Router()

    @router.subscribe("orders", "g")
    async def handle(order: Order, delivery: mqkit.Delivery) -> None: ...

    assert router.subscriptions[0].handler is handle


# ---------------------------------------------------------------- publishing
def test_encode_body() -> None:
    assert encode_body(Order(id=1, total=2)) == (b'{"id":1,"total":2.0}', "application/json")
    assert encode_body(Line("a")) == (b'{"sku":"a","qty":1}', "application/json")
    assert encode_body({"a": [1]}) == (b'{"a":[1]}', "application/json")
    assert encode_body([1, "ü"]) == ('[1,"ü"]'.encode(), "application/json")
    assert encode_body("hé") == ("hé".encode(), "text/plain; charset=utf-8")
    for bad in (None, 3, object()):
        with pytest.raises(mqkit.SerializationError, match="must be bytes, a pydantic model"):
            encode_body(bad)


async def test_send_and_send_many_encode_objects() -> None:
    async with mqkit.connect(url()) as b:
        await b.declare("out", groups=["g"])
        async with b.producer() as p:
            await p.send("out", Line("x"), headers={"content-type": "application/vnd.x+json"})
            await p.send_many("out", [b"raw", {"a": 1}, mqkit.Message(body=[2])])  # type: ignore[call-arg]
        async with b.consumer("out", "g") as c:
            got = []
            for _ in range(4):
                d = await c.receive(timeout=T)
                assert d is not None
                got.append((d.body, d.headers.get("content-type")))
                await d.ack()
    assert sorted(got, key=repr) == sorted(
        [
            (b'{"sku":"x","qty":1}', "application/vnd.x+json"),  # the caller's header wins
            (b"raw", None),
            (b'{"a":1}', "application/json"),
            (b"[2]", "application/json"),
        ],
        key=repr,
    )

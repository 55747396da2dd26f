"""mqkit.pipeline.ledger.Ledger: prefetch slots, settling once, bulk acks, hand-backs (no loop,
no broker: plain bookkeeping)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mqkit.message import Delivery, Incoming
from mqkit.pipeline.ledger import Ledger


def inc(i: int, key: str | None = None) -> Incoming:
    return Incoming(topic="t", body=f"m{i}".encode(), key=key, headers={}, id=f"id{i}")


def test_admit_takes_slots_and_wakes() -> None:
    ledger = Ledger(prefetch=4, ordered=False, group="g", settler=None)
    assert ledger.free == 4 and not ledger.wake.is_set()
    ledger.admit([inc(0), inc(1), inc(2)])
    assert (ledger.held, ledger.free) == (3, 1)
    assert ledger.wake.is_set()
    d = ledger.take()
    assert isinstance(d, Delivery) and d.id == "id0" and d.group == "g"


def test_ack_settles_once_and_buffers_for_one_bulk_ack() -> None:
    ledger = Ledger(prefetch=2, ordered=False, group="g", settler=None)
    ledger.admit([inc(0), inc(1)])
    a, b = ledger.take(), ledger.take()
    assert a is not None and b is not None
    ledger.room.clear()
    assert ledger.ack(a) is True
    assert ledger.ack(a) is False  # a second ack changes nothing
    assert ledger.settle(a) is False
    assert ledger.room.is_set() and ledger.ack_ready.is_set()
    assert a.settled and ledger.held == 1
    assert ledger.ack(b) is True
    assert [m.id for m in ledger.take_acks()] == ["id0", "id1"]
    assert ledger.take_acks() == []


def test_hand_back_sets_the_attempts_spent() -> None:
    ledger = Ledger(prefetch=2, ordered=False, group="g", settler=None)
    ledger.admit([inc(0)])
    d = ledger.take()
    assert d is not None
    d.attempt = 3
    message = ledger.hand_back(d, made=2)
    assert message is not None and message.attempt == 2
    assert ledger.hand_back(d, made=2) is None
    assert ledger.held == 0 and ledger.acks == []


def test_ordered_settle_releases_the_next_of_the_key() -> None:
    ledger = Ledger(prefetch=8, ordered=True, group="g", settler=None)
    ledger.admit([inc(0, "k"), inc(1, "k"), inc(2, "j")])
    first = ledger.take()
    other = ledger.take()
    assert first is not None and other is not None
    assert (first.id, other.id) == ("id0", "id2")
    assert ledger.take() is None  # id1 waits behind id0
    ledger.wake.clear()
    ledger.ack(first)
    assert ledger.wake.is_set()
    nxt = ledger.take()
    assert nxt is not None and nxt.id == "id1"


def test_retry_again_keeps_the_key_busy() -> None:
    ledger = Ledger(prefetch=8, ordered=True, group="g", settler=None)
    ledger.admit([inc(0, "k"), inc(1, "k")])
    d = ledger.take()
    assert d is not None
    ledger.again(d)  # its retry delay is over
    assert ledger.take() is d
    assert ledger.take() is None


def test_drain_returns_everything_not_taken() -> None:
    ledger = Ledger(prefetch=8, ordered=True, group="g", settler=None)
    ledger.admit([inc(0, "k"), inc(1, "k"), inc(2)])
    taken = ledger.take()
    assert taken is not None and taken.id == "id0"
    assert sorted(d.id for d in ledger.drain()) == ["id1", "id2"]


@settings(max_examples=200, deadline=None)
@given(
    prefetch=st.integers(1, 8),
    ops=st.lists(st.sampled_from(["fetch", "take", "ack", "back", "settle"]), max_size=60),
    ordered=st.booleans(),
)
def test_held_never_exceeds_prefetch_and_counts_unsettled(
    prefetch: int, ops: list[str], ordered: bool
) -> None:
    ledger = Ledger(prefetch=prefetch, ordered=ordered, group="g", settler=None)
    taken: list[Delivery] = []
    admitted = settled = 0
    for n, op in enumerate(ops):
        if op == "fetch" and ledger.free > 0:
            batch = [inc(n * 10 + i, f"k{i % 2}") for i in range(ledger.free)]
            ledger.admit(batch)
            admitted += len(batch)
        elif op == "take":
            d = ledger.take()
            if d is not None:
                taken.append(d)
        elif taken:
            d = taken.pop(0)
            if op == "ack":
                changed = ledger.ack(d)
            elif op == "back":
                changed = ledger.hand_back(d, made=1) is not None
            else:
                changed = ledger.settle(d)
            settled += changed
        assert 0 <= ledger.held <= prefetch
        assert ledger.held == admitted - settled


def test_a_wrapped_delivery_reads_the_message_and_counts_attempts_itself() -> None:
    ledger = Ledger(prefetch=2, ordered=False, group="g", settler=None)
    m = Incoming(
        topic="t", body=b"x", key="k", headers={}, id="id0", attempt=2, offset=7, token="tok"
    )
    ledger.admit([m])
    d = ledger.take()
    assert d is not None and d is not m and d._incoming is m
    assert (d.topic, d.body, d.key, d.id, d.offset, d.token) == ("t", b"x", "k", "id0", 7, "tok")
    assert dict(d.headers) == {} and d.attempt == 2 and d.group == "g"
    d.attempt += 1  # an in-process retry: the adapter's message keeps the broker's count
    assert m.attempt == 2
    assert ledger.ack(d) and ledger.take_acks() == [m]


def test_built_deliveries_are_admitted_and_acked_as_themselves() -> None:
    ledger = Ledger(prefetch=2, ordered=True, group="g", settler=None)
    ledger.bind(settler=None, built=True)
    made = [
        ledger.delivery("t", b"a", "k", {"x-mqkit-attempt": "3"}, "id0", 1, token=0),
        ledger.delivery("t", b"b", "k", {}, "id1", 2, token=1),
    ]
    ledger.admit(made)
    first = ledger.take()
    assert first is made[0] and first._incoming is first and first.group == "g"
    assert first.attempt == 3, "the attempt header still counts"
    assert ledger.take() is None, "same key: the second waits for the first"
    assert ledger.ack(first) and ledger.take_acks() == [first]
    second = ledger.take()
    assert second is made[1] and second.attempt == 2
    back = ledger.hand_back(second, made=1)
    assert back is second and second.attempt == 1


def test_a_delivery_made_by_hand_settles_nowhere() -> None:
    import asyncio

    d = Delivery("t", b"body", None, {}, "id9", timestamp=1.5)
    assert (d.group, d.attempt, d.timestamp, d.value) == ("", 1, 1.5, b"body")
    assert not d.settled and dict(d.headers) == {}
    asyncio.run(d.ack())  # no consumer behind it: nothing happens
    asyncio.run(d.nack())
    assert "id9" in repr(d)


def _slots(d: Delivery) -> dict[str, object]:
    names = [n for cls in type(d).__mro__ for n in getattr(cls, "__slots__", ())]
    return {n: getattr(d, n, "<unset>") for n in names if n != "_value"} | {
        "value": d.value,
        "class": type(d),
    }


def test_the_fast_builders_set_what_the_classes_set() -> None:
    """Delivery.maker and _Wrapped.wrapper build without the class call: every slot (the
    x-mqkit-attempt correction included) must come out as the class's __init__ makes it."""
    from mqkit.message import _Wrapped

    cls = Delivery.bound(None, "g")
    for headers, attempt in (({}, 1), ({"a": "b"}, 2), ({"x-mqkit-attempt": "5"}, 3)):
        args = ("t", b"body", "k", headers, "id1", attempt, 1.5, 2, 7, "p", object(), "tok")
        made, called = cls.maker()(*args), cls(*args)
        assert _slots(made) == _slots(called)
        assert made.attempt == (5 if "x-mqkit-attempt" in headers else attempt)
        by_name = cls.maker()(topic="t", body=b"", key=None, headers={}, id="i")
        assert _slots(by_name) == _slots(cls("t", b"", None, {}, "i"))
        wrapped_cls = _Wrapped.bound(None, "g")
        source = Incoming(*args)
        wrapped, wrapped_called = wrapped_cls.wrapper()(source), wrapped_cls(source)
        assert _slots(wrapped) == _slots(wrapped_called)
        assert wrapped._incoming is source and wrapped.group == "g"

"""mqkit.middleware.batching.Batcher against a fake flush function."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mqkit
from mqkit.middleware.batching import Batcher
from mqkit.seam import OutgoingMessage, PublishOutcome

TIMEOUT = 2.0


def msg(i: int, size: int = 1) -> OutgoingMessage:
    return OutgoingMessage("t", b"x" * size, None, {}, f"id-{i}")


class Recorder:
    """A flush function that records batches; optionally blocks on a gate or fails."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.batches: list[list[OutgoingMessage]] = []
        self.times: list[float] = []
        self.called = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.fail = fail
        self.wrong_count = False

    async def __call__(self, messages: list[OutgoingMessage]) -> Sequence[PublishOutcome]:
        self.batches.append(list(messages))
        self.times.append(asyncio.get_running_loop().time())
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        receipts = [mqkit.Receipt(topic=m.topic, id=m.id) for m in messages]
        return receipts[:-1] if self.wrong_count else receipts

    async def wait_call(self, n: int) -> None:
        async def until() -> None:
            while len(self.batches) < n:
                self.called.clear()
                await self.called.wait()

        await asyncio.wait_for(until(), TIMEOUT)


async def test_flushes_at_max_messages_at_once() -> None:
    rec = Recorder()
    b = Batcher(mqkit.Batch(max_messages=3, max_delay=30), rec)
    loop = asyncio.get_running_loop()
    start = loop.time()
    placed = [b.add(msg(i)) for i in range(3)]
    await rec.wait_call(1)
    assert loop.time() - start < 1.0  # not waiting for max_delay
    assert [m.id for m in rec.batches[0]] == ["id-0", "id-1", "id-2"]
    batch = placed[0][0]
    assert all(p[0] is batch for p in placed)
    assert [p[1] for p in placed] == [0, 1, 2]
    outcomes = await asyncio.wait_for(batch.future, TIMEOUT)
    assert [o.id for o in outcomes] == ["id-0", "id-1", "id-2"]
    b.add(msg(3))  # starts a new partial batch, not flushed yet
    assert len(rec.batches) == 1
    await b.close()
    assert [m.id for m in rec.batches[1]] == ["id-3"]


async def test_flushes_at_max_bytes() -> None:
    rec = Recorder()
    b = Batcher(mqkit.Batch(max_messages=100, max_bytes=10, max_delay=30), rec)
    b.add(msg(0, 4))
    b.add(msg(1, 4))
    b.add(msg(2, 4))  # would make 12 > 10: the first two go
    await rec.wait_call(1)
    assert [m.id for m in rec.batches[0]] == ["id-0", "id-1"]
    b.add(msg(3, 6))  # exactly 10 bytes: goes at once
    await rec.wait_call(2)
    assert [m.id for m in rec.batches[1]] == ["id-2", "id-3"]
    await b.close()
    assert len(rec.batches) == 2


async def test_oversize_message_goes_alone() -> None:
    rec = Recorder()
    b = Batcher(mqkit.Batch(max_messages=100, max_bytes=10, max_delay=30), rec)
    b.add(msg(0, 3))
    b.add(msg(1, 50))
    await rec.wait_call(2)
    assert [[m.id for m in batch] for batch in rec.batches] == [["id-0"], ["id-1"]]
    await b.close()


async def test_partial_batch_after_max_delay() -> None:
    rec = Recorder()
    delay = 0.2
    b = Batcher(mqkit.Batch(max_messages=100, max_delay=delay), rec)
    loop = asyncio.get_running_loop()
    start = loop.time()
    b.add(msg(0))
    b.add(msg(1))
    await rec.wait_call(1)
    waited = rec.times[0] - start
    assert delay * 0.9 <= waited <= delay + 0.5
    assert len(rec.batches[0]) == 2
    await b.close()


async def test_max_delay_counts_from_first_message_after_idle() -> None:
    rec = Recorder()
    delay = 0.2
    b = Batcher(mqkit.Batch(max_messages=100, max_delay=delay), rec)
    loop = asyncio.get_running_loop()
    # the batcher sits idle longer than max_delay (time passing is the condition under test)
    await asyncio.sleep(delay * 1.5)
    start = loop.time()
    b.add(msg(0))
    await rec.wait_call(1)
    try:
        assert rec.times[0] - start >= delay * 0.9, "flushed without waiting max_delay"
    finally:
        await b.close()


async def test_zero_delay_gathers_while_in_flight() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    b = Batcher(mqkit.Batch(max_messages=100, max_delay=0), rec)
    first, _ = b.add(msg(0))
    await rec.wait_call(1)
    assert [m.id for m in rec.batches[0]] == ["id-0"]  # no added latency when idle
    later = [b.add(msg(i)) for i in range(1, 5)]
    assert not first.future.done()
    rec.gate.set()
    await rec.wait_call(2)
    assert [m.id for m in rec.batches[1]] == ["id-1", "id-2", "id-3", "id-4"]
    assert all(p[0] is later[0][0] for p in later)
    await asyncio.wait_for(later[0][0].future, TIMEOUT)
    await b.close()
    assert len(rec.batches) == 2


async def test_flush_waits_for_everything() -> None:
    rec = Recorder()
    b = Batcher(mqkit.Batch(max_messages=2, max_delay=30), rec)
    placed = [b.add(msg(i)) for i in range(5)]
    await asyncio.wait_for(b.flush(), TIMEOUT)
    assert all(p[0].future.done() for p in placed)
    assert [[m.id for m in batch] for batch in rec.batches] == [
        ["id-0", "id-1"],
        ["id-2", "id-3"],
        ["id-4"],
    ]
    await b.flush()  # nothing queued: returns at once
    await b.close()


async def test_flush_waits_for_in_flight_batch() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    b = Batcher(mqkit.Batch(max_delay=0), rec)
    batch, _ = b.add(msg(0))
    await rec.wait_call(1)
    flushing = asyncio.create_task(b.flush())
    await asyncio.sleep(0)
    assert not flushing.done()
    rec.gate.set()
    await asyncio.wait_for(flushing, TIMEOUT)
    assert batch.future.done()
    await b.close()


async def test_close_flushes_and_rejects_new_messages() -> None:
    rec = Recorder()
    b = Batcher(mqkit.Batch(max_messages=100, max_delay=30), rec)
    batch, _ = b.add(msg(0))
    b.add(msg(1))
    await asyncio.wait_for(b.close(), TIMEOUT)
    assert [m.id for m in rec.batches[0]] == ["id-0", "id-1"]
    assert batch.future.done()
    with pytest.raises(mqkit.ClosedError):
        b.add(msg(2))
    await b.close()  # idempotent


@pytest.mark.parametrize(
    ("error", "expected_type"),
    [
        (RuntimeError("transport bug"), mqkit.PublishError),
        (mqkit.BrokerUnavailable("lost connection"), mqkit.BrokerUnavailable),
        (mqkit.PublishError("rejected"), mqkit.PublishError),
    ],
)
async def test_flush_exception_fails_every_message(
    error: BaseException, expected_type: type
) -> None:
    rec = Recorder(fail=error)
    b = Batcher(mqkit.Batch(max_messages=3, max_delay=30), rec)
    placed = [b.add(msg(i)) for i in range(3)]
    outcomes = await asyncio.wait_for(placed[0][0].future, TIMEOUT)
    assert len(outcomes) == 3
    for o in outcomes:
        assert isinstance(o, mqkit.MQKitError)
        assert isinstance(o, expected_type)
    if not isinstance(error, mqkit.MQKitError):
        assert outcomes[0].__cause__ is error
        assert outcomes[0].outcome == "unknown"
    # the batcher keeps working after a failed batch
    rec.fail = None
    nxt, _ = b.add(msg(9))
    await b.close()
    assert isinstance((await nxt.future)[0], mqkit.Receipt)


async def test_wrong_outcome_count_is_unknown_publish_error() -> None:
    rec = Recorder()
    rec.wrong_count = True
    b = Batcher(mqkit.Batch(max_messages=2, max_delay=30), rec)
    batch, _ = b.add(msg(0))
    b.add(msg(1))
    outcomes = await asyncio.wait_for(batch.future, TIMEOUT)
    assert len(outcomes) == 2
    assert all(isinstance(o, mqkit.PublishError) and o.outcome == "unknown" for o in outcomes)
    await b.close()


# ---------------------------------------------------------------- property


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), max_size=40),
    yields=st.lists(st.booleans(), min_size=40, max_size=40),
    max_messages=st.integers(1, 8),
    max_bytes=st.integers(1, 64),
    max_delay=st.sampled_from([0.0, 0.001]),
    flush_yields=st.booleans(),
)
def test_batches_partition_added_messages_in_order(
    sizes: list[int],
    yields: list[bool],
    max_messages: int,
    max_bytes: int,
    max_delay: float,
    flush_yields: bool,
) -> None:
    policy = mqkit.Batch(max_messages=max_messages, max_bytes=max_bytes, max_delay=max_delay)
    batches: list[list[OutgoingMessage]] = []

    async def flush_fn(messages: list[OutgoingMessage]) -> list[PublishOutcome]:
        batches.append(list(messages))
        if flush_yields:
            await asyncio.sleep(0)
        return [mqkit.Receipt(topic=m.topic, id=m.id) for m in messages]

    async def scenario() -> None:
        b = Batcher(policy, flush_fn)
        added = []
        placed = []
        for i, size in enumerate(sizes):
            m = msg(i, size)
            added.append(m)
            placed.append(b.add(m))
            if yields[i]:
                await asyncio.sleep(0)
        await asyncio.wait_for(b.flush(), TIMEOUT)
        await asyncio.wait_for(b.close(), TIMEOUT)

        flat = [m for batch in batches for m in batch]
        assert [m.id for m in flat] == [m.id for m in added]
        for batch in batches:
            assert 1 <= len(batch) <= max_messages
            nbytes = sum(len(m.body) for m in batch)
            assert nbytes <= max_bytes or len(batch) == 1
        for m, (pending, index) in zip(added, placed, strict=True):
            assert pending.messages[index] is m
            outcome = pending.future.result()[index]
            assert isinstance(outcome, mqkit.Receipt) and outcome.id == m.id

    asyncio.run(scenario())


async def test_in_flight_batches_overlap_up_to_the_limit_in_call_order() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    b = Batcher(mqkit.Batch(max_messages=2), rec, in_flight=2)
    # the first message of an idle batcher goes at once; then two full batches and one more
    placed = [b.add(msg(i)) for i in range(6)]
    await rec.wait_call(2)
    await asyncio.sleep(0.05)  # a third call would have started by now if it were allowed
    assert len(rec.batches) == 2, "no more than in_flight calls at once"
    assert b.held == 6
    rec.gate.set()
    await asyncio.wait_for(b.flush(), TIMEOUT)
    assert [[m.id for m in batch] for batch in rec.batches] == [
        ["id-0"],
        ["id-1", "id-2"],
        ["id-3", "id-4"],
        ["id-5"],
    ]
    assert all(batch.future.done() for batch, _ in placed)
    assert b.held == 0 and b.held_bytes == 0
    await asyncio.wait_for(b.close(), TIMEOUT)


async def test_close_waits_for_every_batch_in_flight() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    b = Batcher(mqkit.Batch(max_messages=1), rec, in_flight=4)
    placed = [b.add(msg(i)) for i in range(3)]
    await rec.wait_call(3)
    closing = asyncio.create_task(b.close())
    await asyncio.sleep(0.05)
    assert not closing.done(), "close waits for the answers"
    rec.gate.set()
    await asyncio.wait_for(closing, TIMEOUT)
    assert all(batch.future.done() for batch, _ in placed)


async def test_room_waits_until_a_batch_settles() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    b = Batcher(mqkit.Batch(max_messages=1), rec)
    b.add(msg(0, size=10))
    waiting = asyncio.create_task(b.room(1, 10, max_messages=1, max_bytes=100))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    rec.gate.set()
    assert await asyncio.wait_for(waiting, TIMEOUT)
    await asyncio.wait_for(b.close(), TIMEOUT)


async def test_a_batch_queued_past_expire_fails_unsent() -> None:
    rec = Recorder(fail=mqkit.BrokerUnavailable("down"))  # the broker confirms nothing
    rec.gate = asyncio.Event()
    b = Batcher(mqkit.Batch(max_messages=1), rec, expire=0.05)
    first, _ = b.add(msg(0))
    late, _ = b.add(msg(1))  # sealed now, waits behind the first call
    await rec.wait_call(1)
    await asyncio.sleep(0.1)  # longer than expire
    rec.gate.set()
    outcomes = await asyncio.wait_for(late.future, TIMEOUT)
    assert isinstance(outcomes[0], mqkit.PublishError)
    assert outcomes[0].outcome == "rejected"
    assert [m.id for batch in rec.batches for m in batch] == ["id-0"], "never sent"
    assert isinstance((await first.future)[0], mqkit.BrokerUnavailable)
    await asyncio.wait_for(b.close(), TIMEOUT)


async def test_a_slow_broker_that_confirms_expires_nothing() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    b = Batcher(mqkit.Batch(max_messages=1), rec, expire=0.05)
    placed = [b.add(msg(i))[0] for i in range(3)]
    await rec.wait_call(1)
    await asyncio.sleep(0.1)  # the first call is slower than expire, then confirms
    rec.gate.set()
    await asyncio.wait_for(b.flush(), TIMEOUT)
    assert [m.id for batch in rec.batches for m in batch] == ["id-0", "id-1", "id-2"]
    assert all(isinstance(p.future.result()[0], mqkit.Receipt) for p in placed)
    await asyncio.wait_for(b.close(), TIMEOUT)


async def test_an_idle_batcher_starts_the_first_call_from_the_senders_step() -> None:
    """With calls that may overlap and no max_delay, the first message after a quiet spell is
    published one loop turn after add(), as with one call at a time (not two: the flushing
    task is not woken first); messages added meanwhile travel together in the next call, still
    in call order."""
    rec = Recorder()
    rec.gate = asyncio.Event()
    b = Batcher(mqkit.Batch(max_messages=100), rec, in_flight=2)
    b.add(msg(0))
    await asyncio.sleep(0)  # one turn: the call's task took its first step
    assert [[m.id for m in batch] for batch in rec.batches] == [["id-0"]]
    for i in range(1, 4):
        b.add(msg(i))
    await rec.wait_call(2)
    assert [[m.id for m in batch] for batch in rec.batches] == [
        ["id-0"],
        ["id-1", "id-2", "id-3"],
    ]
    rec.gate.set()
    await asyncio.wait_for(b.flush(), TIMEOUT)
    assert b.held == 0
    b.add(msg(4))  # idle again: at once again
    await asyncio.sleep(0)
    assert [m.id for m in rec.batches[-1]] == ["id-4"]
    await asyncio.wait_for(b.close(), TIMEOUT)

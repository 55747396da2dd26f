"""mqkit.middleware.ordering.KeyScheduler: unit cases and hypothesis properties."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from mqkit.middleware.ordering import KeyScheduler


@dataclass(eq=False)
class Item:
    seq: int
    key: str | None

    def __repr__(self) -> str:
        return f"Item({self.seq}, {self.key!r})"


def key_of(item: Item) -> str | None:
    return item.key


def make(ordered: bool = True) -> KeyScheduler[Item]:
    return KeyScheduler(ordered, key_of)


# ---------------------------------------------------------------- unit cases


def test_unordered_is_fifo_and_everything_runnable() -> None:
    s = make(ordered=False)
    items = [Item(i, "k") for i in range(5)]
    assert all(s.push(it) for it in items)
    assert len(s) == 5
    assert s.waiting == 0
    assert [s.take() for _ in range(5)] == items
    assert s.take() is None
    assert s.release(items[0]) is False


def test_same_key_blocked_until_release() -> None:
    s = make()
    a, b, c = Item(0, "k"), Item(1, "k"), Item(2, "k")
    assert s.push(a) is True
    assert s.push(b) is False
    assert s.push(c) is False
    assert (len(s), s.waiting) == (1, 2)
    assert s.take() is a
    assert s.take() is None  # b waits behind a
    assert s.release(a) is True
    assert s.take() is b
    assert s.take() is None
    assert s.release(b) is True
    assert s.take() is c
    assert s.release(c) is False
    # key is free again: a new item is runnable at once
    assert s.push(Item(3, "k")) is True


def test_different_keys_and_none_run_in_parallel() -> None:
    s = make()
    items = [Item(0, "a"), Item(1, "b"), Item(2, None), Item(3, None), Item(4, "c")]
    assert all(s.push(it) for it in items)
    taken = [s.take() for _ in range(5)]
    assert taken == items
    assert s.release(items[2]) is False  # None key: nothing to unblock


def test_release_before_take_of_next_keeps_order() -> None:
    s = make()
    a, b = Item(0, "k"), Item(1, "k")
    s.push(a)
    assert s.take() is a
    s.push(b)
    assert s.take() is None
    s.release(a)
    assert s.take() is b


def test_again_keeps_key_busy() -> None:
    s = make()
    a, b, other = Item(0, "k"), Item(1, "k"), Item(2, "z")
    s.push(a)
    s.push(b)
    assert s.take() is a
    s.again(a)  # retry: a runnable again, b still waits
    s.push(other)
    assert s.take() is a
    assert s.take() is other
    assert s.take() is None
    s.release(a)
    assert s.take() is b


def test_drain_returns_everything_not_taken() -> None:
    s = make()
    a1, a2, a3, b1, n1 = Item(0, "a"), Item(1, "a"), Item(2, "a"), Item(3, "b"), Item(4, None)
    for it in (a1, a2, a3, b1, n1):
        s.push(it)
    assert s.take() is a1
    drained = s.drain()
    assert sorted(i.seq for i in drained) == [1, 2, 3, 4]
    assert len(s) == 0 and s.waiting == 0
    assert s.take() is None
    # a1 is still in progress: its key stays busy
    a4 = Item(5, "a")
    assert s.push(a4) is False
    s.release(a1)
    assert s.take() is a4


def test_drain_empty() -> None:
    assert make().drain() == []


# ---------------------------------------------------------------- properties

KEYS = st.sampled_from(["a", "b", "c", None])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("push"), KEYS),
        st.tuples(st.just("take"), st.none()),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("again"), st.integers(0, 50)),
    ),
    max_size=120,
)


class Model:
    """Drives a KeyScheduler and checks it against the contract on every step."""

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self.s: KeyScheduler[Item] = KeyScheduler(ordered, key_of)
        self.pushed: list[Item] = []
        self.first_taken: list[Item] = []
        self.running: list[Item] = []  # taken, not released, not re-queued
        self.requeued: list[Item] = []  # again()'d, not taken back yet
        self.agains = 0
        self.retakes = 0
        self.released: set[int] = set()

    def push(self, key: str | None) -> None:
        item = Item(len(self.pushed), key)
        self.pushed.append(item)
        self.s.push(item)

    def busy_keys(self) -> list[str]:
        return [i.key for i in self.running + self.requeued if i.key is not None]

    def take(self) -> Item | None:
        item = self.s.take()
        if item is None:
            return None
        if item in self.requeued:
            self.requeued.remove(item)
            self.retakes += 1
        else:
            assert item not in self.first_taken, f"{item} taken twice"
            assert item.seq not in self.released
            if self.ordered and item.key is not None:
                assert item.key not in self.busy_keys(), f"{item}: key already in progress"
                earlier = [i for i in self.pushed if i.key == item.key and i.seq < item.seq]
                assert all(i in self.first_taken for i in earlier), f"{item} overtook"
            self.first_taken.append(item)
        self.running.append(item)
        if self.ordered:
            keys = self.busy_keys()
            assert len(keys) == len(set(keys)), "two items of one key in progress"
        return item

    def release(self, index: int) -> None:
        if self.running:
            item = self.running.pop(index % len(self.running))
            self.released.add(item.seq)
            self.s.release(item)

    def again(self, index: int) -> None:
        if self.running:
            item = self.running.pop(index % len(self.running))
            self.requeued.append(item)
            self.agains += 1
            self.s.again(item)

    def run(self, ops: list) -> None:
        for op, arg in ops:
            if op == "take":
                self.take()
            else:
                getattr(self, op)(arg)

    def finish(self) -> None:
        """Take and release until nothing is left; everything must come out."""
        for _ in range(10 * len(self.pushed) + 10):
            if self.take() is None:
                if not self.running:
                    break
                self.release(0)
        assert self.s.take() is None
        assert len(self.s) == 0 and self.s.waiting == 0
        assert sorted(i.seq for i in self.first_taken) == list(range(len(self.pushed)))
        assert self.retakes == self.agains
        assert not self.requeued


@settings(max_examples=300, deadline=None)
@given(ops=OPS, ordered=st.booleans())
def test_every_item_taken_exactly_once(ops: list, ordered: bool) -> None:
    m = Model(ordered)
    m.run(ops)
    m.finish()


@settings(max_examples=200, deadline=None)
@given(ops=OPS)
def test_ordered_first_takes_follow_push_order_per_key(ops: list) -> None:
    m = Model(ordered=True)
    m.run(ops)
    m.finish()
    for key in ("a", "b", "c"):
        seqs = [i.seq for i in m.first_taken if i.key == key]
        assert seqs == sorted(seqs)


@settings(max_examples=200, deadline=None)
@given(ops=OPS)
def test_unordered_first_takes_follow_push_order(ops: list) -> None:
    m = Model(ordered=False)
    m.run(ops)
    m.finish()
    seqs = [i.seq for i in m.first_taken]
    assert seqs == sorted(seqs)


@settings(max_examples=200, deadline=None)
@given(ops=OPS, ordered=st.booleans())
def test_drain_plus_taken_is_everything(ops: list, ordered: bool) -> None:
    m = Model(ordered)
    m.run(ops)
    drained = m.s.drain()
    ids = [id(i) for i in drained]
    assert len(ids) == len(set(ids)), "drain duplicated an item"
    requeued = [i for i in drained if i in m.requeued]
    assert len(requeued) == len(m.requeued)  # again()'d items are runnable, so drained
    fresh = [i for i in drained if i not in m.requeued]
    assert not set(map(id, fresh)) & set(map(id, m.first_taken))
    assert sorted(i.seq for i in fresh + m.first_taken) == list(range(len(m.pushed)))
    assert m.s.take() is None and m.s.waiting == 0


@settings(max_examples=200, deadline=None)
@given(
    batches=st.lists(
        st.lists(st.sampled_from(["a", "b", "c", None]), max_size=8), min_size=1, max_size=6
    ),
    releases=st.lists(st.integers(0, 7), max_size=6),
    ordered=st.booleans(),
)
def test_push_many_is_push_one_by_one(
    batches: list[list[str | None]], releases: list[int], ordered: bool
) -> None:
    """push_many inlines push: after every batch (and a release between batches) the two
    schedulers hold the same items runnable and the same items waiting per key."""
    one, many = make(ordered), make(ordered)
    seq = 0
    for keys, release in zip(batches, releases + [0] * len(batches), strict=False):
        items = [Item(seq + i, k) for i, k in enumerate(keys)]
        seq += len(items)
        waiting_before = one.waiting
        results = [one.push(it) for it in items]
        many.push_many(items)
        assert list(one.ready) == list(many.ready)
        assert {k: list(q or ()) for k, q in one.blocked.items()} == {
            k: list(q or ()) for k, q in many.blocked.items()
        }
        assert sum(results) == len(items) - (one.waiting - waiting_before)
        taken = one.take()
        assert many.take() is taken
        if taken is not None and release % 2:  # a finished item lets its key's next one run
            one.release(taken)
            many.release(taken)

"""The memory backend's partition log (adapters/memory.py ``_Log``): sealed chunks plus a tail
must read exactly like one flat list, and a full collection must not visit its records."""

from __future__ import annotations

import gc

from hypothesis import given, settings
from hypothesis import strategies as st
from mqkit.adapters.memory import _CHUNK, _Log  # type: ignore[import-not-found]

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 1)),
        st.tuples(st.just("extend"), st.integers(0, 3 * _CHUNK)),
        st.tuples(st.just("drop"), st.integers(0, 3 * _CHUNK)),
    ),
    max_size=12,
)


def rec(i: int) -> tuple[bytes, None, None, str, float, int, int]:
    return (b"b", None, None, f"id{i}", 1.0, 0, i)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, cuts=st.lists(st.tuples(st.integers(-5, 6000), st.integers(-5, 6000)), max_size=8))
def test_reads_like_a_flat_list(ops: list[tuple[str, int]], cuts: list[tuple[int, int]]) -> None:
    log, model, n = _Log(), [], 0
    for op, k in ops:
        if op == "append":
            log.append(rec(n))
            model.append(rec(n))
            n += 1
        elif op == "extend":
            new = [rec(n + i) for i in range(k)]
            log.extend(iter(new))
            model.extend(new)
            n += k
        else:
            dropped = log.drop_front(k)
            assert dropped % _CHUNK == 0 and dropped <= k
            del model[:dropped]
        assert len(log) == len(model)
        assert len(log.tail) < _CHUNK and all(len(c) == _CHUNK for c in log.chunks)
    assert [log[i] for i in range(len(model))] == model
    for start, stop in cuts:
        assert log[max(start, 0) : max(stop, 0)] == model[max(start, 0) : max(stop, 0)]
    assert log[:] == model


def test_a_full_collection_does_not_visit_the_records() -> None:
    log = _Log()
    log.extend(rec(i) for i in range(10 * _CHUNK + 5))
    gc.collect()  # the records are untracked first; a chunk examined before its
    gc.collect()  # last records were is untracked by the next collection
    assert not any(gc.is_tracked(c) for c in log.chunks)  # so neither are their records
    assert len(gc.get_referents(log.chunks)) == 10  # what a collection visits: the chunks

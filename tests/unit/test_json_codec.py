"""JsonCodec: built-in conversions for common Python types and a default= hook."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import uuid

import pytest

from mqkit.codecs import JsonCodec


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Order:
    id: uuid.UUID
    total: decimal.Decimal
    at: datetime.datetime
    tags: frozenset[str]


def test_common_types_encode() -> None:
    order = Order(
        id=uuid.UUID(int=1),
        total=decimal.Decimal("10.10"),
        at=datetime.datetime(2026, 12, 2, 3, 4, 5, tzinfo=datetime.UTC),
        tags=frozenset({"a"}),
    )
    body = JsonCodec().encode({"order": order, "colour": Colour.RED, "day": order.at.date()})
    assert json.loads(body) == {
        "order": {
            "id": "00000000-0000-0000-0000-000000000001",
            "total": "10.10",
            "at": "2026-12-02T03:04:05+00:00",
            "tags": ["a"],
        },
        "colour": "red",
        "day": "2026-12-02",
    }


def test_default_hook_runs_first_and_unknown_types_name_the_fix() -> None:
    class Money:
        cents = 1010

    codec = JsonCodec(default=lambda v: v.cents if isinstance(v, Money) else str(v))
    assert codec.encode({"m": Money()}) == b'{"m":1010}'
    with pytest.raises(TypeError, match=r"JsonCodec\(default=fn\)"):
        JsonCodec().encode(Money())
    with pytest.raises(TypeError, match="callable"):
        JsonCodec(default=1)  # type: ignore[arg-type]


def test_round_trip_and_sort_keys() -> None:
    codec = JsonCodec(sort_keys=True)
    assert codec.encode({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()
    assert codec.decode(codec.encode({"x": [1, 2]})) == {"x": [1, 2]}
    with pytest.raises(ValueError, match="Expecting value"):
        codec.decode(b"not json")

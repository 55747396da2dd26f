"""The operator's commands on memory://, run in-process (memory:// lives in this process):
publish, tail, lag, dlq ls/show/replay/purge, bad input and exit codes."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter

import pytest

import mqkit
from mqkit._cli_app import app


def ns() -> str:
    return f"memory://cli{uuid.uuid4().hex[:8]}"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = app(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def dead_letter(url: str, n: int) -> None:
    """n orders through a consumer whose handler fails: odd bodies ValueError, even KeyError."""
    async with mqkit.connect(url) as broker:
        await broker.producer().send_many(
            "orders", [mqkit.Message(b"%d" % i, key=f"k{i % 3}") for i in range(n)]
        )
        failed = 0
        done = asyncio.Event()

        async def handle(d: mqkit.Delivery) -> None:
            nonlocal failed
            failed += 1
            if failed >= n:
                done.set()
            raise (ValueError if int(d.body) % 2 else KeyError)("downstream is down")

        consumer = broker.consumer(
            "orders", "billing", retry=mqkit.Retry(attempts=1), dead_letter="orders.dlq"
        )
        task = asyncio.create_task(consumer.run(handle))
        async with asyncio.timeout(10):
            await done.wait()
            while await broker.lag("orders.dlq", "mqkit-dlq") < n:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await consumer.close()
        await task


async def drain(url: str, topic: str) -> list[mqkit.Delivery]:
    got: list[mqkit.Delivery] = []
    async with mqkit.connect(url) as broker, broker.consumer(topic, "check") as c:
        while (d := await c.receive(timeout=0.3)) is not None:
            got.append(d)
            await d.ack()
    return got


def test_publish_tail_and_lag(capsys: pytest.CaptureFixture[str]) -> None:
    url = ns()
    code, out, _ = run(
        capsys, "publish", url, "t", "hello", "--key", "k", "--header", "a=b", "--json"
    )
    assert code == 0
    receipt = json.loads(out)
    assert receipt["confirmed"] and receipt["topic"] == "t"
    for i in range(3):
        assert run(capsys, "publish", url, "t", f"m{i}")[0] == 0
    code, out, _ = run(capsys, "tail", url, "t", "-n", "2", "--json")
    assert code == 0
    assert [json.loads(line)["body"] for line in out.splitlines()] == ["m1", "m2"]
    code, out, _ = run(capsys, "tail", url, "t", "-n", "10")
    assert code == 0 and "key=k a=b | hello" in out
    asyncio.run(declare(url, "t", "g"))
    code, out, _ = run(capsys, "lag", url, "t", "g", "--json")
    assert code == 0 and json.loads(out)["total"] == 4  # a new memory:// group starts at the start


async def declare(url: str, topic: str, group: str) -> None:
    async with mqkit.connect(url) as broker:
        await broker.declare(topic, groups=[group])


def test_url_from_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = ns()
    monkeypatch.setenv("MQKIT_URL", url)
    assert run(capsys, "publish", "t", "x")[0] == 0
    code, out, _ = run(capsys, "tail", "t", "--json")
    assert code == 0 and json.loads(out)["body"] == "x"
    monkeypatch.delenv("MQKIT_URL")
    code, _, err = run(capsys, "tail", "t")
    assert code == 2 and "MQKIT_URL" in err


def test_bad_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "publish", ns(), "t", "x", "--header", "novalue")
    assert code == 2 and err.strip() == "mqkit: --header 'novalue': write it as NAME=VALUE"
    code, _, err = run(capsys, "publish", "redis://user:s3cret@127.0.0.1:1/0", "t", "x")
    assert code == 2 and "BrokerUnavailable" in err and "s3cret" not in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, _, err = run(capsys, "publish", ns(), "bad topic!", "x")
    assert code == 2 and "ConfigError" in err
    code, _, err = run(capsys, "lag", "nosuch://x", "t", "g")
    assert code == 2 and "unknown URL scheme" in err


def test_dlq_ls_show_replay_interrupted_then_resumed(capsys: pytest.CaptureFixture[str]) -> None:
    url = ns()
    asyncio.run(dead_letter(url, 20))
    code, out, _ = run(capsys, "dlq", "ls", url, "orders.dlq", "--json")
    assert code == 0
    groups = {g["error_type"]: g for g in json.loads(out)["groups"]}
    assert groups["ValueError"]["count"] == 10 and groups["KeyError"]["count"] == 10
    assert groups["KeyError"]["original_topic"] == "orders"
    assert groups["KeyError"]["first_failure"] and groups["KeyError"]["last_failure"]
    # ls consumed nothing: the copies still wait
    code, out, _ = run(capsys, "dlq", "ls", url, "orders.dlq")
    assert code == 0 and "20 waiting" in out
    some = asyncio.run(peek_id(url))
    code, out, _ = run(capsys, "dlq", "show", url, "orders.dlq", some, "--json")
    assert code == 0 and json.loads(out)["id"] == some

    code, out, _ = run(capsys, "dlq", "replay", url, "orders.dlq", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["replayed"] == 20
    code, out, _ = run(capsys, "dlq", "replay", url, "orders.dlq", "--limit", "7", "--json")
    assert code == 0
    first = json.loads(out)
    assert first["replayed"] == 7 and first["left"] == 13  # the interruption
    code, out, _ = run(capsys, "dlq", "replay", url, "orders.dlq", "--json")
    assert code == 0 and json.loads(out)["replayed"] == 13
    replayed = asyncio.run(drain(url, "orders"))
    ids = [d.id for d in replayed]
    # a new group reads the topic from its start: the 20 originals, then each replay once
    assert len(ids) == 40 and set(Counter(ids).values()) == {2}
    assert all(not k.startswith("x-mqkit-") for d in replayed for k in d.headers)
    code, out, _ = run(capsys, "lag", url, "orders.dlq", "mqkit-dlq", "--json")
    assert json.loads(out)["total"] == 0


async def peek_id(url: str) -> str:
    async with mqkit.connect(url) as broker:
        async for m in broker.browse("orders.dlq", last=1):
            return m.id
    raise AssertionError("no dead letter")


def test_filtered_replay_keeps_the_rest_and_purge(capsys: pytest.CaptureFixture[str]) -> None:
    url = ns()
    asyncio.run(dead_letter(url, 10))
    code, out, _ = run(
        capsys,
        "dlq",
        "replay",
        url,
        "orders.dlq",
        "--error-type",
        "KeyError",
        "--to",
        "fixed",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert result["replayed"] == 5 and result["kept"] == 5 and result["targets"] == {"fixed": 5}
    fixed = asyncio.run(drain(url, "fixed"))
    assert sorted(int(d.body) for d in fixed) == [0, 2, 4, 6, 8]
    assert all(d.key is not None for d in fixed)
    code, out, _ = run(capsys, "dlq", "ls", url, "orders.dlq", "--json")
    (left,) = json.loads(out)["groups"]
    assert left["error_type"] == "ValueError" and left["count"] == 5
    code, _, _ = run(capsys, "dlq", "purge", url, "orders.dlq", "--yes")
    assert code == 0
    code, out, _ = run(capsys, "dlq", "ls", url, "orders.dlq")
    assert "no dead letters waiting" in out


def test_a_topic_that_is_not_a_dead_letter_topic_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = ns()
    asyncio.run(declare(url, "plain", "mqkit-dlq"))
    assert run(capsys, "publish", url, "plain", "x")[0] == 0
    code, _, err = run(capsys, "dlq", "ls", url, "plain")
    assert code == 2 and "not a dead-letter topic" in err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("mqkit ")
    for command in ("publish", "tail", "lag", "bench", "capabilities", "conformance"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0 and "Usage: mqkit" in out
    for command in ("ls", "show", "replay", "purge"):
        code, out, _ = run(capsys, "dlq", command, "--help")
        assert code == 0 and "Usage: mqkit dlq" in out


def test_bench_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "bench", ns(), ns(), "--messages", "200", "--size", "16", "--json")
    assert code == 0, err
    results = json.loads(out)
    assert len(results) == 2
    assert all(r["messages"] == 200 for r in results)
    code, out, _ = run(capsys, "bench", ns(), "--messages", "100")
    assert code == 0 and "memory://" in out

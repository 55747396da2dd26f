"""RepeatLimiter: a client library's per-attempt log records become one per interval."""

from __future__ import annotations

import logging

import pytest

from mqkit._logfilter import RepeatLimiter, limit_repeats


def test_repeats_are_held_back_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.repeats")
    limiter = RepeatLimiter(interval=3600)
    log.addFilter(limiter)
    try:
        with caplog.at_level(logging.INFO, logger="test.repeats"):
            for i in range(500):
                log.error("no leader for partition %s", i)
            log.warning("another kind")
            log.info("below the level: always passes")
            log.info("below the level: always passes")
        texts = [r.getMessage() for r in caplog.records]
        assert texts == [
            "no leader for partition 0",
            "another kind",
            "below the level: always passes",
            "below the level: always passes",
        ]
        limiter.interval = 0  # the interval is over: the next one passes with the count
        log.error("no leader for partition %s", 500)
        assert caplog.records[-1].getMessage() == (
            "no leader for partition 500 (499 similar records suppressed)"
        )
    finally:
        log.removeFilter(limiter)


def test_limit_repeats_covers_existing_child_loggers() -> None:
    child = logging.getLogger("test.lib.sender")
    limit_repeats("test.lib")
    assert any(isinstance(f, RepeatLimiter) for f in child.filters)
    limit_repeats("test.lib")
    assert sum(isinstance(f, RepeatLimiter) for f in child.filters) == 1

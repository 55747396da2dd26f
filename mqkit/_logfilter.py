"""A logging filter that lets a repeated record through once per interval.

Client libraries retry by themselves and may log every attempt (aiokafka logs an ERROR per
metadata retry while a partition has no leader: thousands a second during a broker restart).
Adapters install :class:`RepeatLimiter` on such a library's logger so a state change is logged
once, with a count of what was held back, instead of once per attempt.

Added in 0.2.0.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["RepeatLimiter", "limit_repeats"]


class RepeatLimiter(logging.Filter):
    """Pass the first record of each (logger, level, message template) per ``interval`` seconds.

    The next record of that kind to pass after held-back ones says how many were held back
    (``(N similar records suppressed)`` appended to its message). Records below ``min_level``
    always pass. Thread-safe: client libraries log from their own threads.
    """

    def __init__(self, interval: float = 10.0, min_level: int = logging.WARNING) -> None:
        super().__init__()
        self.interval = interval
        self.min_level = min_level
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is logged (it may get a suppressed-count suffix)."""
        if record.levelno < self.min_level:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        with self._lock:
            last, held = self._seen.get(key, (float("-inf"), 0))
            if now - last < self.interval:
                self._seen[key] = (last, held + 1)
                return False
            self._seen[key] = (now, 0)
            if len(self._seen) > 1000:  # bounded: forget the oldest kinds
                for old in sorted(self._seen, key=lambda k: self._seen[k][0])[:500]:
                    del self._seen[old]
        if held:
            record.msg = f"{record.msg} ({held} similar records suppressed)"
        return True


_installed: set[str] = set()
_install_lock = threading.Lock()


def limit_repeats(prefix: str, interval: float = 10.0) -> None:
    """Install one shared :class:`RepeatLimiter` on ``prefix`` and on every logger below it
    that exists now (a logger's filters do not see its children's records, so call this after
    the library's modules are imported). Idempotent per logger."""
    limiter = RepeatLimiter(interval)
    names = [prefix] + [
        n for n in list(logging.root.manager.loggerDict) if n.startswith(prefix + ".")
    ]
    with _install_lock:
        for name in names:
            if name not in _installed:
                logging.getLogger(name).addFilter(limiter)
                _installed.add(name)

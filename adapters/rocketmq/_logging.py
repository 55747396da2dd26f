"""Keep the RocketMQ client's log file out of the user's home directory.

``rocketmq-python-client`` configures, at import time, a rotating file handler under
``~/logs/rocketmq_python/`` (creating the directory). Imported before the client library, this
module registers a stand-in for the client's ``log_config`` module, so the client logs to the
standard ``logging`` logger ``rocketmq-python-client`` (level WARNING unless the application set
one; records propagate to the application's handlers) and writes no file. The URL option
``client_log_dir`` adds a file handler in a directory of the user's choosing.

If the client library was imported before mqkit, its own configuration stays as it was.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import threading
import types

__all__ = ["CLIENT_LOGGER", "log_to_dir"]

CLIENT_LOGGER = "rocketmq-python-client"
_MODULE = "rocketmq.v5.log.log_config"
_dirs: set[str] = set()
_lock = threading.Lock()

logger = logging.getLogger(CLIENT_LOGGER)
if _MODULE not in sys.modules:
    _stub = types.ModuleType(_MODULE)
    _stub.logger = logger  # type: ignore[attr-defined]
    sys.modules[_MODULE] = _stub
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
# The client calls the deprecated Logger.warn (a DeprecationWarning per call, raised from its
# own threads); route it to warning() on this one logger.
logger.warn = logger.warning  # type: ignore[method-assign]


def log_to_dir(directory: str) -> None:
    """Also write the client's log records to ``directory/rocketmq_client.log`` (rotated)."""
    path = os.path.abspath(os.path.expanduser(directory))
    with _lock:
        if path in _dirs:
            return
        os.makedirs(path, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            os.path.join(path, "rocketmq_client.log"), maxBytes=100 << 20, backupCount=3
        )
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
        logger.addHandler(handler)
        if logger.level in (logging.NOTSET, logging.WARNING):
            logger.setLevel(logging.INFO)
        _dirs.add(path)

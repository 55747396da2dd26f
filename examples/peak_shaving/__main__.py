"""``python -m examples.peak_shaving [--role all|ingress|worker] [--port 8000]``.

``all`` (the default) serves the ingress and the workers in one process, which memory:// needs;
with a real broker (``MQKIT_URL``) run one ``ingress`` and any number of ``worker`` processes.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import uvicorn

from .app import Settings, create_app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.peak_shaving")
    parser.add_argument("--role", choices=["all", "ingress", "worker"], default="all")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--rate", type=float, default=200.0, help="downstream orders/s")
    parser.add_argument("--no-access-log", action="store_true", help="for load tests")
    args = parser.parse_args()
    settings = Settings(
        url=os.environ.get("MQKIT_URL"), workers=args.role != "ingress", rate_per_second=args.rate
    )
    app = create_app(settings)
    if args.role == "worker":
        asyncio.run(app.state.broker.run())  # graceful on SIGINT / SIGTERM
    else:
        uvicorn.run(
            app, host=args.host, port=args.port, log_level="info", access_log=not args.no_access_log
        )


if __name__ == "__main__":
    main()

"""The ``mqkit`` command line (``pip install 'mqkit[cli]'``; click and rich).

Commands: ``conformance``, ``capabilities``, ``schemes``, ``publish``, ``tail``, ``lag``,
``dlq ls|show|replay|purge`` and ``bench``; see ``docs/cli.md`` or ``mqkit COMMAND --help``.
Where a command takes a URL it may be left out: ``MQKIT_URL`` gives it then.

Exit codes: 0 done; 1 the operation ran and failed (a scenario failed, a publish was not
confirmed); 2 bad usage or input, a URL that is wrong, a broker that cannot be reached, or a
feature the backend lacks; 130 interrupted (Ctrl-C).

Added in 0.1.0; the operator's commands in 0.3.0.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mqkit`` command."""
    try:
        from mqkit._cli_app import app
    except ModuleNotFoundError as exc:  # click or rich missing
        print(
            f"mqkit: the command line needs {exc.name}: pip install 'mqkit[cli]'",
            file=sys.stderr,
        )
        return 2
    return app(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

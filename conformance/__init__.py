"""The mqkit conformance suite: one set of scenarios every backend must pass.

Run it against any URL, including a third party's adapter::

    mqkit conformance redis://127.0.0.1:6379/0
    pytest --pyargs mqkit.conformance --mqkit-url redis://127.0.0.1:6379/0

Scenarios are named by the stable ids of the checklist (C01...). A scenario is skipped only
when a capability flag of the backend says it cannot apply, and the report names that flag.

Added in 0.1.0.
"""

from .harness import Harness, scenario

__all__ = ["Harness", "scenario"]

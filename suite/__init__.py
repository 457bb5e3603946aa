"""holecheck: does splitting underused THPs corrupt what userfaultfd users see?

Where to start reading:

- ``scenario``  — a scenario is data: a list of steps (map, place, register, shrink, …).
- ``runner``    — executes a synthetic scenario next to the kernel under test and returns a ``Verdict``
                  (``qemu_runner`` the real-QEMU ones: postcopy, background snapshot).
- ``ledger``    — what both runners know of each region they judge: placed pages, holes, shrink snapshots.
- ``pagemap``   — the page-state oracle: per-4 KiB page state from /proc/PID/pagemap (+ kpageflags).
- ``oracle``    — diffs of page states: spurious holes, lost uffd-wp / soft-dirty bits.
- ``thp`` / ``memcg`` / ``shrinker`` — THP knobs (always restored), cgroup scopes, shrinker triggers.
- ``uffd``      — the C helper that performs userfaultfd sequences step by step.
- ``target``    — where the kernel under test runs (the host itself, or an L1 VM).
- ``verdict``   — the structured, JSON-serialisable result pytest asserts on.

Errors derive from ``errors.HolecheckError``. Like qemu.qmp, the package logs to the ``holecheck`` logger
and stays silent unless the application configures logging.
"""
import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())

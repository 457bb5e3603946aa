"""holecheck: does splitting underused THPs corrupt what userfaultfd users see?

Every module, in reading order:

What a run is and what it yields
- ``scenario``     — a scenario is data: a list of steps (map, place, register, shrink, …).
- ``verdict``      — the structured, JSON-serialisable result pytest asserts on.
- ``kernelspec``   — parsing ``--kernel`` values: which kernel a scenario runs on.
- ``options``      — checks of the command-line options that would otherwise fail late (``--artifacts``, …).

Where the kernel under test runs
- ``target``       — the ``Target`` interface and its options.
- ``targets``      — ``open_target``: a kernel spec → ``host.HostTarget`` (this kernel, this process) or
                     ``guest.GuestTarget`` (an L1 VM, ``vm``, talking to ``agent`` inside it).
- ``host`` / ``guest`` / ``agent`` — the two targets, and the guest side of the second.
- ``preflight``    — can this kernel run scenarios at all, and what does it offer (``features``).

Running and judging
- ``runner``       — executes a synthetic scenario next to the kernel under test and returns a ``Verdict``
                     (``qemu_runner`` the real-QEMU ones: postcopy, background snapshot).
- ``ledger``       — what both runners know of each region they judge: placed pages, holes, shrink snapshots.
- ``pagemap``      — the page-state oracle: per-4 KiB page state from /proc/PID/pagemap (+ kpageflags).
- ``oracle``       — diffs of page states: spurious holes, lost uffd-wp / soft-dirty bits.
- ``thp`` / ``memcg`` / ``shrinker`` — THP knobs (always restored), cgroup scopes, shrinker triggers.
- ``uffd``         — the C helper (``uffd_helper.c``) that performs userfaultfd sequences step by step.

Real QEMU
- ``pytest_qemu``  — the ``--qemu`` pytest plugin: which QEMUs, their ids, the summary line per QEMU.
- ``qemu_offers``  — what a QEMU offers (postcopy variants it accepts, /dev/userfaultfd), asked of it once.
- ``qemu_binary``  — is this a QEMU system emulator holecheck can drive (``MIN_QEMU``), and which version.
- ``qemu_process`` — one QEMU process: private 0700 dir, launch hooks, ``LaunchError``, one way to stop.
- ``machine``      — ``RamMachine``: an L2 QEMU whose guest only halts (``bios``), RAM read through ``qtest``.
- ``migration``    — postcopy and background-snapshot steps over QMP, in the style of QEMU's migration tests.
- ``inject``       — negative controls: change a QEMU's memory state from outside (gdb calls madvise).
- ``vm``           — ``QemuVm``: the L1 VM (microvm, virtiofsd, virtio-serial ports) a guest target boots.

Plumbing
- ``errors``       — the error tree (all derive from ``HolecheckError``), drawn in its docstring.
- ``waits``        — bounded waits whose timeouts say what was awaited and what was seen last.
- ``procs``        — process trees and groups: ``stop_group`` is how every child we start is stopped.
- ``cache``        — where built and fetched artefacts are cached (``cache_root``), also for kernels/ and images/.
- ``locks``        — host-wide locks between holecheck processes that say who holds them.

Reports and tools
- ``outcomes``     — a run's cells: each test's outcome (JUnit XML or pytest's reports) with its verdict.
- ``report`` / ``pagemap_png`` — the per-run summary and page-map pictures.
- ``compare``      — which cells changed verdict between two runs (``report --compare``): a nightly's headline.
- ``reproducer``   — a standalone C reproducer (``reproducer_runtime.c``) for a synthetic scenario.
- ``bisect``       — bisect kernels for the first version whose verdict changes: Debian packages, and the CLI.
- ``bisect_step``  — one bisection step: a pytest session on one kernel, judged good / bad / skip / abort.
- ``bisect_tree``  — ``run-tree``: one ``git bisect run`` step on your kernel tree (built by ``kernels.git_tree``).
- ``prefetch``     — fetch the kernels a bisection's next step may need while the current one runs.
- ``soak``         — run a selection N times: per-cell outcomes and time spread, flaky cells first.

Like qemu.qmp, the package logs to the ``holecheck`` logger and stays silent unless the application configures
logging.
"""
import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())

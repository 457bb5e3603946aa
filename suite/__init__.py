"""holecheck: does splitting underused THPs corrupt what userfaultfd users see?

Every module, in reading order:

What a run is and what it yields
- ``scenario``     — a scenario is data: a list of steps (map, place, register, shrink, …).
- ``memory_axes``  — builders for the memory axes: RAM backing (memfd), THP origin, uffd WP features, CRIU's
                     soft-dirty / PAGE_IS_WRITTEN dump sequence, userfaultfd's RWP mode (Linux 7.3).
- ``content``      — the model's bytes of a data page (unique stamps, duplicates, sparse pages that test the
                     zero detector): what every side is judged against.
- ``verdict``      — the structured, JSON-serialisable result pytest asserts on.
- ``kernelspec``   — parsing ``--kernel`` values: which kernel a scenario runs on.
- ``options``      — checks of the command-line options that would otherwise fail late (``--artifacts``, …).

Where the kernel under test runs
(sub-package ``targets``)
- ``targets.base``    — the ``Target`` interface and its options.
- ``targets.opening`` — ``open_target``: a kernel spec → ``HostTarget`` (this kernel, this process) or
                        ``GuestTarget`` (an L1 VM, ``targets.vm``, talking to ``targets.agent`` inside it).
- ``targets.host`` / ``targets.guest`` / ``targets.agent`` — the two targets, and the guest side of the second.
- ``targets.vm``      — ``QemuVm``: the L1 VM (microvm, virtiofsd, virtio-serial ports) a guest target boots.
- ``targets.backends`` — ``--backend``: ``open_vm`` boots a ``VmSpec`` with QEMU directly or through libvirt.
- ``targets.libvirt_vm`` — ``LibvirtVm`` (``--backend=libvirt``): the same L1 VM as a transient domain of a
                        per-run embedded libvirt QEMU driver; leftovers of killed runs reaped.
- ``targets.preflight`` — can this kernel run scenarios at all, and what does it offer (``features``);
                        ``targets.ksm_probe`` measures one of them: does a KSM merge keep the uffd-wp bit.
- ``targets.program`` — a program the host built (a kselftest) run on the kernel under test, host or L1 agent.

Running and judging
- ``runner``       — executes a synthetic scenario next to the kernel under test and returns a ``Verdict``
                     (``qemu.runner`` the real-QEMU ones: postcopy, background snapshot).
- ``ledger``       — what both runners know of each region they judge: placed pages, holes, shrink snapshots.
- ``pagemap``      — the page-state oracle: per-4 KiB page state from /proc/PID/pagemap (+ kpageflags).
- ``oracle``       — diffs of page states: spurious holes, lost uffd-wp / soft-dirty bits.
- ``known_findings`` — measured kernel bugs not fixed on a default kernel: their cells xfail by name, page by page
                     within their signature (beyond it they fail).
- ``thp`` / ``memcg`` / ``shrinker`` — THP knobs (always restored), cgroup scopes, shrinker triggers.
- ``split_triggers`` — every other way to split a large folio (pageout, partial unmap, debugfs, KSM), folio sizes.
- ``host_knobs``   — the host-wide knobs a run changes (THP, mTHP, KSM, cgroup subtree_control), read in one place.
- ``l1_swap``      — a zram swap device set up and torn down inside an L1 VM (``pageout-swap``), never the host's.
- ``uffd``         — the C helper (``uffd_helper.c``) that performs userfaultfd sequences step by step.

Real QEMU (sub-package ``qemu``)
- ``qemu.plugin``  — the ``--qemu`` pytest plugin: which QEMUs, their ids, the summary line per QEMU.
- ``qemu.offers``  — what a QEMU offers (postcopy variants it accepts, /dev/userfaultfd), asked of it once.
- ``qemu.binary``  — is this a QEMU system emulator holecheck can drive (``MIN_QEMU``), and which version.
- ``qemu.process`` — one QEMU process: private 0700 dir, launch hooks, ``LaunchError``, one way to stop.
- ``qemu.machine`` — ``RamMachine``: an L2 QEMU whose guest only halts (``qemu.bios``), RAM read through
                     ``qemu.qtest``.
- ``qemu.migration`` — postcopy and background-snapshot steps over QMP, in the style of QEMU's migration tests.
- ``qemu.inject``  — negative controls: change a QEMU's memory state from outside (madvise injected by ptrace).
- ``qemu.discards`` — QEMU's own discards of guest RAM, from its trace events: pages it took back are no holes.
- ``qemu.runner``  — runs a real-QEMU scenario (postcopy, background snapshot) and judges it with the ledger.
- ``qemu.migration_run`` — what both kinds share: the sides, the dirtier, walking steps, fill, split, compare;
  ``qemu.postcopy_run`` the postcopy phases, ``qemu.snapshot_run`` the background snapshot.
- ``qemu.ram_model`` — what holecheck wrote into a guest's RAM (fill, dirtier, writes): every side's RAM is judged
  against it (``lost-data``: data read as zeros; ``content``: any other difference).
- ``qemu.libvirt_domains`` — RAM machines as libvirt domains; the destination's private ``libvirtd``.
- ``qemu.libvirt_postcopy`` — postcopy through libvirt's migration API, extending ``qemu.postcopy_run``.

Plumbing
- ``errors``       — the error tree (all derive from ``HolecheckError``), drawn in its docstring.
- ``waits``        — bounded waits whose timeouts say what was awaited and what was seen last.
- ``procs``        — process trees and groups: ``stop_group`` is how every child we start is stopped.
- ``cache``        — where built and fetched artefacts are cached (``cache_root``), also for kernels/ and images/.
- ``locks``        — host-wide locks between holecheck processes that say who holds them.

Reports and tools (sub-packages ``reports`` and ``bisection``; the CLIs people type stay at the top: ``report``,
``bisect``, ``soak``)
- ``reports.outcomes`` — a run's cells: each test's outcome (JUnit XML or pytest's reports) with its verdict.
- ``report`` / ``reports.pagemap_png`` — the per-run summary and page-map pictures.
- ``reports.compare``  — which cells changed verdict between two runs (``report --compare``): a nightly's headline.
- ``reports.kcidb``    — ``--kcidb=FILE``: the session in KernelCI's KCIDB schema, validated by kcidb-io.
- ``reports.reproducer`` — a standalone C reproducer (``reproducer_runtime.c``) for a synthetic scenario.
- ``reports.kselftest`` — that reproducer as a kselftest of a finding (``kselftest_main.c``: TAP, skips).
- ``reports.upstream`` — a plain-text bug report for a finding: reproducer, kselftest, candidate patch, results.
- ``bisect``       — bisect kernels for the first version whose verdict changes: Debian packages, and the CLI.
- ``bisection.step``  — one bisection step: a pytest session on one kernel, judged good / bad / skip / abort.
- ``bisection.tree``  — ``run-tree``: one ``git bisect run`` step on your kernel tree (built by
                        ``kernels.git_tree``).
- ``bisection.prefetch`` — fetch the kernels a bisection's next step may need while the current one runs.
- ``soak``         — run a selection N times: per-cell outcomes and time spread, flaky cells first.

Like qemu.qmp, the package logs to the ``holecheck`` logger and stays silent unless the application configures
logging.
"""
import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())

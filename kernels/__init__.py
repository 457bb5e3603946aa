"""What to boot: Debian kernel packages fetched by version, the kconfig fragment the suite needs, and the pieces
of a kernel an L1 VM boots from (an uncompressed PVH ``vmlinux``, the modules its initramfs loads).

Where to start reading:

- ``debian``       — ``debian:VERSION`` → the kernel's packages fetched and unpacked into a cache, either packaging.
- ``versions``     — ``debian:SPEC`` parsing, the one order of Debian kernel ABIs, picking among packages.
- ``packages``     — the kernel stanzas of Debian's Packages indexes: suites, versions, split-packaging parts.
- ``apt``          — apt with holecheck's own sources and state; downloads checked against the index's SHA256.
- ``kernel``       — ``Kernel``: what a VM boots (image, config, modules) for a Debian package or a bzImage path.
- ``vmlinux``      — the uncompressed ELF vmlinux out of a vmlinuz, and whether it has a PVH entry.
- ``modules``      — ``.modinfo`` parsing and dependency order of the modules a boot needs.
- ``elf``          — the few ELF64 reads the two above need (notes, sections): the host may lack binutils/kmod.
- ``config_check`` — a kernel's config against ``holecheck.config``: one line per missing option.
- ``build``        — a kernel under test built from source (Debian's linux-source, or your git tree): the CLI,
                     and ``build(patched)``, Debian's twin or known-bad kernel, or a patch series
                     (``--kernel=patched:VERSION:SERIES``, a candidate fix from ``patches/SERIES/``).
- ``recipe``       — the config every build shares (``minimal.config`` + ``holecheck.config`` forced onto
                     allnoconfig, checked in the final .config) and the cache keys it shapes.
- ``kbuild``       — one build in one ``make O=`` output dir: configure, make bzImage under nice, publish.
- ``linux_source`` — Debian's linux-source, fetched and extracted once, and its patched twin (a hard-link farm).
- ``selftests``    — a source tree's uapi headers and its own mm selftests, built once (kselftests compile
                     against them; a candidate fix must keep upstream's tests green).
- ``git_tree``     — a user's Linux git tree (``--kernel=build:LINUX_TREE``, bisection) built out of tree.
- ``qemu``         — Debian's QEMUs by version, side by side (unpacked, or in a root of their own).
"""

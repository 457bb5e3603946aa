"""A standalone C reproducer for a synthetic scenario: one file a kernel developer builds and runs without Python.

``generate`` turns a ``postcopy-style`` / ``snapshot-style`` scenario (and, if given, the verdict it failed with)
into C: the scenario's steps and page selectors become tables (selectors as page runs computed here, so the C
touches exactly the pages the runner did, with the same syscall granularity), the fault handler is copied from
``uffd_helper.c`` at generation time (the very handler the suite ran), and a fixed runtime sets and restores the
THP knobs, scopes the shrinker to a memory cgroup, reads /proc/self/pagemap after every step and judges pages
exactly like ``runner.SyntheticRun.judge``.

    python -m suite.reproducer .holecheck/<test>/ [-o repro.c]     # from a failing cell's artifacts
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import numpy as np

from .oracle import runs
from .pagemap import PAGE, PAGES_PER_THP
from .scenario import OPS, Scenario, Step
from .uffd import SOURCE as HELPER_SOURCE
from .verdict import Verdict

# Sections of uffd_helper.c copied into the reproducer: includes, macros and globals; then pattern + handler.
PRELUDE = ("#define _GNU_SOURCE", "/* ---- growable string")
HANDLER = ("/* ---- page contents ---- */", "/* ---- commands ---- */")
KNOB_FILES = {"enabled": "enabled", "defrag": "defrag", "max_ptes_none": "khugepaged/max_ptes_none",
              "shrink_underused": "shrink_underused"}
BUILD = "cc -O2 -pthread repro.c -o repro"


def _slice(text: str, start: str, end: str) -> str:
    lo, hi = text.find(start), text.find(end)
    if lo < 0 or hi < lo:
        raise ValueError(f"{HELPER_SOURCE} no longer has the section {start!r} … {end!r} the reproducer copies")
    return text[lo:hi].rstrip() + "\n"


def c_string(text: str) -> str:
    """A C string literal (non-ASCII as octal UTF-8 bytes)."""
    out = []
    for b in text.encode():
        ch = chr(b)
        out.append("\\" + ch if ch in '"\\' else ch if 32 <= b < 127 else f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def _comment(text: str) -> str:
    return text.replace("*/", "* /")


def _ident(selector: str) -> str:
    return "SEL_" + selector.replace("-", "_")


def describe(step: Step, s: Scenario) -> str:
    """What a step does, for the header comment."""
    what = {
        "map": "mmap an anonymous region (2 MiB aligned)" + (" + MADV_HUGEPAGE" if step.arg == "hugepage" else ""),
        "place": f"write a unique stamp into the selected pages ({s.fill.data_per_thp} per 2 MiB chunk, "
                 f"{s.fill.layout}): faults THPs in",
        "nohugepage": "MADV_NOHUGEPAGE on the whole region",
        "discard": "MADV_DONTNEED on the selected pages (no longer placed)",
        "register": f"UFFDIO_REGISTER the region ({step.arg}); a handler thread resolves faults",
        "wp": "MADV_POPULATE_READ, then UFFDIO_WRITEPROTECT the selected pages" if step.arg == "1"
              else "UFFDIO_WRITEPROTECT mode 0 (un-protect) the selected pages",
        "clear-soft-dirty": "echo 4 > /proc/self/clear_refs",
        "shrink": "fire the deferred-split shrinker (memcg-scoped reclaim, else drop_caches)",
        "touch": f"{step.arg} every selected page",
        "verify": "compare every page with its expected content",
        "sabotage-punch": "NEGATIVE CONTROL: MADV_DONTNEED on placed pages (holes on purpose)",
        "sabotage-unprotect": "NEGATIVE CONTROL: un-protect pages behind the model's back",
    }[step.op]
    pages = "" if step.pages == "all" else f" [pages: {step.pages}, {int(s.selector(step.pages).sum())}]"
    return what + pages


def _header(s: Scenario, verdict: Verdict | None) -> str:
    name = f"{s.kind}[{s.name}-{s.thp.id}-{s.fill.id}]"
    knobs = " ".join(f"{KNOB_FILES[k]}={int(v) if isinstance(v, bool) else v}"
                     for k, v in s.thp.to_json().items() if v is not None)
    lines = [f"holecheck reproducer: {name}", ""]
    if s.kind == "postcopy-style":
        lines += ["QEMU postcopy's destination without QEMU: pages placed during precopy must never turn into",
                  "pte_none holes (a MISSING fault on a placed page is ignored by QEMU: its vCPU stalls for good)."]
    else:
        lines += ["QEMU background snapshot without QEMU: after UFFDIO_WRITEPROTECT every write must raise a WP",
                  "fault, and no uffd-wp bit (pagemap bit 57) may be lost when the shrinker splits underused THPs."]
    lines.append("")
    if verdict is not None:
        lines.append(f"Failed on kernel {verdict.kernel}; holecheck's verdict:")
        lines += ["  " + ln for ln in verdict.failure_message().splitlines()]
        lines.append("(Addresses are the suite's run's; this program also names pages by index from the region start.)")
    else:
        lines.append("Generated from the scenario alone (no verdict given).")
    lines += ["", f"The sequence, on one {s.size_mib} MiB region ({s.npages} pages of 4 KiB):"]
    lines += [f"  {i:2}. {st.phase}: {describe(st, s)}" for i, st in enumerate(s.steps, 1)]
    lines += [
        "",
        f"THP knobs while it runs (/sys/kernel/mm/transparent_hugepage/, restored at exit): {knobs}",
        f"Shrinker trigger: {s.trigger} (auto: the process moves itself into a fresh memory cgroup before touching",
        "memory and the shrinker is fired with cgroup v2 memory.reclaim or v1 memory.force_empty; no memory",
        "cgroup: drop_caches, host-wide). The cgroup is removed at exit, also on SIGINT/SIGTERM.",
        "",
        f"Build and run as root:  {BUILD} && ./repro [--timeout SECONDS] [--no-lock]",
        "",
        "Output: one line per bad page, '<kind> page <index> (chunk C subpage S, va 0x...) at <step>', kinds:",
        "  hole            a placed page became pte_none (neither present nor swapped)",
        "  missing-fault   a MISSING userfault on a placed page",
        "  no-wp-fault     a write to a write-protected page raised no WP fault",
        "  lost-uffd-wp    the uffd-wp bit of a protected page vanished across a step that must keep it",
        "  lost-soft-dirty the soft-dirty bit vanished across such a step",
        "  content         a page does not hold what was written to it",
        "  stall           a step did not finish within --timeout (a fault was never resolved)",
        "Lines starting with '#' are information (page-state counts per step, THPs around each shrink).",
        "Exit status: 0 no bad page, 1 bad pages or a stall, 2 set-up error.",
        "--no-lock: do not take /run/lock/holecheck-thp.lock (the caller holds it; holecheck's tests do).",
        "",
        "Generated by holecheck (suite/reproducer.py); the fault handler below is suite/uffd_helper.c's.",
    ]
    wrapped = []
    for ln in lines:  # long step descriptions and failure messages continue indented
        indent = " " * (len(ln) - len(ln.lstrip()) + 4)
        wrapped += textwrap.wrap(ln, 110, subsequent_indent=indent, break_on_hyphens=False) or [""]
    return "/*\n" + "".join(f" * {_comment(ln)}".rstrip() + "\n" for ln in wrapped) + " */\n"


def _runs_table(name: str, mask: np.ndarray) -> str:
    items = [f"{{{first}, {count}}}" for first, count in runs(mask)] or ["{0, 0}"]
    rows, row = [], "\t"
    for it in items:
        if len(row) + len(it) + 2 > 110:
            rows.append(row.rstrip())
            row = "\t"
        row += it + ", "
    rows.append(row.rstrip())
    return f"static const struct run {_ident(name)}[] = {{\n" + "\n".join(rows) + "\n};\n"


def _tables(s: Scenario, timeout: float) -> str:
    selectors = sorted({st.pages for st in s.steps})
    out = ["/* ---- the scenario (generated from scenario.json) ---- */", "",
           f"static const char SCENARIO[] = {c_string(f'{s.kind}[{s.name}-{s.thp.id}-{s.fill.id}]')};",
           f"#define REGION_SIZE ({s.npages}UL * PAGE)",
           f"static const char TRIGGER[] = {c_string(s.trigger)};",
           f"static const double DEFAULT_TIMEOUT = {timeout!r};", "",
           "/* THP knobs under /sys/kernel/mm/transparent_hugepage/; NULL: left as found */",
           "static const struct knob {", "\tconst char *file, *want;", "} KNOBS[] = {"]
    for key, value in s.thp.to_json().items():
        want = "NULL" if value is None else c_string(str(int(value) if isinstance(value, bool) else value))
        out.append(f"\t{{{c_string(KNOB_FILES[key])}, {want}}},")
    out += ["};", "", "struct run {", "\tsize_t first, count; /* pages */", "};", ""]
    out += [_runs_table(sel, s.selector(sel)) for sel in selectors]
    out += ["enum op {", "\t" + ", ".join("OP_" + op.upper().replace("-", "_") for op in OPS), "};", "",
            "struct step {", "\tenum op op;", "\tconst char *arg, *phase;", "\tconst struct run *runs;",
            "\tsize_t nruns;", "\tint keeps_bits; /* the step must not clear uffd-wp / soft-dirty bits */", "};",
            "#define RUNS(sel) sel, sizeof(sel) / sizeof(sel[0])", "static const struct step STEPS[] = {"]
    for st in s.steps:
        op = "OP_" + st.op.upper().replace("-", "_")
        out.append(f"\t{{{op}, {c_string(st.arg)}, {c_string(st.phase)}, RUNS({_ident(st.pages)}), "
                   f"{int(OPS[st.op])}}},")
    out += ["};", ""]
    return "\n".join(out) + "\n"


def generate(scenario: Scenario, verdict: Verdict | None = None, *, timeout: float = 10.0) -> str:
    """The C source of a standalone reproducer for ``scenario`` (a synthetic kind)."""
    if not scenario.synthetic:
        raise ValueError(f"a C reproducer needs a synthetic scenario, not {scenario.kind!r} (real QEMU)")
    if scenario.npages % PAGES_PER_THP:
        raise ValueError("the region must be a whole number of THPs")
    helper = HELPER_SOURCE.read_text()
    return "".join([
        _header(scenario, verdict), "\n",
        _slice(helper, *PRELUDE), "\n",
        "/* The helper's handler exits when its driver dies; here that exit must still restore the THP knobs. */\n",
        "#define _exit(status) exit(status)\n\n",
        _slice(helper, *HANDLER),
        "#undef _exit\n\n",
        _tables(scenario, timeout),
        RUNTIME,
    ])


def from_artifacts(directory: Path) -> str:
    """The reproducer of a failing synthetic cell: its ``scenario.json`` and, if present, ``verdict.json``."""
    scenario = Scenario.from_json((directory / "scenario.json").read_text())
    vpath = directory / "verdict.json"
    verdict = Verdict.from_json(vpath.read_text()) if vpath.exists() else None
    return generate(scenario, verdict)


def write(directory: Path, out: Path | None = None) -> Path:
    out = out or directory / "repro.c"
    out.write_text(from_artifacts(directory))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m suite.reproducer", description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path, help="a cell's artifacts directory, or a scenario.json")
    p.add_argument("-o", "--out", type=Path, help="output file (default: repro.c in the artifacts directory)")
    a = p.parse_args(argv)
    try:
        if a.source.is_dir():
            path = write(a.source, a.out)
        else:
            text = generate(Scenario.from_json(a.source.read_text()))
            path = a.out or a.source.with_name("repro.c")
            path.write_text(text)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"reproducer: {exc}", file=sys.stderr)
        return 2
    print(f"{path}\nbuild: {BUILD.replace('repro.c', str(path))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

assert PAGE == 4096  # the C side hard-codes 4 KiB pages (uffd_helper.c's PAGE)

RUNTIME = r"""/* ---- the reproducer's runtime (suite/reproducer.py) ---- */

#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>

#define THP_DIR "/sys/kernel/mm/transparent_hugepage/"
#define LOCK_PATH "/run/lock/holecheck-thp.lock"
#define PM_PFN_MASK ((1ULL << 55) - 1)
#define PM_SOFT_DIRTY (1ULL << 55)
#define PM_UFFD_WP (1ULL << 57)
#define PM_SWAPPED (1ULL << 62)
#define PM_PRESENT (1ULL << 63)
#define NSTEPS (sizeof(STEPS) / sizeof(STEPS[0]))
#define NKNOBS (sizeof(KNOBS) / sizeof(KNOBS[0]))

enum kind { K_HOLE, K_MISSING, K_NO_WP, K_LOST_WP, K_LOST_SD, K_CONTENT, NKINDS };
static const char *const KIND_NAMES[NKINDS] = {"hole", "missing-fault", "no-wp-fault", "lost-uffd-wp",
						"lost-soft-dirty", "content"};
static size_t bad_count[NKINDS];

static double timeout_s;
static int use_lock = 1;

/* The model (what must hold), as runner.SyntheticRun keeps it, and this step's observations. */
static uint8_t *sel, *fault_missing, *fault_wp, *placed, *wp_expected, *reported_holes, *mismatch;
static uint64_t *pm_before, *pm_after;
static uint64_t zero_pfn;
static int pagemap_fd = -1, wp_registered;
static size_t max_uffd_wp_bits;

/* ---- leaving the machine as found: async-signal-safe, runs once (exit, die, signal, stall) ---- */

static char knob_path[NKNOBS][128], knob_saved[NKNOBS][64];
static int knob_was_saved[NKNOBS];
static char cg_path[256], cg_home_procs[256], pid_text[32];
static int cg_version; /* 0: no memcg (drop_caches), 1 or 2 */
static int cleaned;

static int put(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return errno;
	ssize_t n = write(fd, text, strlen(text));
	int err = n < 0 ? errno : 0;
	close(fd);
	return err;
}

static void say(const char *a, const char *b)
{
	ssize_t r = write(2, a, strlen(a));
	r = write(2, b, strlen(b));
	r = write(2, "\n", 1);
	(void)r;
}

static void cleanup(void)
{
	if (__atomic_exchange_n(&cleaned, 1, __ATOMIC_SEQ_CST))
		return;
	for (size_t i = 0; i < NKNOBS; i++)
		if (knob_was_saved[i] && put(knob_path[i], knob_saved[i]))
			say("repro: could not restore ", knob_path[i]);
	if (cg_path[0]) {
		put(cg_home_procs, pid_text); /* out of the group, so it can go */
		if (rmdir(cg_path) && errno != ENOENT)
			say("repro: could not remove the memory cgroup ", cg_path);
	}
}

static void on_signal(int sig)
{
	cleanup();
	_exit(128 + sig);
}

static void die(const char *fmt, ...)
{
	va_list ap;
	fflush(stdout);
	fprintf(stderr, "repro: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	exit(2); /* atexit: cleanup() */
}

/* ---- THP knobs, the lock that serialises them with holecheck runs, the memory cgroup ---- */

static int read_knob(const char *path, char *out, size_t size)
{
	char text[256];
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, text, sizeof(text) - 1);
	close(fd);
	if (n < 0)
		return -1;
	text[n] = 0;
	char *v = text, *open_br = strchr(text, '['), *close_br = open_br ? strchr(open_br, ']') : NULL;
	if (open_br && close_br) { /* "always [madvise] never" */
		v = open_br + 1;
		*close_br = 0;
	}
	size_t len = strcspn(v, "\n");
	len = len < size ? len : size - 1;
	memcpy(out, v, len);
	out[len] = 0;
	return 0;
}

static void take_lock(void)
{
	int fd = open(LOCK_PATH, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0) {
		printf("# cannot open %s (%s): not serialised with holecheck runs\n", LOCK_PATH, strerror(errno));
		return;
	}
	if (flock(fd, LOCK_EX | LOCK_NB)) {
		char holder[32] = {0};
		if (pread(fd, holder, sizeof(holder) - 1, 0) < 0)
			holder[0] = 0;
		printf("# waiting for %s (held by pid %s: a holecheck run owns the THP knobs)\n", LOCK_PATH,
			holder[0] ? holder : "?");
		if (flock(fd, LOCK_EX))
			die("flock %s: %s", LOCK_PATH, strerror(errno));
	}
	if (ftruncate(fd, 0) || pwrite(fd, pid_text, strlen(pid_text), 0) < 0)
		printf("# could not write our pid into %s\n", LOCK_PATH);
	/* the descriptor stays open: the lock is ours until exit */
}

static void set_knobs(void)
{
	for (size_t i = 0; i < NKNOBS; i++) {
		snprintf(knob_path[i], sizeof(knob_path[i]), THP_DIR "%s", KNOBS[i].file);
		if (!KNOBS[i].want)
			continue;
		if (access(knob_path[i], F_OK)) {
			printf("# this kernel has no THP knob %s: no underused-THP shrinker to set\n", KNOBS[i].file);
			continue;
		}
		if (read_knob(knob_path[i], knob_saved[i], sizeof(knob_saved[i])))
			die("read %s: %s", knob_path[i], strerror(errno));
		knob_was_saved[i] = 1;
	}
	for (size_t i = 0; i < NKNOBS; i++) {
		if (!knob_was_saved[i])
			continue;
		int err = put(knob_path[i], KNOBS[i].want);
		if (err)
			die("cannot set THP %s=%s: %s", KNOBS[i].file, KNOBS[i].want, strerror(err));
		printf("# THP %s=%s (was %s)\n", KNOBS[i].file, KNOBS[i].want, knob_saved[i]);
	}
}

static void check_knobs(const char *phase)
{
	char now[64];
	for (size_t i = 0; i < NKNOBS; i++)
		if (knob_was_saved[i] && !read_knob(knob_path[i], now, sizeof(now)) && strcmp(now, KNOBS[i].want))
			die("at %s: THP %s changed under the reproducer: it is %s, we set %s", phase, KNOBS[i].file, now,
				KNOBS[i].want);
}

/* Like suite/memcg.py: a cgroup2 mount offering the memory controller, else v1's memory.force_empty. */
static int memcg_root(char *root, size_t size)
{
	static const char *const v2[] = {"/sys/fs/cgroup", "/sys/fs/cgroup/unified"};
	for (size_t i = 0; i < 2; i++) {
		char path[128], text[512];
		snprintf(path, sizeof(path), "%s/cgroup.controllers", v2[i]);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		ssize_t n = read(fd, text, sizeof(text) - 1);
		close(fd);
		text[n > 0 ? n : 0] = 0;
		for (char *save = NULL, *t = strtok_r(text, " \n", &save); t; t = strtok_r(NULL, " \n", &save))
			if (!strcmp(t, "memory")) {
				snprintf(root, size, "%s", v2[i]);
				return 2;
			}
	}
	if (!access("/sys/fs/cgroup/memory/memory.force_empty", F_OK)) {
		snprintf(root, size, "/sys/fs/cgroup/memory");
		return 1;
	}
	return 0;
}

/* Moves this process into a fresh memory cgroup BEFORE the region is touched: THPs are charged to the group
 * of the task that faults them in, and only then does a scoped reclaim reach their deferred-split queue. */
static void join_memcg(void)
{
	char root[128], procs[300];
	if (!strcmp(TRIGGER, "drop_caches"))
		return;
	int v = memcg_root(root, sizeof(root));
	if (!v) {
		if (!strcmp(TRIGGER, "memcg"))
			die("no memory cgroup controller (v2 memory or v1 memory.force_empty) to scope the shrinker");
		printf("# no memory cgroup: the shrinker is fired host-wide through drop_caches\n");
		return;
	}
	if (v == 2) {
		snprintf(procs, sizeof(procs), "%s/cgroup.subtree_control", root);
		put(procs, "+memory");
	}
	snprintf(cg_home_procs, sizeof(cg_home_procs), "%s/cgroup.procs", root);
	snprintf(cg_path, sizeof(cg_path), "%s/holecheck-repro-%s-%lx", root, pid_text, (unsigned long)time(NULL));
	if (mkdir(cg_path, 0755)) {
		int err = errno;
		cg_path[0] = 0;
		die("mkdir memory cgroup under %s: %s", root, strerror(err));
	}
	snprintf(procs, sizeof(procs), "%s/cgroup.procs", cg_path);
	int err = put(procs, pid_text);
	if (err)
		die("cannot move into %s: %s", cg_path, strerror(err));
	cg_version = v;
	printf("# memory cgroup v%d %s: the shrinker is scoped to it\n", v, cg_path);
}

static const char *fire_shrinker(void)
{
	char path[300];
	if (cg_version == 2) { /* no swap: anon cannot go, the write ends in EAGAIN after the shrinkers ran */
		snprintf(path, sizeof(path), "%s/memory.reclaim", cg_path);
		put(path, "1G");
		return "memcg-v2 memory.reclaim";
	}
	if (cg_version == 1) {
		snprintf(path, sizeof(path), "%s/memory.force_empty", cg_path);
		put(path, "0");
		return "memcg-v1 memory.force_empty";
	}
	put("/proc/sys/vm/drop_caches", "2"); /* every slab shrinker, the deferred split queues included */
	return "drop_caches";
}

/* ---- observing: pagemap, THPs of the region (smaps), vmstat ---- */

static void read_pagemap(uint64_t *out)
{
	size_t want = npages * sizeof(uint64_t), done = 0;
	off_t off = (off_t)((uintptr_t)region / PAGE * sizeof(uint64_t));
	while (done < want) {
		ssize_t n = pread(pagemap_fd, (char *)out + done, want - done, off + (off_t)done);
		if (n <= 0)
			die("short read of /proc/self/pagemap: %s", n < 0 ? strerror(errno) : "EOF");
		done += (size_t)n;
	}
}

static void probe_zero_pfn(void)
{
	char *p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap: %s", strerror(errno));
	(void)*(volatile char *)p; /* read fault: maps the shared zero page */
	uint64_t e = 0;
	if (pread(pagemap_fd, &e, sizeof(e), (off_t)((uintptr_t)p / PAGE * sizeof(e))) != sizeof(e) ||
		!(e & PM_PRESENT) || !(e & PM_PFN_MASK))
		die("pagemap shows no PFN for the zero page (not root?)");
	zero_pfn = e & PM_PFN_MASK;
	munmap(p, PAGE);
}

static long region_thps(void)
{
	FILE *f = fopen("/proc/self/smaps", "re");
	if (!f)
		return -1;
	char line[512];
	int inside = 0;
	long kb = 0, v;
	unsigned long lo, hi;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2)
			inside = lo < (unsigned long)region + region_size && hi > (unsigned long)region;
		else if (inside && sscanf(line, "AnonHugePages: %ld kB", &v) == 1)
			kb += v;
	}
	fclose(f);
	return kb / 2048;
}

static long vmstat(const char *key)
{
	FILE *f = fopen("/proc/vmstat", "re");
	char name[64];
	long v, found = -1;
	if (!f)
		return -1;
	while (fscanf(f, "%63s %ld", name, &v) == 2)
		if (!strcmp(name, key))
			found = v;
	fclose(f);
	return found;
}

static void print_counts(const char *phase, const uint64_t *pm, double seconds)
{
	size_t present = 0, zero = 0, hole = 0, swapped = 0, wp = 0, sd = 0;
	for (size_t i = 0; i < npages; i++) {
		uint64_t e = pm[i];
		present += !!(e & PM_PRESENT);
		zero += (e & PM_PRESENT) && (e & PM_PFN_MASK) == zero_pfn;
		swapped += !!(e & PM_SWAPPED);
		hole += !(e & (PM_PRESENT | PM_SWAPPED));
		wp += !!(e & PM_UFFD_WP);
		sd += !!(e & PM_SOFT_DIRTY);
	}
	if (wp > max_uffd_wp_bits)
		max_uffd_wp_bits = wp;
	printf("# %s: present %zu (zero page %zu), hole %zu, swapped %zu, uffd-wp %zu, soft-dirty %zu; "
		"%ld THPs [%.3f s]\n", phase, present, zero, hole, swapped, wp, sd, region_thps(), seconds);
}

/* ---- stall watchdog: a step blocked longer than --timeout is a stall, as for the suite's helper ---- */

static int64_t deadline_ns; /* 0: no step being timed */
static const char *timed_phase;

static int64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void *watchdog(void *arg)
{
	(void)arg;
	for (;;) {
		usleep(100000);
		int64_t d = __atomic_load_n(&deadline_ns, __ATOMIC_ACQUIRE);
		if (d && now_ns() > d) {
			printf("stall at %s: the step did not finish within %g s (blocked, e.g. on a userfaultfd fault "
				"nobody resolves)\n# verdict: stall\n", __atomic_load_n(&timed_phase, __ATOMIC_ACQUIRE),
				timeout_s);
			fflush(stdout);
			cleanup();
			_exit(1);
		}
	}
	return NULL;
}

/* ---- performing the steps ---- */

static void report(enum kind k, size_t idx, const char *phase)
{
	bad_count[k]++;
	printf("%s page %zu (chunk %zu subpage %zu, va 0x%lx) at %s\n", KIND_NAMES[k], idx, idx / 512, idx % 512,
		(unsigned long)region + idx * PAGE, phase);
}

static void do_map(const char *arg)
{
	/* Over-map by 2 MiB and trim, so the region starts on a PMD boundary and can hold THPs. */
	char *raw = mmap(NULL, REGION_SIZE + HPAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED)
		die("mmap: %s", strerror(errno));
	char *start = (char *)(((uintptr_t)raw + HPAGE - 1) & ~(HPAGE - 1));
	if (start > raw)
		munmap(raw, (size_t)(start - raw));
	if (start + REGION_SIZE < raw + REGION_SIZE + HPAGE)
		munmap(start + REGION_SIZE, (size_t)(raw + REGION_SIZE + HPAGE - (start + REGION_SIZE)));
	region_size = REGION_SIZE;
	region = start;
	if (!strcmp(arg, "hugepage") && madvise(region, region_size, MADV_HUGEPAGE))
		die("madvise MADV_HUGEPAGE: %s", strerror(errno));
}

static void advise(size_t first, size_t count, int advice, const char *name)
{
	if (madvise(region + first * PAGE, count * PAGE, advice))
		die("madvise %s pages %zu+%zu: %s", name, first, count, strerror(errno));
}

/* As uffd_helper's write_pages: expected first, so a fault on the store is resolved with this very content. */
static void write_pages(size_t first, size_t count, int kind)
{
	for (size_t idx = first; idx < first + count; idx++) {
		__atomic_store_n(&expected[idx], (uint8_t)kind, __ATOMIC_RELEASE);
		fill_pattern((uint64_t *)(region + idx * PAGE), idx, kind);
	}
}

static void do_register(const char *modes)
{
	__u64 mode = (strstr(modes, "missing") ? UFFDIO_REGISTER_MODE_MISSING : 0) |
			(strstr(modes, "wp") ? UFFDIO_REGISTER_MODE_WP : 0);
	int fd = (int)syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0 && (errno == EPERM || errno == ENOSYS)) {
		int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
		if (dev < 0)
			die("userfaultfd refused and /dev/userfaultfd: %s", strerror(errno));
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
		close(dev);
	}
	if (fd < 0)
		die("userfaultfd: %s", strerror(errno));
	/* Only PAGEFAULT_FLAG_WP, never WP_UNPOPULATED: unpopulated pages must stay plain holes, as for QEMU. */
	struct uffdio_api api = {.api = UFFD_API,
					.features = (mode & UFFDIO_REGISTER_MODE_WP) ? UFFD_FEATURE_PAGEFAULT_FLAG_WP : 0};
	if (ioctl(fd, UFFDIO_API, &api))
		die("UFFDIO_API: %s", strerror(errno));
	struct uffdio_register reg = {.range = {.start = (unsigned long)region, .len = region_size}, .mode = mode};
	if (ioctl(fd, UFFDIO_REGISTER, &reg))
		die("UFFDIO_REGISTER %s: %s", modes, strerror(errno));
	uffd = fd;
	wp_registered = !!(mode & UFFDIO_REGISTER_MODE_WP);
	pthread_t t;
	if (pthread_create(&t, NULL, handler, NULL))
		die("pthread_create");
	pthread_detach(t);
}

static void write_protect(size_t first, size_t count, int on)
{
	struct uffdio_writeprotect w = {.range = {.start = (unsigned long)region + first * PAGE, .len = count * PAGE},
					.mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0};
	int rc;
	while ((rc = ioctl(uffd, UFFDIO_WRITEPROTECT, &w)) && errno == EAGAIN)
		;
	if (rc)
		die("UFFDIO_WRITEPROTECT(%d) pages %zu+%zu: %s", on, first, count, strerror(errno));
}

/* Faults the handler resolved since the last drain: this step's. */
static void drain(uint8_t *missing, uint8_t *wp)
{
	pthread_mutex_lock(&hits_lock);
	memcpy(missing, hit_missing, npages);
	memcpy(wp, hit_wp, npages);
	memset(hit_missing, 0, npages);
	memset(hit_wp, 0, npages);
	pthread_mutex_unlock(&hits_lock);
}

static void shrink(const struct step *s)
{
	check_knobs(s->phase);
	long thp_before = region_thps(), splits_before = vmstat("thp_underused_split_page");
	const char *how = fire_shrinker();
	long thp_after = region_thps(), splits_after = vmstat("thp_underused_split_page");
	printf("# %s: %s: %ld -> %ld THPs in the region", s->phase, how, thp_before, thp_after);
	if (splits_before >= 0)
		printf(", thp_underused_split_page +%ld (host-wide)", splits_after - splits_before);
	printf("\n");
}

static void perform(const struct step *s)
{
	const struct run *r = s->runs;
	switch (s->op) {
	case OP_MAP:
		do_map(s->arg);
		break;
	case OP_PLACE:
		for (size_t i = 0; i < s->nruns; i++)
			write_pages(r[i].first, r[i].count, STAMP);
		break;
	case OP_NOHUGEPAGE:
		advise(0, npages, MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE");
		break;
	case OP_DISCARD:
	case OP_SABOTAGE_PUNCH:
		for (size_t i = 0; i < s->nruns; i++)
			advise(r[i].first, r[i].count, MADV_DONTNEED, "MADV_DONTNEED");
		break;
	case OP_REGISTER:
		do_register(s->arg);
		break;
	case OP_WP:
	case OP_SABOTAGE_UNPROTECT: {
		int on = s->op == OP_WP && !strcmp(s->arg, "1");
		if (uffd < 0)
			die("%s: not registered", s->phase);
		if (on) { /* like QEMU's snapshot: populate first, so every page is present to protect */
			advise(0, npages, MADV_POPULATE_READ, "MADV_POPULATE_READ");
			drain(fault_missing, fault_wp); /* the suite does not judge the populate's faults either */
		}
		for (size_t i = 0; i < s->nruns; i++)
			write_protect(r[i].first, r[i].count, on);
		break;
	}
	case OP_CLEAR_SOFT_DIRTY:
		if (put("/proc/self/clear_refs", "4"))
			die("clear_refs: %s", strerror(errno));
		break;
	case OP_SHRINK:
		shrink(s);
		break;
	case OP_TOUCH:
		for (size_t i = 0; i < s->nruns; i++) {
			if (!strcmp(s->arg, "write"))
				write_pages(r[i].first, r[i].count, WRITTEN);
			else
				for (size_t idx = r[i].first; idx < r[i].first + r[i].count; idx++)
					(void)*(volatile char *)(region + idx * PAGE);
		}
		break;
	case OP_VERIFY:
		memset(mismatch, 0, npages);
		for (size_t i = 0; i < s->nruns; i++)
			for (size_t idx = r[i].first; idx < r[i].first + r[i].count; idx++) {
				uint64_t want = pattern_word(idx, __atomic_load_n(&expected[idx], __ATOMIC_ACQUIRE));
				const volatile uint64_t *p = (const volatile uint64_t *)(region + idx * PAGE);
				for (size_t w = 0; w < WORDS && !mismatch[idx]; w++)
					mismatch[idx] = p[w] != want;
			}
		for (size_t idx = 0; idx < npages; idx++)
			if (mismatch[idx])
				report(K_CONTENT, idx, s->phase);
		break;
	}
}

/* runner.SyntheticRun.judge, page by page. */
static void judge(const struct step *s, const uint64_t *before, const uint64_t *after)
{
	const char *ph = s->phase;
	if (s->op == OP_DISCARD) /* on purpose: these pages will be re-supplied on MISSING faults */
		for (size_t i = 0; i < npages; i++)
			placed[i] &= !sel[i];
	for (size_t i = 0; i < npages; i++) /* QEMU thinks it has the page and never asks the source again */
		if (fault_missing[i] && placed[i])
			report(K_MISSING, i, ph);
	for (size_t i = 0; i < npages; i++)
		if (placed[i] && !(after[i] & (PM_PRESENT | PM_SWAPPED)) && !reported_holes[i]) {
			reported_holes[i] = 1;
			report(K_HOLE, i, ph);
		}
	for (size_t i = 0; i < npages; i++)
		placed[i] |= !!(after[i] & PM_PRESENT);
	if (s->op == OP_WP)
		for (size_t i = 0; i < npages; i++)
			if (sel[i])
				wp_expected[i] = !strcmp(s->arg, "1");
	if (s->op == OP_TOUCH && !strcmp(s->arg, "write")) {
		for (size_t i = 0; i < npages; i++)
			if (sel[i] && wp_expected[i] && !fault_wp[i])
				report(K_NO_WP, i, ph);
		for (size_t i = 0; i < npages; i++) /* the handler un-protected what it trapped, as QEMU does */
			wp_expected[i] &= !sel[i];
	}
	if (before && s->keeps_bits) {
		for (size_t i = 0; i < npages; i++) {
			int keep = s->op == OP_DISCARD ? !sel[i] : 1;
			if (keep && wp_expected[i] && (before[i] & PM_UFFD_WP) && !(after[i] & PM_UFFD_WP))
				report(K_LOST_WP, i, ph);
		}
		for (size_t i = 0; i < npages; i++) {
			int keep = s->op == OP_DISCARD ? !sel[i] : 1;
			if (keep && (before[i] & PM_SOFT_DIRTY) && !(after[i] & PM_SOFT_DIRTY))
				report(K_LOST_SD, i, ph);
		}
	}
}

static void run_step(const struct step *s, int first)
{
	memset(sel, 0, npages);
	for (size_t i = 0; i < s->nruns; i++)
		memset(sel + s->runs[i].first, 1, s->runs[i].count);
	int64_t t0 = now_ns();
	int timed = s->op != OP_SHRINK && s->op != OP_CLEAR_SOFT_DIRTY; /* the suite's helper commands */
	if (timed) {
		__atomic_store_n(&timed_phase, s->phase, __ATOMIC_RELEASE);
		__atomic_store_n(&deadline_ns, t0 + (int64_t)(timeout_s * 1e9), __ATOMIC_RELEASE);
	}
	perform(s);
	__atomic_store_n(&deadline_ns, 0, __ATOMIC_RELEASE);
	drain(fault_missing, fault_wp);
	read_pagemap(pm_after);
	judge(s, first ? NULL : pm_before, pm_after);
	print_counts(s->phase, pm_after, (double)(now_ns() - t0) / 1e9);
	uint64_t *t = pm_before;
	pm_before = pm_after;
	pm_after = t;
}

static void *zalloc(size_t n)
{
	void *p = calloc(n, 1);
	if (!p)
		die("out of memory");
	return p;
}

static void usage(const char *argv0)
{
	printf("usage: %s [--timeout SECONDS] [--no-lock]\n(as root) replays %s; see the comment at the top of "
		"the source\n", argv0, SCENARIO);
}

int main(int argc, char **argv)
{
	timeout_s = DEFAULT_TIMEOUT;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--no-lock")) {
			use_lock = 0;
		} else if (!strcmp(argv[i], "--timeout") && i + 1 < argc) {
			timeout_s = strtod(argv[++i], NULL);
		} else {
			usage(argv[0]);
			return strcmp(argv[i], "-h") && strcmp(argv[i], "--help") ? 2 : 0;
		}
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	struct utsname u;
	uname(&u);
	printf("# holecheck reproducer: %s on kernel %s\n", SCENARIO, u.release);
	if (geteuid())
		die("run as root: it sets THP knobs, creates a memory cgroup and reads PFNs from pagemap");
	parent_pid = getppid();
	snprintf(pid_text, sizeof(pid_text), "%d", (int)getpid());
	if (use_lock)
		take_lock();
	atexit(cleanup);
	struct sigaction sa = {.sa_handler = on_signal};
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	set_knobs();
	join_memcg(); /* before any memory of the region is touched */
	pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (pagemap_fd < 0)
		die("open /proc/self/pagemap: %s", strerror(errno));
	probe_zero_pfn();

	npages = REGION_SIZE / PAGE;
	expected = zalloc(npages);
	hit_missing = zalloc(npages);
	hit_wp = zalloc(npages);
	sel = zalloc(npages);
	fault_missing = zalloc(npages);
	fault_wp = zalloc(npages);
	placed = zalloc(npages);
	wp_expected = zalloc(npages);
	reported_holes = zalloc(npages);
	mismatch = zalloc(npages);
	pm_before = zalloc(npages * sizeof(uint64_t));
	pm_after = zalloc(npages * sizeof(uint64_t));
	pthread_t t;
	if (pthread_create(&t, NULL, watchdog, NULL))
		die("pthread_create");
	pthread_detach(t);

	for (size_t i = 0; i < NSTEPS; i++)
		run_step(&STEPS[i], i == 0);

	if (wp_registered && !max_uffd_wp_bits)
		printf("# the kernel reported no uffd-wp bit in pagemap: judged by WP faults alone\n");
	size_t total = 0;
	for (int k = 0; k < NKINDS; k++)
		total += bad_count[k];
	if (!total) {
		printf("# verdict: no bad page\n");
	} else {
		printf("# verdict: %zu bad page report(s):", total);
		for (int k = 0; k < NKINDS; k++)
			if (bad_count[k])
				printf(" %s %zu", KIND_NAMES[k], bad_count[k]);
		printf("\n");
	}
	cleanup();
	return total ? 1 : 0;
}
"""

/* ---- the reproducer's runtime (suite/reproducer_runtime.c, appended by suite/reproducer.py) ---- */

#include <signal.h>
#include <sys/file.h>
#include <sys/mount.h>
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

enum kind { K_HOLE, K_MISSING, K_NO_WP, K_LOST_WP, K_LOST_SD, K_CONTENT, K_STALE, K_LOST_DATA, K_NO_RWP, K_EXTRA_RWP,
	    K_ACCESSED_COLD, K_UNTOUCHED_HOT, NKINDS };
static const char *const KIND_NAMES[NKINDS] = {"hole", "missing-fault", "no-wp-fault", "lost-uffd-wp",
						"lost-soft-dirty", "content", "stale-dump", "lost-data", "no-rwp-fault",
						"extra-rwp-fault", "accessed-cold", "untouched-hot"};
static size_t bad_count[NKINDS];

static double timeout_s;
static int use_lock = 1;

/* The model (what must hold), as runner.SyntheticRun keeps it, and this step's observations. */
static uint8_t *sel, *fault_missing, *fault_wp, *placed, *wp_expected, *reported_holes, *mismatch;
static uint8_t *lost; /* content sparse: data pages already reported as lost-data (once each) */
static uint64_t *pm_before, *pm_after;
static uint64_t zero_pfn;
static int pagemap_fd = -1, wp_registered;
static uint8_t *written; /* memory axes: written since the last clear (soft-dirty / PAGE_IS_WRITTEN must show it) */
static int wp_async;     /* uffd WP_ASYNC: no WP fault messages; the dump judges */
static size_t max_uffd_wp_bits;
/* RWP (Linux 7.3): wp_expected holds the RWP-protected pages (the same uffd PTE bit, pagemap bit 57) */
static int rwp_registered, rwp_async;
static void *zalloc(size_t n);
static uint8_t *fault_rwp; /* RWP faults per page during this step (counts) */
static uint8_t *accessed;  /* read or written since RWP protection: PAGEMAP_SCAN's hot set must be exactly these */
static uint8_t *pmd_mapped; /* PMD-mapped before an async access: the kernel resolves such a THP whole */

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

static void map_memfd(const char *arg);

/* The region is [start, start + REGION_SIZE) inside the 2 MiB-larger reservation at raw: trim the rest, advise. */
static void adopt_region(char *raw, char *start, const char *arg)
{
	if (start > raw)
		munmap(raw, (size_t)(start - raw));
	if (start + REGION_SIZE < raw + REGION_SIZE + HPAGE)
		munmap(start + REGION_SIZE, (size_t)(raw + REGION_SIZE + HPAGE - (start + REGION_SIZE)));
	region_size = REGION_SIZE;
	region = start;
	if (!strcmp(arg, "hugepage") && madvise(region, region_size, MADV_HUGEPAGE))
		die("madvise MADV_HUGEPAGE: %s", strerror(errno));
}

static void do_map(const char *arg)
{
	if (BACKING_MEMFD) {
		map_memfd(arg);
		return;
	}
	/* Over-map by 2 MiB and trim, so the region starts on a PMD boundary and can hold THPs. */
	char *raw = mmap(NULL, REGION_SIZE + HPAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED)
		die("mmap: %s", strerror(errno));
	char *start = (char *)(((uintptr_t)raw + HPAGE - 1) & ~(HPAGE - 1));
	adopt_region(raw, start, arg);
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

/* Is TOKEN one of the comma-separated words of LIST ("rwp" is not "wp")? */
static int has_token(const char *list, const char *token)
{
	size_t n = strlen(token);
	for (const char *p = list; (p = strstr(p, token)); p += n)
		if ((p == list || p[-1] == ',') && (p[n] == ',' || !p[n]))
			return 1;
	return 0;
}

static void do_register(const char *modes)
{
	__u64 mode = (has_token(modes, "missing") ? UFFDIO_REGISTER_MODE_MISSING : 0) |
			(has_token(modes, "wp") ? UFFDIO_REGISTER_MODE_WP : 0) |
			(has_token(modes, "minor") ? UFFDIO_REGISTER_MODE_MINOR : 0) |
			(has_token(modes, "rwp") ? UFFDIO_REGISTER_MODE_RWP : 0);
	rwp_registered = !!(mode & UFFDIO_REGISTER_MODE_RWP);
	/* memory axes: WP_ASYNC / WP_UNPOPULATED as the register arg names them; uffd-wp on shmem for memfd;
	 * RWP: UFFD_FEATURE_RWP, and "async" is RWP_ASYNC there */
	extra_features = (has_token(modes, "async") ? (rwp_registered ? UFFD_FEATURE_RWP_ASYNC : 1ULL << 15) : 0) |
			 (has_token(modes, "unpopulated") ? 1ULL << 13 : 0) |
			 (BACKING_MEMFD && (mode & UFFDIO_REGISTER_MODE_WP) ? 1ULL << 12 : 0) |
			 (mode & UFFDIO_REGISTER_MODE_MINOR ? 1ULL << 10 : 0) | (rwp_registered ? UFFD_FEATURE_RWP : 0);
	wp_async = !rwp_registered && has_token(modes, "async");
	rwp_async = rwp_registered && has_token(modes, "async");
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
					.features = ((mode & UFFDIO_REGISTER_MODE_WP) ? UFFD_FEATURE_PAGEFAULT_FLAG_WP : 0) |
						    extra_features};
	unsigned long long asked = api.features; /* a failed UFFDIO_API zeroes the structure */
	if (ioctl(fd, UFFDIO_API, &api)) /* EINVAL: the kernel lacks a feature asked for (RWP: before Linux 7.3) */
		die("UFFDIO_API (features 0x%llx asked): %s", (unsigned long long)asked, strerror(errno));
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

/* UFFDIO_WRITEPROTECT or UFFDIO_RWPROTECT (struct uffdio_rwprotect has uffdio_writeprotect's layout) of pages. */
static void range_protect(unsigned long req, const char *name, __u64 on_mode, size_t first, size_t count, int on)
{
	struct uffdio_writeprotect w = {.range = {.start = (unsigned long)region + first * PAGE, .len = count * PAGE},
					.mode = on ? on_mode : 0};
	int rc;
	while ((rc = ioctl(uffd, req, &w)) && errno == EAGAIN)
		;
	if (rc)
		die("%s(%d) pages %zu+%zu: %s", name, on, first, count, strerror(errno));
}

static void write_protect(size_t first, size_t count, int on)
{
	range_protect(UFFDIO_WRITEPROTECT, "UFFDIO_WRITEPROTECT", UFFDIO_WRITEPROTECT_MODE_WP, first, count, on);
}

/* Faults the handler resolved since the last drain: this step's. */
static void drain(uint8_t *missing, uint8_t *wp)
{
	pthread_mutex_lock(&hits_lock);
	memcpy(missing, hit_missing, npages);
	memcpy(wp, hit_wp, npages);
	memset(hit_missing, 0, npages);
	memset(hit_wp, 0, npages);
	memcpy(fault_rwp, hit_rwp, npages);
	memset(hit_rwp, 0, npages);
	pthread_mutex_unlock(&hits_lock);
}

/* ---- RWP (Linux 7.3): UFFDIO_RWPROTECT, UFFDIO_SET_MODE, PAGEMAP_SCAN's PAGE_IS_ACCESSED ---- */

static void rw_protect(size_t first, size_t count, int on)
{
	range_protect(UFFDIO_RWPROTECT, "UFFDIO_RWPROTECT", UFFDIO_RWPROTECT_MODE_RWP, first, count, on);
}

static void set_mode(const char *mode)
{
	struct uffdio_set_mode m = {0};
	if (!strcmp(mode, "async"))
		m.enable = UFFD_FEATURE_RWP_ASYNC;
	else
		m.disable = UFFD_FEATURE_RWP_ASYNC;
	if (ioctl(uffd, UFFDIO_SET_MODE, &m))
		die("UFFDIO_SET_MODE %s: %s", mode, strerror(errno));
	rwp_async = !strcmp(mode, "async");
}

static void scan_category(uint8_t *out, __u64 mask, int cold);
#define PAGE_IS_HUGE (1ULL << 6)
#define PAGE_IS_ACCESSED (1ULL << 9)

/* The hot set (PAGE_IS_ACCESSED) and the cold set (inverted, resident pages) against the model. */
static void dump_accessed(const char *phase)
{
	uint8_t *hot = zalloc(npages), *cold = zalloc(npages);
	scan_category(hot, PAGE_IS_ACCESSED, 0);
	scan_category(cold, PAGE_IS_ACCESSED, 1);
	for (size_t i = 0; i < npages; i++)
		if (accessed[i] && (cold[i] || !hot[i]))
			report(K_ACCESSED_COLD, i, phase);
	for (size_t i = 0; i < npages; i++)
		if (wp_expected[i] && (hot[i] || !cold[i]))
			report(K_UNTOUCHED_HOT, i, phase);
	free(hot);
	free(cold);
}

/* ---- split triggers (suite/split_triggers.py): what a shrink step fires, SPLIT ---- */

#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif
#define KSM_DIR THP_DIR "../ksm/"
#define KSM_SCANS 20

static uint8_t *unmapped; /* pages partial-unmap discarded on purpose: no longer placed nor protected */

static long read_long(const char *path)
{
	char text[64];
	return read_knob(path, text, sizeof(text)) ? -1 : strtol(text, NULL, 10);
}

/* ksmd on demand (its knobs are in KNOBS: set at start with run=0, restored at exit): KSM_SCANS full scans. */
static const char *ksm_scan(void)
{
	if (access(KSM_DIR "run", F_OK))
		die("this kernel has no KSM (" KSM_DIR ")");
	if (madvise(region, region_size, MADV_MERGEABLE))
		die("madvise MADV_MERGEABLE: %s", strerror(errno));
	long first = read_long(KSM_DIR "full_scans");
	int64_t deadline = now_ns() + (int64_t)10e9;
	put(KSM_DIR "run", "1");
	while (read_long(KSM_DIR "full_scans") < first + KSM_SCANS) {
		if (now_ns() > deadline) {
			put(KSM_DIR "run", "0");
			die("KSM: %d full scans not done within 10 s (full_scans %ld, was %ld)", KSM_SCANS,
			    read_long(KSM_DIR "full_scans"), first);
		}
		usleep(2000);
	}
	put(KSM_DIR "run", "0");
	return "ksmd run=1 for 20 full scans";
}

/* debugfs split_huge_pages on exactly this process's region; debugfs mounted in a private dir if need be. */
static const char *debugfs_split(void)
{
	static char msg[160];
	char dir[64] = "/sys/kernel/debug", path[128], text[96];
	int mounted = 0;
	if (access("/sys/kernel/debug/split_huge_pages", F_OK)) {
		snprintf(dir, sizeof(dir), "/tmp/holecheck-repro-debugfs-XXXXXX");
		if (!mkdtemp(dir))
			die("mkdtemp: %s", strerror(errno));
		if (mount("none", dir, "debugfs", 0, NULL))
			die("mount debugfs on %s: %s", dir, strerror(errno));
		mounted = 1;
	}
	snprintf(path, sizeof(path), "%s/split_huge_pages", dir);
	snprintf(text, sizeof(text), "%d,%#lx,%#lx", (int)getpid(), (unsigned long)region,
		 (unsigned long)region + region_size);
	int err = put(path, text);
	if (mounted) {
		umount(dir);
		rmdir(dir);
	}
	if (err == EPERM)
		snprintf(msg, sizeof(msg), "debugfs split_huge_pages refused (%s, kernel lockdown?) CANNOT SPLIT",
			 strerror(err));
	else if (err)
		die("write %s: %s", path, strerror(err));
	else
		snprintf(msg, sizeof(msg), "debugfs split_huge_pages %s", text);
	return msg;
}

static const char *fire_split(void)
{
	/* reclaim; without swap the kernel still splits before add_to_swap fails. pageout-swap: the same here, with
	 * whatever swap is on (the suite sets up zram only inside its L1 VMs, never on a machine it does not own) */
	if (!strcmp(SPLIT, "pageout") || !strcmp(SPLIT, "pageout-swap")) {
		if (madvise(region, region_size, MADV_PAGEOUT))
			die("madvise MADV_PAGEOUT: %s", strerror(errno));
		return "MADV_PAGEOUT";
	}
	if (!strcmp(SPLIT, "partial-unmap")) { /* one zero subpage of every large folio: the deferred-split queue */
		if (!unmapped)
			unmapped = zalloc(npages);
		for (size_t i = 0; i < sizeof(SEL_partial) / sizeof(SEL_partial[0]); i++) {
			const struct run *r = &SEL_partial[i];
			if (!r->count)
				continue;
			if (madvise(region + r->first * PAGE, r->count * PAGE, MADV_DONTNEED))
				die("madvise MADV_DONTNEED: %s", strerror(errno));
			memset(unmapped + r->first, 1, r->count);
			memset(placed + r->first, 0, r->count);
			memset(wp_expected + r->first, 0, r->count);
			memset(accessed + r->first, 0, r->count); /* RWP: a hole is neither hot nor cold */
		}
		return fire_shrinker();
	}
	if (!strcmp(SPLIT, "debugfs"))
		return debugfs_split();
	if (!strncmp(SPLIT, "ksm", 3))
		return ksm_scan();
	return fire_shrinker();
}

static long size_splits(void)
{
	char path[128];
	snprintf(path, sizeof(path), THP_DIR "hugepages-%dkB/stats/split", FOLIO_KB);
	return read_long(path);
}

static void shrink(const struct step *s)
{
	check_knobs(s->phase);
	long thp_before = region_thps(), splits_before = vmstat("thp_underused_split_page");
	long all_before = vmstat("thp_split_page"), size_before = size_splits();
	const char *how = fire_split();
	long thp_after = region_thps(), splits_after = vmstat("thp_underused_split_page");
	printf("# %s: %s: %ld -> %ld THPs in the region", s->phase, how, thp_before, thp_after);
	if (splits_before >= 0)
		printf(", thp_underused_split_page +%ld (host-wide)", splits_after - splits_before);
	printf(", thp_split_page +%ld", vmstat("thp_split_page") - all_before);
	if (size_before >= 0)
		printf(", hugepages-%dkB/stats/split +%ld", FOLIO_KB, size_splits() - size_before);
	printf("\n");
}

/* ---- memory axes (issue 11): memfd backing, MADV_COLLAPSE, PAGEMAP_SCAN (WP_ASYNC), CRIU's dump ---- */

struct rt_page_region {
	__u64 start, end, categories;
};
struct rt_pm_scan_arg {
	__u64 size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted, category_mask,
		category_anyof_mask, return_mask;
};
#define RT_PAGEMAP_SCAN _IOWR('f', 16, struct rt_pm_scan_arg)

static void map_memfd(const char *arg)
{
	int fd = (int)syscall(__NR_memfd_create, "holecheck-repro", 1U /* MFD_CLOEXEC */);
	if (fd < 0 || ftruncate(fd, (off_t)REGION_SIZE))
		die("memfd_create/ftruncate: %s", strerror(errno));
	char *raw = mmap(NULL, REGION_SIZE + HPAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED)
		die("mmap: %s", strerror(errno));
	char *start = (char *)(((uintptr_t)raw + HPAGE - 1) & ~(HPAGE - 1));
	if (mmap(start, REGION_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED)
		die("mmap memfd: %s", strerror(errno));
	close(fd);
	adopt_region(raw, start, arg);
}

/* PAGEMAP_SCAN of the region with ARG's flags and categories (range and vector filled in here) into out[]. */
static void pm_scan(uint8_t *out, struct rt_pm_scan_arg arg)
{
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	static struct rt_page_region vec[1024];
	unsigned long base = (unsigned long)region, at = base, end = base + region_size;
	if (fd < 0)
		die("open /proc/self/pagemap: %s", strerror(errno));
	memset(out, 0, npages);
	while (at < end) {
		struct rt_pm_scan_arg a = arg;
		a.size = sizeof(a);
		a.start = at;
		a.end = end;
		a.vec = (uintptr_t)vec;
		a.vec_len = 1024;
		long n = ioctl(fd, RT_PAGEMAP_SCAN, &a);
		if (n < 0)
			die("PAGEMAP_SCAN (categories 0x%llx): %s", (unsigned long long)arg.category_mask, strerror(errno));
		for (long i = 0; i < n; i++)
			for (__u64 p = vec[i].start; p < vec[i].end; p += PAGE)
				out[(p - base) / PAGE] = 1;
		if (a.walk_end <= at)
			break;
		at = a.walk_end;
	}
	close(fd);
}

/* PAGE_IS_WRITTEN into out[] (clear: write-protect what it reports). */
static void scan_written(uint8_t *out, int clear)
{
	struct rt_pm_scan_arg a = {.flags = clear ? 3 : 0, .category_mask = 2, .return_mask = 2};
	pm_scan(out, a);
}

/* MASK (PAGE_IS_ACCESSED, PAGE_IS_HUGE) into out[]; cold: inverted; present or swapped pages only. */
static void scan_category(uint8_t *out, __u64 mask, int cold)
{
	struct rt_pm_scan_arg a = {.category_mask = mask, .return_mask = mask, .category_inverted = cold ? mask : 0,
				   .category_anyof_mask = (1 << 3) | (1 << 4) /* PAGE_IS_PRESENT | SWAPPED */};
	pm_scan(out, a);
}

static void memory_axes_step(const struct step *s)
{
	const struct run *r = s->runs;
	switch (s->op) {
	case OP_COLLAPSE:
		for (size_t i = 0; i < s->nruns; i++)
			advise(r[i].first, r[i].count, 25 /* MADV_COLLAPSE */, "MADV_COLLAPSE");
		break;
	case OP_CLEAR_WRITTEN:
		scan_written(mismatch, 1);
		memset(written, 0, npages);
		break;
	case OP_DUMP: { /* every page written since the clear must be in the dump, else it restores stale data */
		if (!strcmp(s->arg, "accessed")) {
			dump_accessed(s->phase);
			break;
		}
		if (!strcmp(s->arg, "written")) {
			scan_written(mismatch, 0);
		} else {
			read_pagemap(pm_after);
			for (size_t i = 0; i < npages; i++)
				mismatch[i] = !!(pm_after[i] & PM_SOFT_DIRTY);
		}
		for (size_t i = 0; i < npages; i++)
			if (written[i] && sel[i] && !mismatch[i])
				report(K_STALE, i, s->phase);
		break;
	}
	case OP_SABOTAGE_CLEAN: /* NEGATIVE CONTROL: the selected written pages read clean */
		if (!strcmp(s->arg, "written")) {
			for (size_t i = 0; i < s->nruns; i++)
				write_protect(r[i].first, r[i].count, 1);
		} else {
			/* one soft-dirty bit per PMD-mapped THP: PTE-map each THP holding both kinds first
			 * (MADV_DONTNEED of one page to be re-dirtied; the rewrite below brings it back) */
			for (size_t c = 0; c + 512 <= npages; c += 512) {
				size_t nsel = 0, anchor = npages;
				for (size_t i = c; i < c + 512; i++) {
					nsel += sel[i];
					if (!sel[i] && anchor == npages)
						anchor = i;
				}
				if (nsel && anchor < npages && madvise(region + anchor * PAGE, PAGE, MADV_DONTNEED))
					die("madvise(MADV_DONTNEED): %s", strerror(errno));
			}
			if (put("/proc/self/clear_refs", "4"))
				die("clear_refs: %s", strerror(errno));
			for (size_t i = 0; i < npages; i++) /* re-dirty all other pages with their own content */
				if (!sel[i])
					write_pages(i, 1, __atomic_load_n(&expected[i], __ATOMIC_ACQUIRE));
		}
		break;
	case OP_SABOTAGE_FILL: /* NEGATIVE CONTROL: data into zero subpages: those THPs are not underused */
		for (size_t i = 0; i < s->nruns; i++)
			write_pages(r[i].first, r[i].count, STAMP);
		break;
	default:
		break;
	}
}

static void perform(const struct step *s)
{
	const struct run *r = s->runs;
	switch (s->op) {
	case OP_MAP:
		do_map(s->arg);
		break;
	case OP_PLACE:
		for (size_t i = 0; i < s->nruns; i++) {
			write_pages(r[i].first, r[i].count, STAMP);
			memset(written + r[i].first, 1, r[i].count);
		}
		break;
	case OP_NOHUGEPAGE:
		advise(0, npages, MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE");
		break;
	case OP_DISCARD:
	case OP_SABOTAGE_PUNCH: /* memfd: MADV_REMOVE punches the page cache too, as QEMU's discard does */
		for (size_t i = 0; i < s->nruns; i++)
			advise(r[i].first, r[i].count, BACKING_MEMFD && strcmp(s->arg, "zap") ? MADV_REMOVE : MADV_DONTNEED,
			       "discard");
		break;
	case OP_REGISTER:
		do_register(s->arg);
		break;
	case OP_WP:
	case OP_SABOTAGE_UNPROTECT: {
		int on = s->op == OP_WP && s->arg[0] == '1';
		if (uffd < 0)
			die("%s: not registered", s->phase);
		if (on && !strstr(s->arg, "unpopulated")) { /* like QEMU's snapshot: populate first, so every page is present to protect */
			advise(0, npages, MADV_POPULATE_READ, "MADV_POPULATE_READ");
			drain(fault_missing, fault_wp); /* the suite does not judge the populate's faults either */
		}
		for (size_t i = 0; i < s->nruns; i++)
			write_protect(r[i].first, r[i].count, on);
		break;
	}
	case OP_RWP:
	case OP_SABOTAGE_UNRWP: {
		int on = s->op == OP_RWP && s->arg[0] == '1';
		if (uffd < 0)
			die("%s: not registered", s->phase);
		if (on) { /* RWP protects present PTEs only: populate first, so every page is protected */
			advise(0, npages, MADV_POPULATE_READ, "MADV_POPULATE_READ");
			drain(fault_missing, fault_wp);
		}
		for (size_t i = 0; i < s->nruns; i++)
			rw_protect(r[i].first, r[i].count, on);
		break;
	}
	case OP_SET_MODE:
		set_mode(s->arg);
		break;
	case OP_CLEAR_SOFT_DIRTY:
		if (put("/proc/self/clear_refs", "4"))
			die("clear_refs: %s", strerror(errno));
		memset(written, 0, npages);
		break;
	case OP_SHRINK:
		shrink(s);
		break;
	case OP_TOUCH:
		for (size_t i = 0; i < s->nruns; i++) {
			if (!strcmp(s->arg, "write") || !strcmp(s->arg, "zero")) {
				write_pages(r[i].first, r[i].count, s->arg[0] == 'w' ? WRITTEN : ZERO);
				memset(written + r[i].first, 1, r[i].count);
			} else
				for (size_t idx = r[i].first; idx < r[i].first + r[i].count; idx++)
					(void)*(volatile char *)(region + idx * PAGE);
		}
		break;
	case OP_COLLAPSE:
	case OP_CLEAR_WRITTEN:
	case OP_DUMP:
	case OP_SABOTAGE_CLEAN:
	case OP_SABOTAGE_FILL:
		memory_axes_step(s);
		break;
	case OP_VERIFY:
		for (size_t i = 0; i < s->nruns; i++)
			for (size_t idx = r[i].first; idx < r[i].first + r[i].count; idx++) {
				int zeroed, kind = __atomic_load_n(&expected[idx], __ATOMIC_ACQUIRE);
				long at = page_difference((const volatile uint64_t *)(region + idx * PAGE), idx, kind, &zeroed);
				if (at < 0 || lost[idx])
					continue;
				/* content sparse: a data page reading all zero is lost data, else a wrong byte */
				report(SPARSE_CONTENT && zeroed ? K_LOST_DATA : K_CONTENT, idx, s->phase);
				printf("#   first differing byte of page %zu: +0x%lx\n", idx, (unsigned long)at);
				lost[idx] = SPARSE_CONTENT && zeroed;
			}
		break;
	case OP_SABOTAGE_ZERO: /* NEGATIVE CONTROL: data pages zeroed behind the model (a misjudged zero detector) */
		for (size_t i = 0; i < s->nruns; i++)
			memset(region + r[i].first * PAGE, 0, r[i].count * PAGE);
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
	for (size_t i = 0; i < npages && !BACKING_MEMFD; i++) /* memfd: a zapped PTE keeps its page in the cache */
		if (placed[i] && !(after[i] & (PM_PRESENT | PM_SWAPPED)) && !reported_holes[i]) {
			reported_holes[i] = 1;
			report(K_HOLE, i, ph);
		}
	for (size_t i = 0; i < npages; i++)
		placed[i] |= !!(after[i] & PM_PRESENT);
	for (size_t i = 0; i < npages && SPARSE_CONTENT; i++) /* a data page mapping the zero page: its byte is gone */
		if (expected[i] != ZERO && (after[i] & PM_PRESENT) && (after[i] & PM_PFN_MASK) == zero_pfn && !lost[i]) {
			lost[i] = 1;
			report(K_LOST_DATA, i, ph);
		}
	if (s->op == OP_WP)
		for (size_t i = 0; i < npages; i++)
			if (sel[i])
				wp_expected[i] = !strcmp(s->arg, "1");
	if (s->op == OP_CLEAR_WRITTEN)
		memset(wp_expected, 1, npages);
	if (s->op == OP_RWP && s->arg[0] == '1')
		for (size_t i = 0; i < npages; i++)
			if (sel[i]) {
				wp_expected[i] = 1;
				accessed[i] = 0;
				if ((after[i] & PM_PRESENT) && !(after[i] & PM_UFFD_WP)) /* protected, yet no bit 57 */
					report(K_LOST_WP, i, ph);
			}
	if (rwp_registered && (s->op == OP_TOUCH || s->op == OP_VERIFY)) {
		/* async: an access to a PMD-mapped THP resolves the whole PMD (one uffd bit for its 512 pages) */
		for (size_t c = 0; rwp_async && c + 512 <= npages; c += 512) {
			int hit = 0;
			for (size_t i = c; i < c + 512; i++)
				hit |= sel[i] && pmd_mapped[i];
			for (size_t i = c; hit && i < c + 512; i++)
				sel[i] |= pmd_mapped[i];
		}
		/* sync: exactly the protected pages accessed raised one RWP fault each; async: none */
		for (size_t i = 0; i < npages; i++) {
			int due = !rwp_async && sel[i] && wp_expected[i];
			if (due && !fault_rwp[i])
				report(K_NO_RWP, i, ph);
			else if (fault_rwp[i] > 1 || (fault_rwp[i] && !due))
				report(K_EXTRA_RWP, i, ph);
			if (sel[i]) {
				wp_expected[i] = 0;
				accessed[i] = 1;
			}
		}
	} else if (s->op == OP_TOUCH && (!strcmp(s->arg, "write") || !strcmp(s->arg, "zero"))) {
		for (size_t i = 0; i < npages && !wp_async; i++)
			if (sel[i] && wp_expected[i] && !fault_wp[i])
				report(K_NO_WP, i, ph);
		for (size_t i = 0; i < npages; i++) /* the handler un-protected what it trapped, as QEMU does */
			wp_expected[i] &= !sel[i];
	}
	if (before && s->keeps_bits) {
		for (size_t i = 0; i < npages; i++) {
			int keep = s->op == OP_DISCARD ? !sel[i] : s->op == OP_SHRINK && unmapped ? !unmapped[i] : 1;
			if (keep && wp_expected[i] && (before[i] & PM_UFFD_WP) && !(after[i] & PM_UFFD_WP))
				report(K_LOST_WP, i, ph);
		}
		for (size_t i = 0; i < npages; i++) {
			int keep = s->op == OP_DISCARD ? !sel[i] : s->op == OP_SHRINK && unmapped ? !unmapped[i] : 1;
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
	if (rwp_registered && rwp_async && (s->op == OP_TOUCH || s->op == OP_VERIFY))
		scan_category(pmd_mapped, PAGE_IS_HUGE, 0);
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
	same_content = SAME_CONTENT;
	sparse_content = SPARSE_CONTENT;
	lost = zalloc(npages);
	expected = zalloc(npages);
	hit_missing = zalloc(npages);
	hit_wp = zalloc(npages);
	hit_rwp = zalloc(npages);
	fault_rwp = zalloc(npages);
	accessed = zalloc(npages);
	pmd_mapped = zalloc(npages);
	sel = zalloc(npages);
	fault_missing = zalloc(npages);
	fault_wp = zalloc(npages);
	placed = zalloc(npages);
	wp_expected = zalloc(npages);
	reported_holes = zalloc(npages);
	written = zalloc(npages);
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

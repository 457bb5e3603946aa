/*
 * uffd_helper — performs userfaultfd sequences step by step on ONE anonymous region, for holecheck.
 *
 * Driven by one command per line on stdin, answers one JSON line per command on stdout (the protocol is
 * described in suite/uffd.py). Between commands it is idle and touches no memory, so that the caller can
 * read /proc/PID/pagemap and fire the THP shrinker at exactly the moment it chooses.
 *
 * Why C and not Python: every store and load must be exactly the one asked for (no interpreter touching
 * the region behind our back), the fault handler must be a real thread that runs while the main thread is
 * blocked in a page fault (no GIL), and the file doubles as a standalone reproducer for kernel bug
 * reports: cc -O2 -Wall -Wextra -pthread uffd_helper.c -o uffd_helper
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
/* RWP (read-write protect, Linux 7.3): spelled from 7.3's include/uapi/linux/userfaultfd.h so that older headers
 * compile; a kernel without it answers UFFDIO_API without UFFD_FEATURE_RWP and the 'rwp' commands fail naming it */
#ifndef UFFDIO_REGISTER_MODE_RWP
#define UFFDIO_REGISTER_MODE_RWP ((__u64)1 << 3)
#endif
#ifndef UFFD_PAGEFAULT_FLAG_RWP
#define UFFD_PAGEFAULT_FLAG_RWP (1 << 3)
#endif
#ifndef UFFD_FEATURE_RWP
#define UFFD_FEATURE_RWP (1ULL << 17)
#define UFFD_FEATURE_RWP_ASYNC (1ULL << 18)
#endif
#ifndef UFFDIO_RWPROTECT
struct uffdio_rwprotect {
	struct uffdio_range range;
	__u64 mode;
};
#define UFFDIO_RWPROTECT_MODE_RWP ((__u64)1 << 0)
#define UFFDIO_RWPROTECT _IOWR(0xAA, 0x09, struct uffdio_rwprotect)
#endif
#ifndef UFFDIO_SET_MODE
struct uffdio_set_mode {
	__u64 enable, disable; /* features to toggle: only UFFD_FEATURE_RWP_ASYNC in 7.3 */
};
#define UFFDIO_SET_MODE _IOW(0xAA, 0x0A, struct uffdio_set_mode)
#endif

#define PAGE 4096UL
#define HPAGE (2UL << 20)
#define WORDS (PAGE / sizeof(uint64_t))
#define STAMP_MAGIC 0x484F4C4500000000ULL   /* "HOLE" */
#define WRITTEN_MAGIC 0x5752495400000000ULL /* "WRIT" */

enum expect { ZERO = 0, STAMP = 1, WRITTEN = 2 };

/* The region and what every page of it must contain. */
static char *region;
static size_t region_size, npages;
static uint8_t *expected; /* enum expect per page; written by main, read by the handler (atomics) */
/* Fill content 'same' (the 'content same' command): every page of a kind holds the same bytes, so KSM can
 * merge data pages too; default: a page's stamp carries its index (no two data pages alike). 'sparse' ('content
 * sparse'): one non-zero byte per data page, the rest zero (suite/content.py; tests the zero-subpage detector). */
static int same_content, sparse_content;

/* Faults the handler resolved since the last drain: one byte per page, so lists come out sorted and unique. */
static pthread_mutex_t hits_lock = PTHREAD_MUTEX_INITIALIZER;
static uint8_t *hit_missing, *hit_wp;
static uint8_t *hit_rwp; /* RWP faults per page (saturating count): exactly one per protected page is expected */

static int uffd = -1;
static pid_t parent_pid;
static __u64 extra_features; /* uffd features asked for by the 'features' command (memory axes block) */

/* ---- growable string for replies (a reply may list 16384+ pages) ---- */

struct buf {
	char *p;
	size_t len, cap;
};

static void buf_grow(struct buf *b, size_t more)
{
	if (b->len + more + 1 <= b->cap)
		return;
	size_t cap = b->cap ? b->cap : 256;
	while (cap < b->len + more + 1)
		cap *= 2;
	char *p = realloc(b->p, cap);
	if (!p) {
		fprintf(stderr, "uffd_helper: out of memory for a reply\n");
		exit(2);
	}
	b->p = p;
	b->cap = cap;
}

static void buf_printf(struct buf *b, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	buf_grow(b, (size_t)n);
	va_start(ap, fmt);
	vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
}

static void buf_json_string(struct buf *b, const char *s)
{
	buf_printf(b, "\"");
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			buf_printf(b, "\\%c", c);
		else if (c < 0x20)
			buf_printf(b, "\\u%04x", c);
		else
			buf_printf(b, "%c", c);
	}
	buf_printf(b, "\"");
}

/* Appends ,"name":[i,...] for every set byte of flags (clearing it when clear is set). */
static void buf_index_list(struct buf *b, const char *name, uint8_t *flags, size_t n, int clear)
{
	int first = 1;
	buf_printf(b, ",\"%s\":[", name);
	for (size_t i = 0; i < n; i++) {
		if (!flags[i])
			continue;
		if (clear)
			flags[i] = 0;
		buf_printf(b, first ? "%zu" : ",%zu", i);
		first = 0;
	}
	buf_printf(b, "]");
}

static void reply(struct buf *b)
{
	buf_printf(b, "}\n");
	fwrite(b->p, 1, b->len, stdout);
	fflush(stdout);
	free(b->p);
}

static void reply_error(const char *what, int err)
{
	struct buf b = {0};
	char msg[512];
	snprintf(msg, sizeof(msg), "%s: %s", what, strerror(err));
	buf_printf(&b, "{\"ok\":false,\"error\":");
	buf_json_string(&b, msg);
	reply(&b);
}

/* Starts an ok reply; callers append fields and call reply(). */
static struct buf reply_ok(void)
{
	struct buf b = {0};
	buf_printf(&b, "{\"ok\":true");
	return b;
}

/* Appends the faults the handler resolved during this command, and forgets them. */
static void drain_faults(struct buf *b)
{
	pthread_mutex_lock(&hits_lock);
	buf_index_list(b, "missing", hit_missing, npages, 1);
	buf_index_list(b, "wp", hit_wp, npages, 1);
	if (hit_rwp) { /* "rwp": pages that raised RWP faults; "rwp_repeat": those that raised more than one */
		uint8_t *repeat = calloc(npages, 1);
		for (size_t i = 0; repeat && i < npages; i++)
			repeat[i] = hit_rwp[i] > 1;
		buf_index_list(b, "rwp", hit_rwp, npages, 1);
		if (repeat)
			buf_index_list(b, "rwp_repeat", repeat, npages, 0);
		free(repeat);
	}
	pthread_mutex_unlock(&hits_lock);
}

/* ---- page contents ---- */

static uint64_t pattern_word(size_t idx, int kind)
{
	if (same_content)
		idx = 0;
	switch (kind) {
	case STAMP:
		return STAMP_MAGIC | idx;
	case WRITTEN:
		return WRITTEN_MAGIC | idx;
	default:
		return 0;
	}
}

/* Content 'sparse': the offset and value of page idx's one non-zero byte, as suite/content.py's sparse_spot (a
 * WRITTEN page: the same offset, the next value, so a rewrite shows). */
static void sparse_spot(size_t idx, int kind, size_t *offset, uint8_t *value)
{
	size_t rev = 0;
	for (int b = 0; b < 12; b++)
		rev |= ((idx >> b) & 1) << (11 - b);
	*offset = (rev * 1031 + 4095) % PAGE;
	*value = (uint8_t)((idx >> 12) % 255 + 1);
	if (kind == WRITTEN)
		*value = (uint8_t)(*value % 255 + 1);
}

static void fill_pattern(uint64_t *dst, size_t idx, int kind)
{
	int sparse = sparse_content && kind != ZERO;
	uint64_t w = sparse ? 0 : pattern_word(idx, kind);
	for (size_t i = 0; i < WORDS; i++)
		dst[i] = w;
	if (sparse) {
		size_t off;
		uint8_t v;
		sparse_spot(idx, kind, &off, &v);
		((volatile uint8_t *)dst)[off] = v;
	}
}

/* Compares page idx with its expected content: the offset of its first differing byte, or -1 where it holds what
 * it must; *zeroed says whether it reads all zero (lost data when data was expected). */
static long page_difference(const volatile uint64_t *p, size_t idx, int kind, int *zeroed)
{
	uint64_t want = pattern_word(idx, kind), spot_want = want;
	size_t spot = WORDS;
	if (sparse_content && kind != ZERO) {
		size_t off;
		uint8_t v;
		sparse_spot(idx, kind, &off, &v);
		want = 0;
		spot = off / 8;
		spot_want = (uint64_t)v << (8 * (off % 8));
	}
	long first = -1;
	uint64_t any = 0;
	for (size_t i = 0; i < WORDS; i++) {
		uint64_t got = p[i], w = i == spot ? spot_want : want;
		any |= got;
		if (got != w && first < 0) /* little endian: the lowest differing byte of the word comes first */
			first = (long)(i * 8 + (size_t)__builtin_ctzll(got ^ w) / 8);
	}
	*zeroed = !any;
	return first;
}

/* ---- the fault handler thread ---- */

static void handler_log(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "uffd_helper handler: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
}

static int wake(unsigned long addr)
{
	struct uffdio_range r = {.start = addr, .len = PAGE};
	if (ioctl(uffd, UFFDIO_WAKE, &r)) {
		handler_log("UFFDIO_WAKE 0x%lx: %s", addr, strerror(errno));
		return -1;
	}
	return 0;
}

static void resolve_missing(unsigned long addr, size_t idx, uint64_t *pagebuf)
{
	int kind = __atomic_load_n(&expected[idx], __ATOMIC_ACQUIRE);
	for (;;) {
		int rc, err;
		if (kind == ZERO) {
			struct uffdio_zeropage z = {.range = {.start = addr, .len = PAGE}, .mode = 0};
			rc = ioctl(uffd, UFFDIO_ZEROPAGE, &z);
			err = errno;
		} else {
			fill_pattern(pagebuf, idx, kind);
			struct uffdio_copy c = {.dst = addr, .src = (unsigned long)pagebuf, .len = PAGE, .mode = 0};
			rc = ioctl(uffd, UFFDIO_COPY, &c);
			err = errno;
		}
		if (rc == 0)
			return;
		if (err == EAGAIN) /* the mm is changing under us: try again */
			continue;
		if (err == EEXIST) { /* someone mapped it meanwhile: the faulting thread only needs waking */
			wake(addr);
			return;
		}
		/* Leave the faulter blocked: the caller sees a stall and this message on stderr. */
		handler_log("%s page %zu (0x%lx): %s", kind == ZERO ? "UFFDIO_ZEROPAGE" : "UFFDIO_COPY", idx, addr,
			    strerror(err));
		return;
	}
}

static void resolve_wp(unsigned long addr, size_t idx)
{
	/* Like QEMU's background snapshot once the page is saved: unprotect it, which wakes the writer. */
	struct uffdio_writeprotect w = {.range = {.start = addr, .len = PAGE}, .mode = 0};
	while (ioctl(uffd, UFFDIO_WRITEPROTECT, &w)) {
		if (errno == EAGAIN)
			continue;
		handler_log("UFFDIO_WRITEPROTECT(0) page %zu (0x%lx): %s", idx, addr, strerror(errno));
		return;
	}
}

/* RWP mode: like QEMU-style WP resolution, un-protect the faulting page (UFFDIO_RWPROTECT without MODE_RWP), which
 * restores its PTE permissions and wakes the thread (7.3's Documentation/admin-guide/mm/userfaultfd.rst). */
static void resolve_rwp(unsigned long addr, size_t idx)
{
	struct uffdio_rwprotect r = {.range = {.start = addr, .len = PAGE}, .mode = 0};
	while (ioctl(uffd, UFFDIO_RWPROTECT, &r)) {
		if (errno == EAGAIN)
			continue;
		handler_log("UFFDIO_RWPROTECT(0) page %zu (0x%lx): %s", idx, addr, strerror(errno));
		return;
	}
}

/* MINOR mode (shmem): map the page the cache already holds, as a VM's MINOR-mode postcopy does; counted only. */
static unsigned long minor_faults;

static void resolve_minor(unsigned long addr, size_t idx)
{
	struct uffdio_continue c = {.range = {.start = addr, .len = PAGE}, .mode = 0};
	__atomic_add_fetch(&minor_faults, 1, __ATOMIC_RELAXED);
	while (ioctl(uffd, UFFDIO_CONTINUE, &c)) {
		if (errno == EAGAIN)
			continue;
		if (errno == EEXIST) {
			wake(addr);
			return;
		}
		handler_log("UFFDIO_CONTINUE page %zu (0x%lx): %s", idx, addr, strerror(errno));
		return;
	}
}

static void *handler(void *arg)
{
	(void)arg;
	uint64_t *pagebuf;
	if (posix_memalign((void **)&pagebuf, PAGE, PAGE)) {
		handler_log("no memory for the page buffer");
		exit(2);
	}
	struct uffd_msg msgs[16];
	for (;;) {
		struct pollfd pfd = {.fd = uffd, .events = POLLIN};
		int n = poll(&pfd, 1, 500);
		if (n < 0 && errno != EINTR) {
			handler_log("poll: %s", strerror(errno));
			exit(2);
		}
		/* Our parent died (reparented): nobody will ever send quit. Don't outlive it, even if stalled. */
		if (getppid() != parent_pid)
			_exit(3);
		if (n <= 0)
			continue;
		if (pfd.revents & (POLLERR | POLLHUP)) {
			handler_log("poll: userfaultfd revents 0x%x", pfd.revents);
			exit(2);
		}
		ssize_t got = read(uffd, msgs, sizeof(msgs));
		if (got < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			handler_log("read: %s", strerror(errno));
			exit(2);
		}
		for (size_t i = 0; i < (size_t)got / sizeof(msgs[0]); i++) {
			struct uffd_msg *m = &msgs[i];
			if (m->event != UFFD_EVENT_PAGEFAULT) {
				handler_log("unexpected event 0x%x", m->event);
				continue;
			}
			unsigned long addr = (unsigned long)m->arg.pagefault.address & ~(PAGE - 1);
			if (addr < (unsigned long)region || addr >= (unsigned long)region + region_size) {
				handler_log("fault outside the region at 0x%lx", addr);
				continue;
			}
			size_t idx = (addr - (unsigned long)region) / PAGE;
			if (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_MINOR) { /* MINOR mode: the page is in the cache */
				resolve_minor(addr, idx);
				continue;
			}
			if (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_RWP) { /* counted before resolving, as below */
				pthread_mutex_lock(&hits_lock);
				if (hit_rwp[idx] < 255)
					hit_rwp[idx]++;
				pthread_mutex_unlock(&hits_lock);
				resolve_rwp(addr, idx);
				continue;
			}
			int is_wp = (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) != 0;
			/* Record before resolving: the faulting command cannot reply before we wake it. */
			pthread_mutex_lock(&hits_lock);
			(is_wp ? hit_wp : hit_missing)[idx] = 1;
			pthread_mutex_unlock(&hits_lock);
			if (is_wp)
				resolve_wp(addr, idx);
			else
				resolve_missing(addr, idx, pagebuf);
		}
	}
	return NULL;
}

/* ---- commands ---- */

/* Parses a decimal or 0x-hex byte count (no octal: "010" is ten). */
static int parse_num(const char *s, unsigned long *out)
{
	if (!s || !*s || *s == '-' || *s == '+')
		return -1;
	int base = (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) ? 16 : 10;
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, base);
	if (errno || *end || end == s || (base == 16 && end == s + 2))
		return -1;
	*out = (unsigned long)v;
	return 0;
}

/* Parses OFF LEN into a page range of the region, or replies with an error. */
static int parse_range(const char *cmd, char *off_s, char *len_s, unsigned long *off, unsigned long *len)
{
	char what[256];
	if (!region) {
		snprintf(what, sizeof(what), "%s: no region (map first)", cmd);
		reply_error(what, EINVAL);
		return -1;
	}
	if (parse_num(off_s, off) || parse_num(len_s, len)) {
		snprintf(what, sizeof(what), "%s: expected OFF LEN, got '%s' '%s'", cmd, off_s ? off_s : "",
			 len_s ? len_s : "");
		reply_error(what, EINVAL);
		return -1;
	}
	if (*off % PAGE || *len % PAGE) {
		snprintf(what, sizeof(what), "%s: 0x%lx+0x%lx not 4 KiB aligned", cmd, *off, *len);
		reply_error(what, EINVAL);
		return -1;
	}
	if (*off > region_size || *len > region_size - *off) {
		snprintf(what, sizeof(what), "%s: 0x%lx+0x%lx beyond the 0x%zx-byte region", cmd, *off, *len,
			 region_size);
		reply_error(what, ERANGE);
		return -1;
	}
	return 0;
}

/* The region is [start, start + size) inside the 2 MiB-larger reservation at raw: trim the rest, allocate the
 * model's per-page arrays and answer with the region's address (map and map-memfd). */
static void adopt_region(char *raw, char *start, unsigned long size)
{
	if (start > raw)
		munmap(raw, (size_t)(start - raw));
	if (start + size < raw + size + HPAGE)
		munmap(start + size, (size_t)(raw + size + HPAGE - (start + size)));
	npages = size / PAGE;
	expected = calloc(npages, 1);
	hit_missing = calloc(npages, 1);
	hit_wp = calloc(npages, 1);
	hit_rwp = calloc(npages, 1);
	if (!expected || !hit_missing || !hit_wp || !hit_rwp) {
		reply_error("map: calloc", ENOMEM);
		exit(2);
	}
	region_size = size;
	region = start;
	struct buf b = reply_ok();
	buf_printf(&b, ",\"addr\":%" PRIuPTR ",\"pid\":%d", (uintptr_t)region, (int)getpid());
	reply(&b);
}

static void cmd_map(char *size_s)
{
	unsigned long size;
	if (region) {
		reply_error("map: a region is already mapped", EBUSY);
		return;
	}
	if (parse_num(size_s, &size) || size == 0 || size % PAGE) {
		reply_error("map: SIZE must be a non-zero multiple of 4 KiB", EINVAL);
		return;
	}
	/* Over-map by 2 MiB and trim, so the region starts on a PMD boundary and can hold THPs. */
	char *raw = mmap(NULL, size + HPAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED) {
		reply_error("map: mmap", errno);
		return;
	}
	char *start = (char *)(((uintptr_t)raw + HPAGE - 1) & ~(HPAGE - 1));
	adopt_region(raw, start, size);
}

static void cmd_madvise(char *advice_s, char *off_s, char *len_s)
{
	static const struct {
		const char *name;
		int advice;
	} advices[] = {
		{"hugepage", MADV_HUGEPAGE},
		{"nohugepage", MADV_NOHUGEPAGE},
		{"dontneed", MADV_DONTNEED}, /* expected stays: the handler re-supplies it, as QEMU's source re-sends */
		{"populate_read", MADV_POPULATE_READ},
		{"mergeable", MADV_MERGEABLE}, /* split triggers: KSM scans (and splits) only mergeable ranges */
		{"remove", MADV_REMOVE}, /* memfd: frees the page cache too (QEMU's discard of shared RAM) */
	};
	int advice = -1;
	for (size_t i = 0; advice_s && i < sizeof(advices) / sizeof(advices[0]); i++)
		if (!strcmp(advice_s, advices[i].name))
			advice = advices[i].advice;
	if (advice < 0) {
		reply_error("madvise: advice must be hugepage|nohugepage|dontneed|populate_read|mergeable|remove", EINVAL);
		return;
	}
	unsigned long off, len;
	if (parse_range("madvise", off_s, len_s, &off, &len))
		return;
	if (madvise(region + off, len, advice)) {
		char what[128];
		snprintf(what, sizeof(what), "madvise %s", advice_s);
		reply_error(what, errno);
		return;
	}
	struct buf b = reply_ok();
	drain_faults(&b);
	reply(&b);
}

/* Fills pages with their pattern using plain stores (faulting in THPs, or uffd faults, as any writer would). */
static void write_pages(unsigned long off, unsigned long len, int kind)
{
	for (size_t idx = off / PAGE; idx < (off + len) / PAGE; idx++) {
		/* expected first: a fault on the store below is resolved with this very content */
		__atomic_store_n(&expected[idx], (uint8_t)kind, __ATOMIC_RELEASE);
		fill_pattern((uint64_t *)(region + idx * PAGE), idx, kind);
	}
}

static void cmd_place(char *off_s, char *len_s)
{
	unsigned long off, len;
	if (parse_range("place", off_s, len_s, &off, &len))
		return;
	write_pages(off, len, STAMP);
	struct buf b = reply_ok();
	drain_faults(&b);
	reply(&b);
}

static void cmd_register(char *modes_s)
{
	if (!region) {
		reply_error("register: no region (map first)", EINVAL);
		return;
	}
	if (uffd >= 0) {
		reply_error("register: already registered", EBUSY);
		return;
	}
	__u64 mode = 0;
	int bad = 0;
	char *save = NULL;
	for (char *m = strtok_r(modes_s, ",", &save); m; m = strtok_r(NULL, ",", &save)) {
		if (!strcmp(m, "missing"))
			mode |= UFFDIO_REGISTER_MODE_MISSING;
		else if (!strcmp(m, "wp"))
			mode |= UFFDIO_REGISTER_MODE_WP;
		else if (!strcmp(m, "minor"))
			mode |= UFFDIO_REGISTER_MODE_MINOR;
		else if (!strcmp(m, "rwp"))
			mode |= UFFDIO_REGISTER_MODE_RWP;
		else
			bad = 1;
	}
	if (!mode || bad) {
		reply_error("register: modes must be missing|wp|missing,wp|minor|rwp|missing,rwp", EINVAL);
		return;
	}
	int fd = (int)syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0 && (errno == EPERM || errno == ENOSYS)) {
		/* vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE: /dev/userfaultfd is the other door */
		int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
		if (dev < 0) {
			reply_error("register: userfaultfd syscall refused and open /dev/userfaultfd", errno);
			return;
		}
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
		int err = errno;
		close(dev);
		if (fd < 0) {
			reply_error("register: USERFAULTFD_IOC_NEW", err);
			return;
		}
	} else if (fd < 0) {
		reply_error("register: userfaultfd", errno);
		return;
	}
	/* Only PAGEFAULT_FLAG_WP, never WP_UNPOPULATED: unpopulated pages must stay plain holes, as for QEMU. */
	struct uffdio_api api = {.api = UFFD_API,
				 .features = ((mode & UFFDIO_REGISTER_MODE_WP) ? UFFD_FEATURE_PAGEFAULT_FLAG_WP : 0) |
				     ((mode & UFFDIO_REGISTER_MODE_RWP) ? UFFD_FEATURE_RWP : 0) | extra_features};
	if (ioctl(fd, UFFDIO_API, &api)) {
		reply_error("register: UFFDIO_API", errno);
		close(fd);
		return;
	}
	struct uffdio_register reg = {.range = {.start = (unsigned long)region, .len = region_size}, .mode = mode};
	if (ioctl(fd, UFFDIO_REGISTER, &reg)) {
		reply_error("register: UFFDIO_REGISTER", errno);
		close(fd);
		return;
	}
	uffd = fd;
	pthread_t t;
	int err = pthread_create(&t, NULL, handler, NULL);
	if (err) {
		reply_error("register: pthread_create", err);
		exit(2); /* registered without a handler: any fault would hang forever */
	}
	pthread_detach(t);
	struct buf b = reply_ok();
	buf_printf(&b, ",\"features\":%llu,\"ioctls\":%llu", (unsigned long long)api.features,
		   (unsigned long long)reg.ioctls);
	reply(&b);
}

/* wp and rwp: UFFDIO_WRITEPROTECT / UFFDIO_RWPROTECT of a range, on (ON_MODE) or off; both take a range and a
 * mode (struct uffdio_rwprotect has uffdio_writeprotect's layout). */
static void cmd_protect(const char *cmd, unsigned long req, const char *req_name, __u64 on_mode, char *off_s,
			char *len_s, char *on_s)
{
	unsigned long off, len;
	char what[96];
	if (parse_range(cmd, off_s, len_s, &off, &len))
		return;
	if (!on_s || (strcmp(on_s, "1") && strcmp(on_s, "0"))) {
		snprintf(what, sizeof(what), "%s: expected OFF LEN 1|0", cmd);
		reply_error(what, EINVAL);
		return;
	}
	if (uffd < 0) {
		snprintf(what, sizeof(what), "%s: not registered", cmd);
		reply_error(what, EINVAL);
		return;
	}
	struct uffdio_writeprotect w = {.range = {.start = (unsigned long)region + off, .len = len},
					.mode = on_s[0] == '1' ? on_mode : 0};
	int rc;
	while ((rc = ioctl(uffd, req, &w)) && errno == EAGAIN)
		;
	if (rc) {
		snprintf(what, sizeof(what), "%s: %s", cmd, req_name);
		reply_error(what, errno);
		return;
	}
	struct buf b = reply_ok();
	drain_faults(&b);
	reply(&b);
}

static void cmd_touch(char *kind_s, char *off_s, char *len_s)
{
	int write;
	if (kind_s && !strcmp(kind_s, "read"))
		write = 0;
	else if (kind_s && !strcmp(kind_s, "write"))
		write = 1;
	else {
		reply_error("touch: expected read|write OFF LEN", EINVAL);
		return;
	}
	unsigned long off, len;
	if (parse_range("touch", off_s, len_s, &off, &len))
		return;
	if (write) {
		write_pages(off, len, WRITTEN);
	} else {
		for (unsigned long o = off; o < off + len; o += PAGE)
			(void)*(volatile char *)(region + o);
	}
	struct buf b = reply_ok();
	drain_faults(&b);
	reply(&b);
}

static void cmd_verify(char *off_s, char *len_s)
{
	unsigned long off, len;
	if (parse_range("verify", off_s, len_s, &off, &len))
		return;
	uint8_t *bad = calloc(npages, 1), *zeroed = calloc(npages, 1);
	struct buf first = {0};
	size_t nbad = 0;
	if (!bad || !zeroed) {
		reply_error("verify: calloc", ENOMEM);
		exit(2);
	}
	buf_printf(&first, ",\"first\":[");
	for (size_t idx = off / PAGE; idx < (off + len) / PAGE; idx++) {
		int zero;
		long at = page_difference((const volatile uint64_t *)(region + idx * PAGE), idx,
					  __atomic_load_n(&expected[idx], __ATOMIC_ACQUIRE), &zero);
		if (at < 0)
			continue;
		buf_printf(&first, nbad++ ? ",%ld" : "%ld", at); /* per mismatching page, in page order */
		bad[idx] = 1;
		zeroed[idx] = (uint8_t)zero;
	}
	buf_printf(&first, "]");
	struct buf b = reply_ok();
	buf_index_list(&b, "mismatch", bad, npages, 0);
	buf_printf(&b, "%s", first.p);
	buf_index_list(&b, "zeroed", zeroed, npages, 0);
	free(first.p);
	free(bad);
	free(zeroed);
	drain_faults(&b);
	reply(&b);
}

/* Negative control: zero the pages behind the model's back (their expected content stays), as a zero detector
 * that misjudged them would leave them. */
static void cmd_scrub(char *off_s, char *len_s)
{
	unsigned long off, len;
	if (parse_range("scrub", off_s, len_s, &off, &len))
		return;
	for (unsigned long o = off; o < off + len; o += sizeof(uint64_t))
		*(volatile uint64_t *)(region + o) = 0;
	struct buf b = reply_ok();
	drain_faults(&b);
	reply(&b);
}

/* ==== memory axes (issue 11): memfd backing, uffd features, zeroing writes, MADV_COLLAPSE, PAGEMAP_SCAN ====
 *
 *   features LIST       uffd features for the next register: none | wp-async,wp-unpopulated,wp-shmem,minor-shmem,
 *                       rwp,rwp-async
 *                       (replies with the kernel's "supported" mask; a feature it lacks is an error naming it)
 *   map-memfd SIZE      like map, but a MAP_SHARED memfd (shmem) region: shmem THPs per shmem_enabled
 *   zero OFF LEN        store zeros into the pages (CRIU's "overwrite with zeros": written, but zero-filled)
 *   rewrite OFF LEN     store every page's expected content again (sets soft-dirty / clears async uffd-wp)
 *   collapse OFF LEN    MADV_COLLAPSE (a THP born from 4 KiB pages)
 *   scan OFF LEN CLEAR  PAGEMAP_SCAN for PAGE_IS_WRITTEN; CLEAR=1 write-protects what it reports (WP_ASYNC)
 *   minor-faults        how many MINOR faults the handler resolved with UFFDIO_CONTINUE so far (register minor)
 */
#define HC_FEATURE_MINOR_SHMEM (1ULL << 10)
#define HC_FEATURE_WP_SHMEM (1ULL << 12)
#define HC_FEATURE_WP_UNPOPULATED (1ULL << 13)
#define HC_FEATURE_WP_ASYNC (1ULL << 15)
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 1U
#endif

/* include/uapi/linux/fs.h (6.7+), spelled here so older headers compile */
struct hc_page_region {
	__u64 start, end, categories;
};
struct hc_pm_scan_arg {
	__u64 size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted, category_mask,
		category_anyof_mask, return_mask;
};
#define HC_PAGEMAP_SCAN _IOWR('f', 16, struct hc_pm_scan_arg)
#define HC_PM_SCAN_WP_MATCHING (1ULL << 0)
#define HC_PM_SCAN_CHECK_WPASYNC (1ULL << 1)
#define HC_PAGE_IS_WRITTEN (1ULL << 1)

static const struct {
	const char *name;
	__u64 bit;
} hc_features[] = {
	{"wp-async", HC_FEATURE_WP_ASYNC},
	{"wp-unpopulated", HC_FEATURE_WP_UNPOPULATED},
	{"wp-shmem", HC_FEATURE_WP_SHMEM},
	{"minor-shmem", HC_FEATURE_MINOR_SHMEM},
	{"rwp", UFFD_FEATURE_RWP},
	{"rwp-async", UFFD_FEATURE_RWP_ASYNC}, /* needs rwp in the same UFFDIO_API: register rwp asks for it */
};

/* The features the kernel's UFFDIO_API offers (a throw-away userfaultfd), or -1 with errno. */
static long long supported_features(void)
{
	int fd = (int)syscall(__NR_userfaultfd, O_CLOEXEC);
	if (fd < 0) {
		int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
		if (dev < 0)
			return -1;
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC);
		close(dev);
		if (fd < 0)
			return -1;
	}
	struct uffdio_api api = {.api = UFFD_API, .features = 0};
	int rc = ioctl(fd, UFFDIO_API, &api);
	int err = errno;
	close(fd);
	errno = err;
	return rc ? -1 : (long long)api.features;
}

static void cmd_features(char *list)
{
	long long have = supported_features();
	if (have < 0) {
		reply_error("features: UFFDIO_API probe", errno);
		return;
	}
	__u64 want = 0;
	char *save = NULL;
	for (char *t = strtok_r(list, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
		size_t i, n = sizeof(hc_features) / sizeof(hc_features[0]);
		for (i = 0; i < n && strcmp(t, hc_features[i].name); i++)
			;
		if (i == n && strcmp(t, "none")) {
			reply_error("features: expected none or wp-async,wp-unpopulated,wp-shmem,minor-shmem,rwp,rwp-async",
				    EINVAL);
			return;
		}
		if (i == n)
			continue;
		if (!((__u64)have & hc_features[i].bit)) {
			char what[160];
			snprintf(what, sizeof(what), "features: the kernel lacks UFFD_FEATURE %s (offers 0x%llx)", t, have);
			reply_error(what, EOPNOTSUPP);
			return;
		}
		want |= hc_features[i].bit;
	}
	extra_features = want;
	struct buf b = reply_ok();
	buf_printf(&b, ",\"supported\":%lld", have);
	reply(&b);
}

static void cmd_map_memfd(char *size_s)
{
	unsigned long size;
	if (region) {
		reply_error("map-memfd: a region is already mapped", EBUSY);
		return;
	}
	if (parse_num(size_s, &size) || size == 0 || size % HPAGE) {
		reply_error("map-memfd: SIZE must be a non-zero multiple of 2 MiB", EINVAL);
		return;
	}
	int fd = (int)syscall(__NR_memfd_create, "holecheck", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, (off_t)size)) {
		reply_error("map-memfd: memfd_create/ftruncate", errno);
		return;
	}
	/* Reserve 2 MiB more, then map the memfd at the first PMD boundary: file offset 0 aligned too (shmem THPs). */
	char *raw = mmap(NULL, size + HPAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED) {
		reply_error("map-memfd: mmap reserve", errno);
		close(fd);
		return;
	}
	char *start = (char *)(((uintptr_t)raw + HPAGE - 1) & ~(HPAGE - 1));
	if (mmap(start, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) {
		reply_error("map-memfd: mmap memfd", errno);
		close(fd);
		return;
	}
	close(fd); /* the mapping keeps the file */
	adopt_region(raw, start, size);
}

static void cmd_zero_rewrite(const char *cmd, char *off_s, char *len_s)
{
	unsigned long off, len;
	if (parse_range(cmd, off_s, len_s, &off, &len))
		return;
	if (!strcmp(cmd, "zero"))
		write_pages(off, len, ZERO);
	else
		for (unsigned long o = off; o < off + len; o += PAGE)
			write_pages(o, PAGE, __atomic_load_n(&expected[o / PAGE], __ATOMIC_ACQUIRE));
	struct buf b = reply_ok();
	drain_faults(&b);
	reply(&b);
}

static void cmd_collapse(char *off_s, char *len_s)
{
	unsigned long off, len;
	if (parse_range("collapse", off_s, len_s, &off, &len))
		return;
	if (madvise(region + off, len, MADV_COLLAPSE)) {
		reply_error("collapse: madvise MADV_COLLAPSE", errno);
		return;
	}
	struct buf b = reply_ok();
	drain_faults(&b);
	reply(&b);
}

/* PAGEMAP_SCAN of OFF LEN with ARG's flags and categories (its range and vector filled in here); replies with the
 * matching pages as FIELD. */
static void scan_reply(const char *cmd, const char *field, char *off_s, char *len_s, struct hc_pm_scan_arg arg)
{
	unsigned long off, len;
	if (parse_range(cmd, off_s, len_s, &off, &len))
		return;
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		reply_error("scan: open /proc/self/pagemap", errno);
		return;
	}
	uint8_t *found = calloc(npages, 1);
	struct hc_page_region *vec = calloc(1024, sizeof(*vec));
	if (!found || !vec) {
		reply_error("scan: calloc", ENOMEM);
		exit(2);
	}
	unsigned long base = (unsigned long)region, at = base + off, end = base + off + len;
	while (at < end) {
		struct hc_pm_scan_arg a = arg;
		a.size = sizeof(a);
		a.start = at;
		a.end = end;
		a.vec = (uintptr_t)vec;
		a.vec_len = 1024;
		long n = ioctl(fd, HC_PAGEMAP_SCAN, &a);
		if (n < 0) {
			int err = errno;
			free(found);
			free(vec);
			close(fd);
			reply_error(err == ENOTTY ? "scan: PAGEMAP_SCAN (the kernel lacks it)" : "scan: PAGEMAP_SCAN", err);
			return;
		}
		for (long i = 0; i < n; i++)
			for (__u64 p = vec[i].start; p < vec[i].end; p += PAGE)
				found[(p - base) / PAGE] = 1;
		if (a.walk_end <= at) /* no progress: should not happen, but never loop forever */
			break;
		at = a.walk_end;
	}
	close(fd);
	free(vec);
	struct buf b = reply_ok();
	buf_index_list(&b, field, found, npages, 0);
	free(found);
	drain_faults(&b);
	reply(&b);
}

static void cmd_scan(char *off_s, char *len_s, char *clear_s)
{
	struct hc_pm_scan_arg a = {.category_mask = HC_PAGE_IS_WRITTEN, .return_mask = HC_PAGE_IS_WRITTEN};
	if (clear_s && !strcmp(clear_s, "1"))
		a.flags = HC_PM_SCAN_WP_MATCHING | HC_PM_SCAN_CHECK_WPASYNC;
	scan_reply("scan", "written", off_s, len_s, a);
}

/* Dispatch for this block: 1 if the command was one of it (and has been answered). */
static int memory_axes_command(const char *c, int argc, char **argv)
{
	if (!strcmp(c, "features") && argc == 2)
		cmd_features(argv[1]);
	else if (!strcmp(c, "map-memfd") && argc == 2)
		cmd_map_memfd(argv[1]);
	else if ((!strcmp(c, "zero") || !strcmp(c, "rewrite")) && argc == 3)
		cmd_zero_rewrite(c, argv[1], argv[2]);
	else if (!strcmp(c, "collapse") && argc == 3)
		cmd_collapse(argv[1], argv[2]);
	else if (!strcmp(c, "scan") && argc == 4)
		cmd_scan(argv[1], argv[2], argv[3]);
	else if (!strcmp(c, "minor-faults") && argc == 1) {
		struct buf b = reply_ok();
		buf_printf(&b, ",\"minor\":%lu", __atomic_load_n(&minor_faults, __ATOMIC_RELAXED));
		reply(&b);
	}
	else
		return 0;
	return 1;
}

/* ==== RWP (read-write protect, Linux 7.3; issue 21) ====
 *
 *   rwp OFF LEN 1|0              UFFDIO_RWPROTECT: 1 makes the present pages inaccessible (PROT_NONE + the uffd PTE
 *                                bit, pagemap bit 57), 0 restores them and wakes faulters (register rwp first)
 *   set-mode async|sync          UFFDIO_SET_MODE: enable / disable UFFD_FEATURE_RWP_ASYNC at run time (the only
 *                                feature 7.3 lets one toggle; sync → async wakes blocked faulters)
 *   scan-accessed OFF LEN COLD   PAGEMAP_SCAN for PAGE_IS_ACCESSED (the uffd bit clear on an RWP VMA): COLD=0 lists
 *                                the pages accessed since protection (the hot set), COLD=1 the resident pages not
 *                                accessed (ACCESSED inverted, present or swapped: holes carry neither)
 *   scan-huge OFF LEN            PAGEMAP_SCAN for PAGE_IS_HUGE: the pages mapped by a PMD now (async RWP resolves an
 *                                access to a PMD-mapped THP for the whole PMD: one uffd bit for its 512 pages)
 */
#define HC_PAGE_IS_PRESENT (1ULL << 3)
#define HC_PAGE_IS_SWAPPED (1ULL << 4)
#define HC_PAGE_IS_HUGE (1ULL << 6)
#define HC_PAGE_IS_ACCESSED (1ULL << 9)

static void cmd_set_mode(char *mode_s)
{
	if (!mode_s || (strcmp(mode_s, "async") && strcmp(mode_s, "sync"))) {
		reply_error("set-mode: expected async|sync", EINVAL);
		return;
	}
	if (uffd < 0) {
		reply_error("set-mode: not registered", EINVAL);
		return;
	}
	struct uffdio_set_mode m = {0};
	if (!strcmp(mode_s, "async"))
		m.enable = UFFD_FEATURE_RWP_ASYNC;
	else
		m.disable = UFFD_FEATURE_RWP_ASYNC;
	if (ioctl(uffd, UFFDIO_SET_MODE, &m)) {
		reply_error("set-mode: UFFDIO_SET_MODE", errno);
		return;
	}
	struct buf b = reply_ok();
	drain_faults(&b);
	reply(&b);
}

/* scan-accessed (mask PAGE_IS_ACCESSED, cold: inverted) and scan-huge (PAGE_IS_HUGE), present or swapped pages. */
static void cmd_scan_category(const char *cmd, char *off_s, char *len_s, __u64 mask, int cold)
{
	struct hc_pm_scan_arg a = {.category_mask = mask, .return_mask = mask, .category_inverted = cold ? mask : 0,
				   .category_anyof_mask = HC_PAGE_IS_PRESENT | HC_PAGE_IS_SWAPPED};
	scan_reply(cmd, "pages", off_s, len_s, a);
}

/* Dispatch for this block: 1 if the command was one of it (and has been answered). */
static int rwp_command(const char *c, int argc, char **argv)
{
	if (!strcmp(c, "rwp") && argc == 4)
		cmd_protect(c, UFFDIO_RWPROTECT, "UFFDIO_RWPROTECT", UFFDIO_RWPROTECT_MODE_RWP, argv[1], argv[2], argv[3]);
	else if (!strcmp(c, "set-mode") && argc == 2)
		cmd_set_mode(argv[1]);
	else if (!strcmp(c, "scan-accessed") && argc == 4)
		cmd_scan_category(c, argv[1], argv[2], HC_PAGE_IS_ACCESSED, !strcmp(argv[3], "1"));
	else if (!strcmp(c, "scan-huge") && argc == 3)
		cmd_scan_category(c, argv[1], argv[2], HC_PAGE_IS_HUGE, 0);
	else
		return 0;
	return 1;
}

int main(void)
{
	parent_pid = getppid();
	char *line = NULL;
	size_t cap = 0;
	ssize_t n;
	while ((n = getline(&line, &cap, stdin)) >= 0) {
		char *save = NULL;
		char *argv[6] = {0};
		int argc = 0;
		for (char *t = strtok_r(line, " \t\r\n", &save); t; t = strtok_r(NULL, " \t\r\n", &save)) {
			if (argc < 6)
				argv[argc] = t;
			argc++;
		}
		const char *c = argv[0] ? argv[0] : "";
		if (!strcmp(c, "quit")) {
			struct buf b = reply_ok();
			reply(&b);
			free(line);
			return 0;
		} else if (!strcmp(c, "content") && argc == 2 &&
			   (!strcmp(argv[1], "same") || !strcmp(argv[1], "unique") || !strcmp(argv[1], "sparse"))) {
			same_content = !strcmp(argv[1], "same"); /* before the first store: the model never changes */
			sparse_content = !strcmp(argv[1], "sparse");
			struct buf b = reply_ok();
			reply(&b);
		} else if (!strcmp(c, "map") && argc == 2) {
			cmd_map(argv[1]);
		} else if (!strcmp(c, "madvise") && argc == 4) {
			cmd_madvise(argv[1], argv[2], argv[3]);
		} else if (!strcmp(c, "place") && argc == 3) {
			cmd_place(argv[1], argv[2]);
		} else if (!strcmp(c, "register") && argc == 2) {
			cmd_register(argv[1]);
		} else if (!strcmp(c, "wp") && argc == 4) {
			cmd_protect("wp", UFFDIO_WRITEPROTECT, "UFFDIO_WRITEPROTECT", UFFDIO_WRITEPROTECT_MODE_WP, argv[1],
				    argv[2], argv[3]);
		} else if (!strcmp(c, "touch") && argc == 4) {
			cmd_touch(argv[1], argv[2], argv[3]);
		} else if (!strcmp(c, "verify") && argc == 3) {
			cmd_verify(argv[1], argv[2]);
		} else if (!strcmp(c, "scrub") && argc == 3) {
			cmd_scrub(argv[1], argv[2]);
		} else if (memory_axes_command(c, argc, argv) || rwp_command(c, argc, argv)) {
			/* handled by the memory axes or the RWP block */
		} else {
			char what[160];
			snprintf(what, sizeof(what), "unknown command or wrong argument count: '%.100s' (%d args)", c,
				 argc - (argc > 0));
			reply_error(what, EINVAL);
		}
	}
	free(line);
	return 0;
}

/*
 * The kselftest main of every generated kselftest (suite/reports/kselftest.py fills in the @...@ fields):
 * probes what the scenario needs (else skip), runs the reproducer (repro_main) in a child whose stdout and
 * stderr become '# ' lines, and reports one TAP result from its exit status: 0 no bad page, 1 bad pages,
 * anything else a replay that did not finish.
 */
#include <sys/wait.h>
#include "kselftest.h"

#define NEEDS_KSM @NEEDS_KSM@
#define NEEDS_UFFD_WP @NEEDS_UFFD_WP@
#define NEEDS_SOFT_DIRTY @NEEDS_SOFT_DIRTY@
static const char TEST_NAME[] = @NAME@;

/* userfaultfd with write-protect on private anonymous memory, as the reproducer registers it */
static const char *uffd_wp_missing(void)
{
	static const char *why;
	int fd = (int)syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);

	if (fd < 0) {
		int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);

		if (dev < 0)
			return "no userfaultfd (syscall and /dev/userfaultfd refused)";
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
		close(dev);
		if (fd < 0)
			return "no userfaultfd (USERFAULTFD_IOC_NEW failed)";
	}
	struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_PAGEFAULT_FLAG_WP};
	size_t len = (size_t)sysconf(_SC_PAGESIZE);
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct uffdio_register reg = {.range = {.start = (unsigned long)p, .len = len},
				      .mode = UFFDIO_REGISTER_MODE_WP};

	why = NULL;
	if (ioctl(fd, UFFDIO_API, &api) || !(api.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP))
		why = "userfaultfd lacks UFFD_FEATURE_PAGEFAULT_FLAG_WP";
	else if (p == MAP_FAILED || ioctl(fd, UFFDIO_REGISTER, &reg) ||
		 !(reg.ioctls & ((__u64)1 << _UFFDIO_WRITEPROTECT)))
		why = "UFFDIO_REGISTER_MODE_WP refused on anonymous memory";
	if (p != MAP_FAILED)
		munmap(p, len);
	close(fd);
	return why;
}

/* soft-dirty: pagemap bit 55 of a page just written (CONFIG_MEM_SOFT_DIRTY) */
static int soft_dirty_works(void)
{
	size_t len = (size_t)sysconf(_SC_PAGESIZE);
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	uint64_t entry = 0;

	if (p != MAP_FAILED)
		p[0] = 1;
	if (p == MAP_FAILED || fd < 0 ||
	    pread(fd, &entry, sizeof(entry), (off_t)((uintptr_t)p / len * sizeof(entry))) != sizeof(entry))
		entry = 0;
	if (fd >= 0)
		close(fd);
	if (p != MAP_FAILED)
		munmap(p, len);
	return !!(entry & (1ULL << 55));
}

int main(int argc, char **argv)
{
	const char *why;
	int out[2], status;
	pid_t pid;
	FILE *f;
	char line[4096];

	ksft_print_header();
	ksft_set_plan(1);
	if (geteuid())
		ksft_exit_skip("%s: needs root (THP and KSM knobs, a memory cgroup, PFNs in pagemap)\n", TEST_NAME);
	if (access("/sys/kernel/mm/transparent_hugepage/enabled", F_OK))
		ksft_exit_skip("%s: no transparent hugepages\n", TEST_NAME);
	if (NEEDS_KSM && access("/sys/kernel/mm/ksm/run", W_OK))
		ksft_exit_skip("%s: no KSM (/sys/kernel/mm/ksm/run)\n", TEST_NAME);
	if (NEEDS_UFFD_WP && (why = uffd_wp_missing()))
		ksft_exit_skip("%s: %s\n", TEST_NAME, why);
	if (NEEDS_SOFT_DIRTY && !soft_dirty_works())
		ksft_exit_skip("%s: no soft-dirty bit in pagemap (CONFIG_MEM_SOFT_DIRTY)\n", TEST_NAME);

	fflush(stdout);
	if (pipe(out))
		ksft_exit_fail_perror("pipe");
	pid = fork();
	if (pid < 0)
		ksft_exit_fail_perror("fork");
	if (!pid) {
		dup2(out[1], STDOUT_FILENO);
		dup2(out[1], STDERR_FILENO);
		close(out[0]);
		close(out[1]);
		exit(repro_main(argc, argv));
	}
	close(out[1]);
	f = fdopen(out[0], "r");
	while (f && fgets(line, sizeof(line), f))
		/* the reproducer's own '# ' information lines keep one '#' */
		ksft_print_msg("%s%s", line + (strncmp(line, "# ", 2) ? 0 : 2), strchr(line, '\n') ? "" : "\n");
	if (f)
		fclose(f);
	if (waitpid(pid, &status, 0) != pid)
		ksft_exit_fail_perror("waitpid");
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
		ksft_test_result_pass("%s\n", TEST_NAME);
	else if (WIFEXITED(status) && WEXITSTATUS(status) == 1)
		ksft_test_result_fail("%s\n", TEST_NAME);
	else
		ksft_test_result_error("%s: the replay did not finish (%s %d)\n", TEST_NAME,
				       WIFEXITED(status) ? "exit" : "signal",
				       WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
	ksft_finished();
}

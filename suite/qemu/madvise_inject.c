/*
 * madvise_inject PID ADVICE ADDR:LEN...  — call madvise(ADDR, LEN, ADVICE) inside process PID, for negative
 * controls that re-create a buggy kernel's effect (pte_none holes) inside a running QEMU.
 *
 * Why not gdb's "call": gdb writes the whole register set back, x87/SSE/AVX state included, and on some CPUs
 * (seen on the project's CI machines) the kernel refuses that write ("Couldn't write extended state status: Bad
 * address"), so the call never happens. Only the general-purpose registers are needed to make a system call:
 * stop the main thread (PTRACE_SEIZE + PTRACE_INTERRUPT), point it at a `syscall` instruction with the
 * arguments in its registers, single-step, read rax, restore the registers, detach. orig_rax = -1 while we
 * borrow the thread, so the kernel does not restart the system call it was stopped in over our registers;
 * restoring the saved registers (orig_rax included) lets it restart that call as if nothing had happened.
 *
 * Prints one line per range: "ADDR:LEN RESULT" (0 or -errno). Exit 0 only if every call returned 0.
 * x86_64 only (the suite's hosts and L1 VMs).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

static int die(const char *what)
{
	fprintf(stderr, "madvise_inject: %s: %s\n", what, strerror(errno));
	return 2;
}

/* Is there a `syscall` instruction (0f 05) at addr in the target? */
static int is_syscall_insn(int mem, uint64_t addr)
{
	unsigned char b[2];
	return pread(mem, b, 2, (off_t)addr) == 2 && b[0] == 0x0f && b[1] == 0x05;
}

/* A `syscall` instruction in an executable mapping of the target (libc has many; the vdso has one). */
static uint64_t find_syscall_insn(pid_t pid, int mem)
{
	char path[64], line[512];
	snprintf(path, sizeof(path), "/proc/%d/maps", pid);
	FILE *maps = fopen(path, "r");
	if (!maps)
		return 0;
	uint64_t found = 0;
	static unsigned char buf[1 << 16];
	while (!found && fgets(line, sizeof(line), maps)) {
		uint64_t lo, hi;
		char perms[5];
		if (sscanf(line, "%" SCNx64 "-%" SCNx64 " %4s", &lo, &hi, perms) != 3 || perms[2] != 'x')
			continue;
		for (uint64_t at = lo; !found && at < hi; at += sizeof(buf) - 1) {
			size_t want = hi - at < sizeof(buf) ? hi - at : sizeof(buf);
			ssize_t got = pread(mem, buf, want, (off_t)at);
			for (ssize_t i = 0; i + 1 < got; i++)
				if (buf[i] == 0x0f && buf[i + 1] == 0x05) {
					found = at + (uint64_t)i;
					break;
				}
			if (got <= 0)
				break;
		}
	}
	fclose(maps);
	return found;
}

static int stopped(pid_t pid, const char *what)
{
	int status;
	if (waitpid(pid, &status, __WALL) != pid)
		return die(what);
	if (!WIFSTOPPED(status)) {
		fprintf(stderr, "madvise_inject: %s: the target exited (status %#x)\n", what, status);
		return 2;
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: madvise_inject PID ADVICE ADDR:LEN...\n");
		return 2;
	}
	pid_t pid = (pid_t)atoi(argv[1]);
	long advice = strtol(argv[2], NULL, 0);
	char mempath[64];
	snprintf(mempath, sizeof(mempath), "/proc/%d/mem", pid);
	int mem = open(mempath, O_RDONLY);
	if (mem < 0)
		return die(mempath);
	if (ptrace(PTRACE_SEIZE, pid, 0, 0) < 0)
		return die("PTRACE_SEIZE");
	if (ptrace(PTRACE_INTERRUPT, pid, 0, 0) < 0)
		return die("PTRACE_INTERRUPT");
	if (stopped(pid, "waiting for the target to stop"))
		return 2;
	struct user_regs_struct saved, regs;
	if (ptrace(PTRACE_GETREGS, pid, 0, &saved) < 0)
		return die("PTRACE_GETREGS");
	/* stopped inside a system call, rip is just past its `syscall`: the cheapest place to find one */
	uint64_t insn = is_syscall_insn(mem, saved.rip - 2) ? saved.rip - 2 : find_syscall_insn(pid, mem);
	if (!insn) {
		fprintf(stderr, "madvise_inject: no syscall instruction found in pid %d\n", pid);
		ptrace(PTRACE_DETACH, pid, 0, 0);
		return 2;
	}
	int bad = 0;
	for (int i = 3; i < argc; i++) {
		uint64_t addr, len;
		if (sscanf(argv[i], "%" SCNi64 ":%" SCNi64, &addr, &len) != 2) {
			fprintf(stderr, "madvise_inject: bad range %s (ADDR:LEN)\n", argv[i]);
			bad = 1;
			break;
		}
		regs = saved;
		regs.rip = insn;
		regs.orig_rax = (uint64_t)-1;
		regs.rax = SYS_madvise;
		regs.rdi = addr;
		regs.rsi = len;
		regs.rdx = (uint64_t)advice;
		if (ptrace(PTRACE_SETREGS, pid, 0, &regs) < 0 || ptrace(PTRACE_SINGLESTEP, pid, 0, 0) < 0) {
			bad = die("PTRACE_SETREGS/SINGLESTEP");
			break;
		}
		if (stopped(pid, "single-stepping the syscall"))
			return 2;
		if (ptrace(PTRACE_GETREGS, pid, 0, &regs) < 0) {
			bad = die("PTRACE_GETREGS");
			break;
		}
		if (regs.rip != insn + 2) {
			fprintf(stderr, "madvise_inject: the step ended at %#llx, not after the syscall at %#" PRIx64 "\n",
				regs.rip, insn);
			bad = 1;
			break;
		}
		printf("%s %lld\n", argv[i], (long long)regs.rax);
		bad |= regs.rax != 0;
	}
	if (ptrace(PTRACE_SETREGS, pid, 0, &saved) < 0)
		return die("PTRACE_SETREGS (restoring the target's registers)");
	if (ptrace(PTRACE_DETACH, pid, 0, 0) < 0)
		return die("PTRACE_DETACH");
	return bad;
}

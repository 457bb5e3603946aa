"""A Debian linux-source tree's own selftests and headers, built once into its cache directory:

    build/src/<version>/headers/usr/include   ``make headers`` (O=): the uapi headers a selftest includes
    build/src/<version>/selftests-mm/NAME     ``make -C tools/testing/selftests/mm`` targets (OUTPUT=)

What a kselftest of holecheck's compiles against (``-I tools/testing/selftests -I usr/include``) and where the
upstream tests a candidate fix must keep green (``ksm_functional_tests``, ``uffd-unit-tests``) come from. The
cache is visible (read-only) inside L1 VMs, so the binaries run there as built.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from suite import locks

from .kbuild import build_root, run
from .linux_source import Source, fetch_source, source_version

HEADERS_TIMEOUT = 900.0
SELFTEST_TIMEOUT = 600.0
MM_TESTS = ("ksm_functional_tests", "uffd-unit-tests")


@dataclass(frozen=True)
class SelftestTree:
    """A source tree and its ``make headers`` output: what ``-I`` a selftest compile needs."""

    source: Source

    @property
    def tree(self) -> Path:
        return self.source.pristine

    @property
    def headers(self) -> Path:
        """The O= dir holding usr/include."""
        return self.source.root / "headers"

    @property
    def selftests(self) -> Path:
        return self.tree / "tools/testing/selftests"


def _extracted(series: str) -> str | None:
    """The newest Debian version of ``series`` (7.3) already extracted in the cache: no apt round trip then."""
    if not re.fullmatch(r"\d+\.\d+", series):
        return None
    done = [p.read_text().strip() for p in (build_root() / "src").glob(f"{series}.*/pristine.complete")]
    return max(done, key=lambda v: [int(x) for x in re.findall(r"\d+", v)], default=None)


def selftest_tree(version: str = "7.3") -> SelftestTree:
    """Debian's linux-source ``version`` (a series, a release or a Debian version), extracted, with its uapi headers
    made (once, under a lock)."""
    src = fetch_source(_extracted(version) or source_version(version))
    st = SelftestTree(src)
    done = src.root / "headers.complete"
    if not done.exists():
        with locks.held(src.root / "headers.lock", "make headers of another holecheck run", HEADERS_TIMEOUT):
            if not done.exists():
                run(["nice", "-n", "10", "make", "-s", "-C", str(src.pristine), f"O={st.headers}", "headers"],
                    f"make headers (O={st.headers})", HEADERS_TIMEOUT, capture=True)
                done.write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
    return st


def mm_selftests(st: SelftestTree, names: tuple[str, ...] = MM_TESTS) -> dict[str, Path]:
    """Build tools/testing/selftests/mm targets with the tree's own Makefile and headers; name → binary."""
    out = st.source.root / "selftests-mm"
    out.mkdir(exist_ok=True)
    binaries = {name: out / name for name in names}
    with locks.held(st.source.root / "selftests-mm.lock", "a selftests build of another holecheck run",
                    SELFTEST_TIMEOUT):
        run(["nice", "-n", "10", "make", "-C", str(st.selftests / "mm"), f"OUTPUT={out}",
             f"KHDR_INCLUDES=-isystem {st.headers / 'usr/include'}", *map(str, binaries.values())],
            f"make -C tools/testing/selftests/mm {' '.join(names)}", SELFTEST_TIMEOUT, capture=True)
    return binaries

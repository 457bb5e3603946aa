"""THP knobs: set for a scenario, always restored; and what the kernel's underused-THP shrinker will do."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import locks
from .errors import HolecheckError, SetupError

log = logging.getLogger(__name__)
SYSFS = Path("/sys/kernel/mm/transparent_hugepage")
KNOBS = {
    "enabled": SYSFS / "enabled",
    "defrag": SYSFS / "defrag",
    "max_ptes_none": SYSFS / "khugepaged" / "max_ptes_none",
    "shrink_underused": SYSFS / "shrink_underused",
    "shmem_enabled": SYSFS / "shmem_enabled",  # shmem (memfd) THPs: the memfd backing sets "advise"
}
NO_SPLIT_MAX_PTES_NONE = 511
LOCK = "/run/lock/holecheck-thp.lock"  # the knobs are host-wide: one holecheck scenario at a time sets them
LOCK_TIMEOUT = 900.0  # thp_underused() returns false early at 511: the shrinker never splits


@dataclass(frozen=True)
class ThpSettings:
    """The knobs a scenario runs under. ``None`` leaves a knob as found."""

    enabled: str | None = "madvise"
    defrag: str | None = "madvise"
    max_ptes_none: int | None = 409
    shrink_underused: bool | None = True
    mthp_kb: int = 0  # >0: only this mTHP size is enabled (hugepages-<N>kB/enabled), PMD THPs off; 0: PMD as today
    mthp_enabled: str = "always"  # that size's enabled value: always or madvise
    shmem_enabled: str | None = None  # as found unless a memfd scenario asks (its id says "memfd")

    @property
    def id(self) -> str:
        """Short parametrize id, e.g. 'mpn409'."""
        parts = [f"mpn{self.max_ptes_none}" if self.max_ptes_none is not None else "mpn-asis"]
        if self.enabled not in (None, "madvise"):
            parts.append(f"thp-{self.enabled}")
        if self.shrink_underused is False:
            parts.append("noshrink")
        if self.mthp_kb:
            parts.append(f"mthp{self.mthp_kb}k" + ("" if self.mthp_enabled == "always" else f"-{self.mthp_enabled}"))
        return "-".join(parts)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _read(path: Path) -> str:
    text = path.read_text().strip()
    if "[" in text:  # "always [madvise] never"
        return text[text.index("[") + 1 : text.index("]")]
    return text


def current() -> dict[str, str]:
    """Current value of every knob the kernel has (a kernel without the shrinker has no shrink_underused)."""
    return {name: _read(path) for name, path in KNOBS.items() if path.exists()}


def _write(name: str, value: str) -> None:
    try:
        KNOBS[name].write_text(value)
    except OSError as exc:
        raise SetupError(f"cannot set THP {name}={value}: {exc.strerror} (run as root?)") from None


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Hold the host-wide knob lock: a second holecheck run on this kernel waits (saying on whom) instead of
    changing the knobs under the first one's scenario (and restoring them mid-way)."""
    with locks.held(LOCK, "the THP knob lock (another holecheck run is using this kernel's knobs)", LOCK_TIMEOUT):
        yield


@contextlib.contextmanager
def applied(settings: ThpSettings) -> Iterator[dict[str, str]]:
    """Apply ``settings`` under the knob lock; yield the knobs as now in force; restore every knob found, even
    on error."""
    if not KNOBS["enabled"].exists():
        raise SetupError("kernel has no transparent hugepages (CONFIG_TRANSPARENT_HUGEPAGE=n)")
    with exclusive(), _applied(settings) as knobs, sizes_applied(settings):
        yield knobs


def verify(settings: ThpSettings) -> None:
    """The knobs are still what the scenario set (a process outside holecheck may have changed them)."""
    now = current()
    for name in KNOBS:
        want = getattr(settings, name)
        if want is None or name not in now:
            continue
        want = str(int(want)) if isinstance(want, bool) else str(want)
        if now[name] != want:
            raise HolecheckError(f"THP {name} changed under the scenario: it is {now[name]}, the scenario set {want}")


@contextlib.contextmanager
def _applied(settings: ThpSettings) -> Iterator[dict[str, str]]:
    saved = current()
    try:
        for name in KNOBS:
            value = getattr(settings, name)
            if value is None or not KNOBS[name].exists():
                continue  # a kernel without the shrinker: nothing to set, reported by support()
            _write(name, str(int(value)) if isinstance(value, bool) else str(value))
        yield current()
    finally:
        restore(saved)


def restore(saved: dict[str, str]) -> None:
    for name, value in saved.items():
        if _read(KNOBS[name]) != value:
            with contextlib.suppress(OSError):
                KNOBS[name].write_text(value)
            log.debug("restored THP %s=%s", name, value)


@dataclass(frozen=True)
class ShrinkerSupport:
    """Will the underused-THP shrinker split anything under the knobs in force?"""

    has_shrinker: bool
    enabled: bool
    max_ptes_none: int

    @classmethod
    def now(cls) -> ShrinkerSupport:
        knobs = current()
        return cls(
            has_shrinker="shrink_underused" in knobs,
            enabled=knobs.get("shrink_underused") == "1",
            max_ptes_none=int(knobs.get("max_ptes_none", NO_SPLIT_MAX_PTES_NONE)),
        )

    def no_split_reason(self) -> str:
        """Why the knobs rule out any underused split ('' when they allow one)."""
        if not self.has_shrinker:
            return "no underused shrinker in this kernel (no shrink_underused knob)"
        if not self.enabled:
            return "shrink_underused is 0"
        if self.max_ptes_none >= NO_SPLIT_MAX_PTES_NONE:
            return f"max_ptes_none is {self.max_ptes_none}: underused splits disabled"
        return ""


MTHP_SIZES_KB = (16, 32, 64, 128, 256, 512, 1024)


def sizes_current() -> dict[str, str]:
    """Every per-size knob (``hugepages-64kB/enabled`` …) as now; empty on kernels without mTHP."""
    return {f"{k.parent.name}/enabled": _read(k) for k in sorted(SYSFS.glob("hugepages-*kB/enabled"))}


def size_knob(kb: int) -> Path:
    return SYSFS / f"hugepages-{kb}kB" / "enabled"


@contextlib.contextmanager
def sizes_applied(settings: ThpSettings) -> Iterator[None]:
    """For an mTHP scenario: its size alone enabled (PMD-sized THPs set to never), every size knob restored.
    A kernel without that size's knob (before 6.8: none) would map PMD THPs under the mTHP id: refused (the
    cells skip first, on the ``mthp_<N>kB`` feature)."""
    if not settings.mthp_kb:
        yield
        return
    if not size_knob(settings.mthp_kb).exists():
        raise SetupError(f"this kernel lacks {settings.mthp_kb}kB mTHPs (no {size_knob(settings.mthp_kb)})")
    if settings.mthp_kb not in MTHP_SIZES_KB or settings.mthp_enabled not in ("always", "madvise"):
        raise SetupError(f"mTHP {settings.mthp_kb}kB={settings.mthp_enabled}: sizes are {MTHP_SIZES_KB} kB, "
                         "enabled always or madvise")
    knobs = sorted(SYSFS.glob("hugepages-*kB/enabled"))
    saved = {k: _read(k) for k in knobs}
    try:
        for k in knobs:
            want = settings.mthp_enabled if k == size_knob(settings.mthp_kb) else "never"
            if saved[k] != want:
                k.write_text(want)
        yield
    finally:
        for k, v in saved.items():
            if _read(k) != v:
                with contextlib.suppress(OSError):
                    k.write_text(v)

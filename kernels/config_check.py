"""Check a kernel's config against ``holecheck.config``: one clear line per missing required option (which stops
the session) and one warning line per missing optional one (what is skipped without it)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

FRAGMENT = Path(__file__).with_name("holecheck.config")
OPTIONAL_MARK = "# holecheck: optional"
# Drivers the initramfs can load as modules: =m satisfies a required =y for these.
MODULE_OK = frozenset({"VIRTIO", "VIRTIO_MMIO", "VIRTIO_PCI", "VIRTIO_CONSOLE", "FUSE_FS", "VIRTIO_FS", "ZRAM"})
# The virtio transport each machine type needs (the fragment names microvm's).
TRANSPORT = {"microvm": "VIRTIO_MMIO", "pc": "VIRTIO_PCI"}
# Optional features a cell may need, checked on every kernel but never forced onto a build (``recipe`` builds
# from holecheck.config alone): option → what is skipped without it.
FEATURES = {"KSM": "the KSM split cells (ksm, ksm-zero, -same-by-ksm) are skipped without it",
            "DEBUG_FS": "the debugfs split trigger (split_huge_pages) is skipped without it",
            "ZRAM": "the pageout-swap split trigger (zram swap inside the L1 VM) is skipped without it",
            "NUMA": "NUMA placement cells are skipped without it"}
LINE_RE = re.compile(r"^CONFIG_(\w+)=(.*)$")
UNSET_RE = re.compile(r"^# CONFIG_(\w+) is not set$")


@dataclass(frozen=True)
class Fragment:
    required: dict[str, str]
    optional: dict[str, str]
    why: dict[str, str] = field(default_factory=dict)  # optional option → the comment above it: what it costs


def parse(text: str) -> dict[str, str]:
    """A .config's options: name (without CONFIG_) → value ('y', 'm', 'n' for '# … is not set', or a string)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := LINE_RE.match(line):
            out[m[1]] = m[2].strip('"')
        elif m := UNSET_RE.match(line):
            out[m[1]] = "n"
    return out


def fragment(path: Path = FRAGMENT) -> Fragment:
    required: dict[str, str] = {}
    optional: dict[str, str] = {}
    why: dict[str, str] = {}
    current, comment = required, ""
    for line in path.read_text().splitlines():
        if line.strip() == OPTIONAL_MARK:
            current = optional
        elif m := LINE_RE.match(line.strip()):
            current[m[1]] = m[2]
            if current is optional and comment:  # the comment right above an option says what it costs
                why[m[1]] = comment
            comment = ""
        elif line.startswith("#"):
            comment = line.lstrip("# ").strip()
    return Fragment(required, optional, why)


def _satisfied(option: str, want: str, have: str) -> bool:
    return have == want or (want == "y" and have == "m" and option in MODULE_OK)


def problems(config: dict[str, str], machine: str = "microvm", frag: Fragment | None = None) -> list[str]:
    """One line per required option the config lacks (for a VM of type ``machine``)."""
    frag = frag or fragment()
    required = dict(frag.required)
    if machine != "microvm":  # swap the virtio transport: -M pc needs virtio-pci, not virtio-mmio
        required.pop(TRANSPORT["microvm"], None)
        required[TRANSPORT[machine]] = "y"
    out = []
    for option, want in required.items():
        have = config.get(option, "n")
        if not _satisfied(option, want, have):
            alt = " or m" if option in MODULE_OK else ""
            out.append(f"CONFIG_{option}={have if have != 'n' else 'is not set'}: holecheck needs ={want}{alt}"
                       .replace("=is not set", " is not set"))
    return out


def missing_optional(config: dict[str, str], frag: Fragment | None = None) -> list[str]:
    """One line per optional option the config lacks that costs cells, saying what is skipped without it (never
    stops a session; options without a stated cost, like IKCONFIG where a config file ships, are not named)."""
    frag = frag or fragment()
    why = {**frag.why, **FEATURES}
    out = []
    for option, want in {**frag.optional, **dict.fromkeys(FEATURES, "y")}.items():
        if option not in why:
            continue
        have = config.get(option, "n")
        if not _satisfied(option, want, have):
            state = "is not set" if have == "n" else f"={have}"
            out.append(f"CONFIG_{option} {state}: {why[option]}")
    return out


def find_config(image: Path) -> Path | None:
    """The config of a kernel image: ``config-<release>`` beside a /boot-style ``vmlinuz-<release>``, or the
    build tree's ``.config`` (beside the image, or three levels up from arch/x86/boot/bzImage)."""
    candidates = []
    if "-" in image.name:
        candidates.append(image.with_name("config-" + image.name.split("-", 1)[1]))
    candidates += [p / ".config" for p in list(image.parents)[:4]]  # beside it … up to the tree of arch/x86/boot
    return next((c for c in candidates if c.is_file()), None)


def check_file(config_path: Path, machine: str = "microvm") -> list[str]:
    """Problems of the config at ``config_path``, each prefixed with the file's name."""
    return [f"{config_path.name}: {p}" for p in problems(parse(config_path.read_text()), machine)]

"""The config recipe every kernel holecheck builds shares, and the cache keys it shapes (pure: no make, no apt).

``make allnoconfig`` with ``minimal.config``, ``holecheck.config`` and ``EXTRAS`` (no modules, PVH entry,
/proc/config.gz, no PCI) forced through ``KCONFIG_ALLCONFIG``; every requested option is then checked in the
final ``.config`` (``config_problems``): nothing holecheck does not need is compiled.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path

from . import config_check

HERE = Path(__file__).parent
FRAGMENT = HERE / "holecheck.config"
BASE_FRAGMENT = HERE / "minimal.config"

BASE_TARGETS = ("allnoconfig",)
# On top of the fragments: MODULES=n so the kernel boots with no initramfs modules; PVH so QEMU can boot the
# uncompressed vmlinux on microvm (which has no PCI: holecheck.config's optional VIRTIO_PCI is left out);
# IKCONFIG_PROC so a booted kernel shows its config.
EXTRAS: dict[str, str] = {"MODULES": "n", "PVH": "y", "IKCONFIG": "y", "IKCONFIG_PROC": "y", "VIRTIO_PCI": "n"}
# uname -r tells which kernel booted: 6.12.95-holecheck-holes vs 6.12.95-holecheck-twin.
LOCALVERSION = {"patched": "-holecheck-holes", "twin": "-holecheck-twin", "tree": "-holecheck"}
RECIPE_VERSION = 2  # bump when the recipe changes in a way the texts below do not show


def recipe_text() -> str:
    """What the recipe forces onto allnoconfig: the minimal base, then holecheck.config (later lines win)."""
    return BASE_FRAGMENT.read_text().rstrip("\n") + "\n\n" + FRAGMENT.read_text()


def recipe_fragment(fragment_text: str, localversion: str) -> str:
    """The fragment KCONFIG_ALLCONFIG forces onto allnoconfig: the recipe text, then EXTRAS and LOCALVERSION
    (later lines win)."""
    lines = [fragment_text.rstrip("\n"), "", "# --- kernels/recipe.py EXTRAS"]
    for option, value in EXTRAS.items():
        lines.append(f"# CONFIG_{option} is not set" if value == "n" else f"CONFIG_{option}={value}")
    lines.append(f'CONFIG_LOCALVERSION="{localversion}"')
    return "\n".join(lines) + "\n"


def recipe_sha(fragment_text: str) -> str:
    """sha256 of everything that shapes the config: base targets, the fragment's options (in order; comments and
    blank lines do not count: editing a comment must not cost a cold build), EXTRAS, the recipe version."""
    options = list(config_check.parse(fragment_text).items())
    blob = json.dumps({"base": BASE_TARGETS, "fragment": options, "extras": EXTRAS,
                       "version": RECIPE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def safe_name(text: str) -> str:
    """A version as a path component Kbuild and shells are happy with: 6.12.95-1~bpo12+1 → 6.12.95-1_bpo12+1."""
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def cache_key(version: str, patch_sha: str | None, config_sha: str) -> str:
    """Artefact dir name: what was built (source version, patch) and how (recipe)."""
    what = f"patched-{patch_sha[:12]}" if patch_sha else "twin"
    return f"{safe_name(version)}-{what}-cfg{config_sha[:12]}"


def tree_key(head: str, dirty_diff: bytes, config_sha: str) -> str:
    """Artefact dir name of a user's tree: HEAD, plus the hash of ``git diff HEAD`` when the tree is dirty."""
    dirty = "dirty" + hashlib.sha256(dirty_diff).hexdigest()[:12] if dirty_diff else "clean"
    return f"tree-{head[:12]}-{dirty}-cfg{config_sha[:12]}"


def wanted_options(fragment_text: str, localversion: str) -> dict[str, str]:
    """Every option the recipe asks for, as config_check.parse reads a .config (name → y / n / string)."""
    return config_check.parse(recipe_fragment(fragment_text, localversion))


def config_problems(config_text: str, wanted: Mapping[str, str]) -> list[str]:
    """One line per requested option the final .config does not have as asked (a dependency turned it off)."""
    have = config_check.parse(config_text)
    out = []
    for option, want in wanted.items():
        got = have.get(option, "n")
        if got != want:
            shown = {"n": "is not set"}.get(got, f"={got}")
            out.append(f"CONFIG_{option}: asked for {'not set' if want == 'n' else '=' + want}, "
                       f"final .config has it {shown}")
    return out

"""Pure parts of the kernel builders (kernels.recipe, kbuild, linux_source, git_tree): cache keys, the recipe
fragment, .config verification, patch bookkeeping, the patched tree and output-dir seeding on tiny fake trees.
No apt, no make."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from kernels import build, git_tree, kbuild, linux_source, recipe
from suite import locks
from suite.errors import SetupError

FRAGMENT = """# a comment
CONFIG_TRANSPARENT_HUGEPAGE=y
CONFIG_USERFAULTFD=y
# holecheck: optional
CONFIG_MEM_SOFT_DIRTY=y
"""

# --- keys ------------------------------------------------------------------------------------------------------


def test_cache_key_names_version_patch_and_recipe() -> None:
    cfg = recipe.recipe_sha(FRAGMENT)
    twin = recipe.cache_key("6.12.95-1~bpo12+1", None, cfg)
    patched = recipe.cache_key("6.12.95-1~bpo12+1", "ab" * 32, cfg)
    assert twin == f"6.12.95-1_bpo12+1-twin-cfg{cfg[:12]}"
    assert patched == f"6.12.95-1_bpo12+1-patched-{'ab' * 6}-cfg{cfg[:12]}"
    assert recipe.cache_key("6.12.95-1~bpo12+1", "cd" * 32, cfg) != patched
    assert recipe.cache_key("6.12.107-1", None, cfg) != twin


def test_recipe_sha_follows_the_fragment_and_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    base = recipe.recipe_sha(FRAGMENT)
    assert recipe.recipe_sha(FRAGMENT) == base  # stable across calls (and processes: no hash randomisation)
    assert recipe.recipe_sha(FRAGMENT + "CONFIG_TMPFS=y\n") != base
    assert recipe.recipe_sha(FRAGMENT + "# a comment about it\n\n") == base  # no cold build for a comment
    monkeypatch.setitem(recipe.EXTRAS, "PVH", "n")
    assert recipe.recipe_sha(FRAGMENT) != base


def test_tree_key_clean_and_dirty() -> None:
    cfg = "0" * 64
    head = "1234567890abcdef" * 2 + "12345678"
    assert recipe.tree_key(head, b"", cfg) == "tree-1234567890ab-clean-cfg000000000000"
    dirty = recipe.tree_key(head, b"diff --git a/mm/migrate.c b/mm/migrate.c\n", cfg)
    assert dirty.startswith("tree-1234567890ab-dirty") and dirty != recipe.tree_key(head, b"other diff", cfg)


def test_safe_name_keeps_versions_readable() -> None:
    assert recipe.safe_name("6.12.95-1~bpo12+1") == "6.12.95-1_bpo12+1"
    assert recipe.safe_name("a b/c") == "a_b_c"


# --- recipe and verification -------------------------------------------------------------------------------------

def test_recipe_fragment_appends_extras_after_the_fragment() -> None:
    text = recipe.recipe_fragment(FRAGMENT, "-holecheck-holes")
    assert text.startswith(FRAGMENT.rstrip("\n"))
    assert "# CONFIG_MODULES is not set\n" in text and "CONFIG_PVH=y\n" in text
    assert text.endswith('CONFIG_LOCALVERSION="-holecheck-holes"\n')


def test_wanted_options_cover_fragment_extras_and_localversion() -> None:
    wanted = recipe.wanted_options(FRAGMENT, "-holecheck-twin")
    assert wanted["TRANSPARENT_HUGEPAGE"] == "y" and wanted["MEM_SOFT_DIRTY"] == "y"  # optional ones too
    assert wanted["MODULES"] == "n" and wanted["IKCONFIG_PROC"] == "y"
    assert wanted["LOCALVERSION"] == "-holecheck-twin"


def test_config_problems_one_line_per_option_that_did_not_stick() -> None:
    wanted = recipe.wanted_options(FRAGMENT, "-x")
    config = "\n".join([
        "CONFIG_TRANSPARENT_HUGEPAGE=y",
        "# CONFIG_USERFAULTFD is not set",
        "CONFIG_MEM_SOFT_DIRTY=y",
        "CONFIG_MODULES=y",
        'CONFIG_LOCALVERSION="-x"',
        "CONFIG_IKCONFIG=y",
        "CONFIG_IKCONFIG_PROC=y",
        "CONFIG_VIRTIO_PCI=y",
    ]) + "\n"  # PVH absent altogether
    problems = recipe.config_problems(config, wanted)
    assert problems == [
        "CONFIG_USERFAULTFD: asked for =y, final .config has it is not set",
        "CONFIG_MODULES: asked for not set, final .config has it =y",
        "CONFIG_PVH: asked for =y, final .config has it is not set",
        "CONFIG_VIRTIO_PCI: asked for not set, final .config has it =y",
    ]


def test_config_problems_none_when_everything_stuck() -> None:
    wanted = recipe.wanted_options(FRAGMENT, "-x")
    config = "".join(f"# CONFIG_{o} is not set\n" if v == "n" else
                     f'CONFIG_{o}="{v}"\n' if o == "LOCALVERSION" else f"CONFIG_{o}={v}\n"
                     for o, v in wanted.items())
    assert recipe.config_problems(config, wanted) == []


# --- patches ------------------------------------------------------------------------------------------------------

def test_patch_files_of_the_known_bad_patch() -> None:
    text = build.DEFAULT_PATCH.read_text()
    assert linux_source.patch_files(text) == ["mm/migrate.c"]
    assert "userfaultfd_armed(pvmw->vma)" in text and "pte_clear_not_present_full" in text


def test_patch_files_skips_dev_null_and_dedups() -> None:
    text = ("--- a/x.c\t2024-01-01\n+++ b/x.c\t2024-01-01\n@@ -1 +1 @@\n"
            "--- /dev/null\n+++ b/new.c\n@@ -0,0 +1 @@\n")
    assert linux_source.patch_files(text) == ["x.c", "new.c"]


def test_parse_apt_version_takes_the_first_stanza() -> None:
    show = "Package: linux-source-6.12\nVersion: 6.12.95-1~bpo12+1\n\nPackage: x\nVersion: 9\n"
    assert linux_source.parse_apt_version(show) == "6.12.95-1~bpo12+1"
    assert linux_source.parse_apt_version("") == ""


def test_tail_error_prefers_the_first_compiler_error() -> None:
    out = ("  CC mm/migrate.o\nmm/migrate.c:270:3: error: implicit declaration of function 'foo'\n"
           "make[3]: *** [scripts/Makefile.build:229: mm/migrate.o] Error 1\nmake: *** [Makefile:224] Error 2\n")
    assert kbuild._tail_error(out).startswith("mm/migrate.c:270:3: error:")
    assert kbuild._tail_error("a\nb\n") == "b"


# --- processes ------------------------------------------------------------------------------------------------------

def test_run_timeout_kills_and_says_what(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(SetupError, match=r"sleeping: not done within 0.3 s"):
        kbuild.run(["sh", "-c", "sleep 30 & sleep 30"], "sleeping", 0.3, log_path=tmp_path / "log")
    assert time.monotonic() - t0 < 15


def test_run_failure_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SetupError) as err:
        kbuild.run(["sh", "-c", "echo 'x.c:1: error: boom'; exit 3"], "compiling", 10, log_path=tmp_path / "log")
    assert "\n" not in str(err.value) and "exit 3" in str(err.value) and "error: boom" in str(err.value)


# --- patched tree and seeding on a tiny fake source ----------------------------------------------------------------

PATCH_V1 = """--- a/mm/migrate.c
+++ b/mm/migrate.c
@@ -1,2 +1,2 @@
 int a;
-int zeropage;
+int hole;
"""
PATCH_V2 = """--- a/mm/rmap.c
+++ b/mm/rmap.c
@@ -1 +1 @@
-int rmap;
+int rmap2;
"""


@pytest.fixture
def fake_source(tmp_path: Path) -> linux_source.Source:
    src = linux_source.Source("6.12.95-1~bpo12+1", tmp_path / "src")
    (src.pristine / "mm").mkdir(parents=True)
    (src.pristine / "Makefile").write_text("all:\n")
    (src.pristine / "mm/migrate.c").write_text("int a;\nint zeropage;\n")
    (src.pristine / "mm/rmap.c").write_text("int rmap;\n")
    (src.pristine / "_obj-twin-cfgx").mkdir()  # output dirs inside pristine stay out of the farm
    (src.pristine / "_obj-twin-cfgx/vmlinux.o").write_text("obj")
    old = time.time() - 3600
    for f in ("Makefile", "mm/migrate.c", "mm/rmap.c"):
        os.utime(src.pristine / f, (old, old))
    return src


needs_patch = pytest.mark.skipif(shutil.which("patch") is None, reason="no patch(1)")


@needs_patch
def test_patched_tree_links_untouched_files_and_keeps_pristine(fake_source: linux_source.Source,
                                                               tmp_path: Path) -> None:
    patch = tmp_path / "v1.patch"
    patch.write_text(PATCH_V1)
    farm = linux_source.patched_tree(fake_source, patch)
    assert (farm / "mm/migrate.c").read_text() == "int a;\nint hole;\n"
    assert (fake_source.pristine / "mm/migrate.c").read_text() == "int a;\nint zeropage;\n"
    assert os.path.samefile(farm / "mm/rmap.c", fake_source.pristine / "mm/rmap.c")
    assert not (farm / "_obj-twin-cfgx").exists()
    assert (farm / "mm/migrate.c").stat().st_mtime > (fake_source.pristine / "mm/migrate.c").stat().st_mtime
    assert linux_source.patched_tree(fake_source, patch) == farm  # same patch: nothing redone


@needs_patch
def test_patched_tree_switching_patches_restores_the_old_files(fake_source: linux_source.Source,
                                                               tmp_path: Path) -> None:
    v1, v2 = tmp_path / "v1.patch", tmp_path / "v2.patch"
    v1.write_text(PATCH_V1)
    v2.write_text(PATCH_V2)
    linux_source.patched_tree(fake_source, v1)
    farm = linux_source.patched_tree(fake_source, v2)
    assert (farm / "mm/migrate.c").read_text() == "int a;\nint zeropage;\n"  # back to pristine content …
    assert not os.path.samefile(farm / "mm/migrate.c", fake_source.pristine / "mm/migrate.c")  # … but newer
    assert (farm / "mm/rmap.c").read_text() == "int rmap2;\n"
    assert (fake_source.pristine / "mm/rmap.c").read_text() == "int rmap;\n"


@needs_patch
def test_patched_tree_refuses_a_non_diff(fake_source: linux_source.Source, tmp_path: Path) -> None:
    bad = tmp_path / "bad.patch"
    bad.write_text("not a diff\n")
    with pytest.raises(SetupError, match="not a unified diff"):
        linux_source.patched_tree(fake_source, bad)


def test_seed_copies_a_completed_output_dir_and_touches_the_differing_sources(tmp_path: Path) -> None:
    base, obj = tmp_path / "pristine/_obj-twin", tmp_path / "patched/_obj-patched"
    base.mkdir(parents=True)
    obj.parent.mkdir()
    (base / "migrate.o").write_text("o")
    source = tmp_path / "patched/migrate.c"
    source.write_text("c")
    os.utime(source, (1, 1))
    assert not kbuild.seed(obj, base, tmp_path / "twin.lock", [source])  # base never completed a build
    (base / kbuild.BUILT_MARK).write_text("1\n")
    assert kbuild.seed(obj, base, tmp_path / "twin.lock", [source])
    assert (obj / "migrate.o").read_text() == "o"
    assert source.stat().st_mtime > (obj / "migrate.o").stat().st_mtime - 1
    assert not kbuild.seed(obj, base, tmp_path / "twin.lock", [source])  # obj exists: left alone


def test_seed_skips_a_base_that_is_being_built(tmp_path: Path) -> None:
    base, obj = tmp_path / "_obj-twin", tmp_path / "_obj-patched"
    base.mkdir()
    (base / kbuild.BUILT_MARK).write_text("1\n")
    with locks.held(tmp_path / "twin.lock", "the twin build", 5):
        assert not kbuild.seed(obj, base, tmp_path / "twin.lock", [])
    assert not obj.exists()


def test_build_tree_refuses_non_trees_and_in_tree_builds(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="not a Linux source tree"):
        git_tree.build_tree(tmp_path)
    (tmp_path / "mm").mkdir()
    (tmp_path / "Makefile").write_text("")
    (tmp_path / ".config").write_text("")
    with pytest.raises(SetupError, match="mrproper"):
        git_tree.build_tree(tmp_path)

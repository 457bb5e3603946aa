"""open_target: a ``KernelSpec`` → the ``Target`` that runs it (``host:`` here, every other kind in an L1 VM)."""
from __future__ import annotations

from pathlib import Path

from ..cache import full_is_setup_error
from ..kernelspec import KernelSpec
from ..options import RunOptions
from .base import Target


def open_target(spec: KernelSpec, options: RunOptions) -> Target:
    """The target for ``spec``; SetupError in one line if it cannot run scenarios (a full cache included)."""
    with full_is_setup_error():
        return _open(spec, options)


def _open(spec: KernelSpec, options: RunOptions) -> Target:
    if spec.kind == "host":
        from .host import HostTarget

        return HostTarget(spec, options)
    from .guest import GuestTarget  # lazy: a host run imports nothing VM-related

    if spec.kind == "build":
        from kernels import git_tree

        image = git_tree.build_tree(Path(spec.value).expanduser())  # SetupError: not a tree, does not build
        return GuestTarget(KernelSpec("path", str(image)), options)
    if spec.kind == "patched":
        from kernels import build

        version, _, series = spec.value.partition(":")
        image = build.build(True, series_name=series, version=version)  # cached; SetupError: no series, no build
        return GuestTarget(KernelSpec("path", str(image)), options)
    return GuestTarget(spec, options)

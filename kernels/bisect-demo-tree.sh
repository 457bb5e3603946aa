#!/usr/bin/env bash
# A small real git history for trying `git bisect run` with holecheck: Debian's linux-source-6.12 (as extracted
# into holecheck's cache by `python -m kernels.build --twin` or the power tests), then a harmless commit, the
# known-bad patch, another harmless commit.   Usage: kernels/bisect-demo-tree.sh DEST
#   cd DEST && git bisect start HEAD HEAD~3 && git bisect run HOLECHECK/.venv/bin/python -m suite.bisect \
#       run-tree . -k "postcopy_style and discard-shrink and after-place-mpn409"      # names the patch commit
set -euo pipefail
dest=${1:?usage: $0 DEST}
here=$(cd "$(dirname "$0")" && pwd)
src=$(ls -d "${HOLECHECK_CACHE:-$HOME/.cache/holecheck}"/build/src/*/pristine | tail -n 1)
mkdir -p "$dest"
(cd "$src" && tar --exclude='./_obj-*' -cf - .) | (cd "$dest" && tar -xf -)
cd "$dest"
sed -i '/^# Debian packaging/,/^!\/debian\//d' .gitignore  # Debian's packaging ignores every top-level path
g() { git -c user.name=holecheck -c user.email=holecheck@localhost "$@"; }
g init -q -b main
g add -A >/dev/null && g commit -qm "Debian linux-source-6.12 as shipped"
echo "# holecheck bisect demo: harmless change 1" >> Documentation/admin-guide/mm/transhuge.rst
g commit -qam "docs: harmless change 1"
patch -p1 -s < "$here/patches/0001-mm-leave-zero-subpages-pte_none-after-underused-split.patch"
g commit -qam "mm: leave zero subpages pte_none after underused split (the known-bad v1 behaviour)"
echo "# holecheck bisect demo: harmless change 2" >> Documentation/admin-guide/mm/transhuge.rst
g commit -qam "docs: harmless change 2"
git log --oneline

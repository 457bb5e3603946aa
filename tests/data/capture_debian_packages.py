"""Regenerate tests/data/debian-packages/SUITE.Packages: the kernel stanzas of real Debian Packages indexes, trimmed
to Package/Version/Depends (`.venv/bin/python tests/data/capture_debian_packages.py`, after any
`python -m kernels.debian list` has updated holecheck's apt lists). Kept small: generic flavour throughout, the
cloud flavour only where a test picks it; no -rt."""
from __future__ import annotations

from pathlib import Path

from kernels import packages
from kernels.apt import APT_HELPER, Apt

HERE = Path(__file__).parent / "debian-packages"
SUITES = {"bookworm-backports": None, "trixie-backports": ("6.16.3+", "7.3.4+"), "forky": None}


def keep(name: str, cloud_for: tuple[str, ...] | None) -> bool:
    m = packages.PART_RE.match(name)
    if not m or m["flavour"] == "amd64":
        return m is not None
    return cloud_for is None or m["abi"].startswith(cloud_for)  # with its parts: what is fetchable is judged


def stanza_text(s: packages.Stanza, depends_line: str) -> str:
    return f"Package: {s.package}\nVersion: {s.version}" + (f"\nDepends: {depends_line}" if depends_line else "")


def main() -> None:
    apt = Apt.default()
    HERE.mkdir(exist_ok=True)
    out = apt._run("apt-get", "indextargets", "--format", "$(FILENAME)\t$(CODENAME)", "Identifier: Packages")
    for line in out.splitlines():
        path, _, suite = line.partition("\t")
        if suite not in SUITES:
            continue
        text = apt._run(APT_HELPER, "cat-file", path)
        found = {s.package: s for s in packages.parse(text, suite) if keep(s.package, SUITES[suite])}
        blocks = []
        for block in text.split("\n\n"):  # the Depends line as the mirror wrote it, not as parsed
            name = block.partition("\n")[0].removeprefix("Package: ")
            if name in found:
                dep = next((ln[len("Depends: "):] for ln in block.splitlines() if ln.startswith("Depends: ")), "")
                blocks.append(stanza_text(found[name], dep))
        (HERE / f"{suite}.Packages").write_text("\n\n".join(sorted(blocks)) + "\n")
        print(suite, len(blocks))


if __name__ == "__main__":
    main()

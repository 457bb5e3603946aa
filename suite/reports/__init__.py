"""What a run leaves for people: its cells and verdicts (``outcomes``), page-map pictures (``pagemap_png``), the
cells that changed between two runs (``compare``), standalone C reproducers (``reproducer``), a finding's kselftest
(``kselftest``), the bug report a maintainer sends upstream (``upstream``) and the session in KernelCI's KCIDB
schema (``kcidb``). The summary and its CLI are ``suite.report``."""

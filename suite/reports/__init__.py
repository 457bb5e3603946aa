"""What a run leaves for people: its cells and verdicts (``outcomes``), page-map pictures (``pagemap_png``), the
cells that changed between two runs (``compare``) and standalone C reproducers (``reproducer``). The summary and
its CLI are ``suite.report``."""

"""Real QEMU: which QEMUs run (``plugin``, ``binary``, ``offers``), one QEMU process (``process``), the RAM machines
whose guest only halts (``machine``, ``bios``, ``qtest``), migrations over QMP (``migration``), negative controls
from outside (``inject``), what QEMU discards itself (``discards``) and the real-QEMU scenario runner (``runner``:
``migration_run``, ``postcopy_run``, ``snapshot_run``, judged against ``ram_model``);
the same machines as libvirt domains (``libvirt_domains``) migrated through libvirt's API (``libvirt_postcopy``)."""

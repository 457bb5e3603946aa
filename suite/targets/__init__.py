"""Where the kernel under test runs: the ``Target`` interface (``base``), ``opening``: ``open_target`` choosing one, the
host (``host``) or an L1 VM (``vm``; ``backends`` boots it with ``vm.QemuVm`` or ``libvirt_vm``'s domain) with the
agent inside it (``guest``, ``agent``), what a kernel offers (``preflight``, with ``ksm_probe``), and a host-built
program run on it (``program``). Deliberately empty: the agent
imports ``suite.targets.agent`` inside the VM, and a host run imports nothing VM-related."""

"""Every error holecheck raises derives from HolecheckError. The whole tree (module of each class in brackets)::

    HolecheckError
    ├── SetupError                the environment cannot run a scenario: one line for a human, no traceback
    │   └── LaunchError           [qemu.process] QEMU exited while starting: exit code, command line, output
    ├── StallError                a bounded wait expired: what was awaited, what was seen last
    ├── PartyGoneError            the process a wait awaited exited: a harness fault, never a stall
    ├── HelperError               the userfaultfd helper refused a command or died
    ├── SplitError                [split_triggers] a split trigger failed other than by the kernel's refusal (a
    │                             debugfs write not refused by lockdown), or the cell made folios of a size its id
    │                             does not name
    ├── QmpError                  [qemu.machine] QEMU answered a QMP command with an error
    ├── QtestError                [qemu.qtest] QEMU answered a qtest request with FAIL, or the connection broke
    ├── MigrationFailed           [qemu.migration] query-migrate reported status "failed"
    └── AgentError                [targets.agent] the L1 agent answered with an error, or the channel to it failed

Outside the tree on purpose: ``kernels.elf.ElfError`` (a ValueError of pure parsing; ``kernels.modules`` turns
it into a SetupError) and ``qemu.migration_run.Aborted`` (control flow inside one run, never escapes it).
"""


class HolecheckError(Exception):
    """Base class of holecheck's errors."""


class SetupError(HolecheckError):
    """The environment cannot run a scenario (no kernel feature, no binary, bad option).

    Its message is one line meant for a human; callers print it without a traceback.
    """


class StallError(HolecheckError):
    """A bounded wait expired: says what was awaited and what was seen last."""


class PartyGoneError(HolecheckError):
    """The process a bounded wait awaited is gone: an error of the run, never a kernel finding (a stall)."""


class HelperError(HolecheckError):
    """The userfaultfd helper refused a command or died."""

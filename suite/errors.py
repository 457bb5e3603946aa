"""Every error holecheck raises derives from HolecheckError."""


class HolecheckError(Exception):
    """Base class of holecheck's errors."""


class SetupError(HolecheckError):
    """The environment cannot run a scenario (no kernel feature, no binary, bad option).

    Its message is one line meant for a human; callers print it without a traceback.
    """


class StallError(HolecheckError):
    """A bounded wait expired: says what was awaited and what was seen last."""


class HelperError(HolecheckError):
    """The userfaultfd helper refused a command or died."""

"""The one exception type that means "the user asked for something wrong" (exit code 2)."""


class UserError(ValueError):
    """Bad input: a missing path, a wrong config, an artifact of the wrong kind.

    The CLI prints the message (one paragraph, no traceback) and exits with code 2.
    Internal bugs raise anything else and exit 1 with a traceback.
    """


class TrainingError(RuntimeError):
    """The run had to stop for a reason that is not a bug (non-finite loss, disk full): exit 1, no traceback."""

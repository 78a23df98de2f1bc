"""The one exception for mistakes a user can make (bad flags, missing data, foreign checkpoints).

`sharnn.cli.main` prints it as a single line and exits non-zero; any other exception is our bug.
"""


class SharnnError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""

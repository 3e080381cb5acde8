"""The exceptions the CLI turns into an exit code instead of a traceback.

`UserError`: a mistake a user can fix; printed as one line, exit code 2. `Preempted`: a run
stopped by a stop signal after saving a checkpoint; exit code 75 (`EXIT_PREEMPTED`). Every
other exception is a bug and keeps its traceback.
"""

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped, try again (--resume latest)


class UserError(Exception):
    """A problem in the user's input or environment, with a message that says how to fix it."""


class Preempted(Exception):
    """A stop signal (train.stop_signals) ended the run after a checkpoint: continue it with
    --resume latest."""

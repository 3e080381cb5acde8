"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as one line and exits with code 2, without a traceback;
every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input or environment, with a message that says how to fix it."""

"""The one exception type for user mistakes.

Launch scripts catch `UserError` and print its message without a traceback: a bad config key or
a malformed data line is the user's to fix, not a bug to debug. Everything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's config, data or command line; the message says what to do."""

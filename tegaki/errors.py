"""One exception type for mistakes a person can fix.

The CLI catches `TegakiError` and prints its message without a traceback; everything else is a bug
and keeps its traceback.
"""


class TegakiError(Exception):
    """A user-facing error: the message says what was wrong and what to do."""

"""User-facing errors.

Every problem a user can cause (bad data root, unknown category, malformed config, impossible noise ratio, ...)
raises :class:`TrustMAEError` with a one-line message that names the problem *and* the fix. The command line
catches it, prints ``error: <message>`` and exits with status 2 -- no traceback.
"""


class TrustMAEError(ValueError):
    """A one-line, user-facing error: what is wrong and how to fix it."""

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # always one line
        super().__init__(message)

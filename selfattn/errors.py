"""Error types shared by the library, the data checks and the flows."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad config, bad data, missing file).

    The CLI prints its message as one paragraph and exits non-zero without a traceback.
    ``exit_code`` lets a caller choose the process exit status (2 = unusable input).
    """

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code

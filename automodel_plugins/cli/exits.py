"""Exit statuses of ``automodel-plugins``: 0 success, 2 a user-facing problem (one line on stderr, no traceback)."""

EXIT_OK = 0
EXIT_USER_ERROR = 2

"""Process exit codes shared by every command."""

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2

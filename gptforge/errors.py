"""The one exception type for user mistakes; the CLI prints it as a single line and exits with status 2."""


class UserError(Exception):
    """Bad input from the user: a missing file, an unreadable corpus, a wrong value, a corrupt checkpoint."""

"""The one exception type for user mistakes: the CLI prints its message, without a traceback."""


class UserError(Exception):
    """Bad input from the user (a file, a flag, a config key). The message must say what was expected."""

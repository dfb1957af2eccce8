"""The one exception type for user mistakes.

Anything raised as a `UserError` (or a subclass) is a problem with the user's input (a file,
a flag, a request) whose message names the problem and the fix. The CLI prints it on one
line and exits with code 2; the server turns it into a 4xx. Everything else is a bug.
"""


class UserError(ValueError):
    """Bad input from the user; the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """A configuration that cannot describe a valid model (message names field and fix)."""

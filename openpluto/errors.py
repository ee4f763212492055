"""User-facing errors: one line naming the file or setting and the fix, never a traceback."""


class OpenPlutoError(Exception):
    """An error the user can fix; the CLI prints ``error: <message>`` and exits with status 2.

    Messages name the offending file/key and say what to do, in one line.
    """


class ConfigError(OpenPlutoError):
    """A bad configuration key or value."""

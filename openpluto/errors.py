"""User-facing errors: one line naming the file or setting and the fix, never a traceback."""

import traceback


class OpenPlutoError(Exception):
    """An error the user can fix; the CLI prints ``error: <message>`` and exits with status 2.

    Messages name the offending file/key and say what to do, in one line.
    """


class ConfigError(OpenPlutoError):
    """A bad configuration key or value."""


def exception_line(e: BaseException) -> str:
    """An unexpected exception in one line: ``TypeName: message (at file.py:line)``."""
    last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno})" if last else ""
    return f"{type(e).__name__}: {' '.join(str(e).split())}{where}"

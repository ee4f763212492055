"""The demo's steps as ``openpluto`` commands, printed as they run and kept in ``DIR/commands.txt``.

``commands.txt`` is the full history of the folder: every ``openpluto demo`` invocation appends a
``# openpluto demo ...`` header line, then each command it ran, or ``# done earlier, skipped: ...``
for a step a previous invocation finished. So a rerun never hides the commands that made the outputs
it reuses.
"""

from __future__ import annotations

import datetime as _dt
import shlex
from collections.abc import Sequence
from pathlib import Path

from openpluto.errors import OpenPlutoError

SKIPPED = "# done earlier, skipped: "


def command_text(argv: Sequence[str]) -> str:
    """``openpluto ARGV`` as a shell line."""
    return "openpluto " + " ".join(shlex.quote(str(a)) for a in argv)


class CommandLog:
    """Runs ``openpluto`` sub-commands in this process and appends them to ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _append(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def begin(self, demo_argv: Sequence[str]) -> None:
        """Record the start of an ``openpluto demo`` invocation."""
        now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        self._append(f"# {now}: {command_text(['demo', *demo_argv])}")

    def run(self, argv: Sequence[str]) -> None:
        """Print and record ``openpluto ARGV``, run it; raise ``OpenPlutoError`` if it fails."""
        from openpluto.cli.main import main

        text = command_text(argv)
        print(f"\n$ {text}", flush=True)
        self._append(text)
        rc = main([str(a) for a in argv])
        if rc:
            raise OpenPlutoError(f"demo step failed (exit {rc}): {text}")

    def run_unless_done(self, argv: Sequence[str], done: bool, why: str) -> None:
        """``skip`` when ``done`` (an earlier invocation made the output: ``why``), else ``run``."""
        if done:
            self.skip(argv, why)
        else:
            self.run(argv)

    def skip(self, argv: Sequence[str], why: str) -> None:
        """Record (and say) that ``openpluto ARGV`` is not rerun because ``why``."""
        text = command_text(argv)
        print(f"done earlier ({why}), skipped: {text}", flush=True)
        self._append(SKIPPED + text)

    def history(self) -> str:
        return self.path.read_text() if self.path.is_file() else ""

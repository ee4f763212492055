"""Run the ``openpluto`` CLI with one function parked forever at a chosen point, so a test's kill or
signal always lands mid-run, however fast or loaded the machine (no timing window to miss)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

# argv: MARKER then the CLI's own arguments. ``patch`` installs the parking; it calls park(text).
_SCRIPT = """
import sys, time, pathlib
from openpluto.cli.main import main
marker = pathlib.Path(sys.argv[1])
def park(text):
    marker.write_text(text)
    while True:
        time.sleep(60)
{patch}
sys.exit(main(sys.argv[2:]))
"""


_PLAIN = "import sys; from openpluto.cli.main import main; sys.exit(main(sys.argv[1:]))"


def cli_command(*cli_args: str) -> list[str]:
    """The command line of a plain ``openpluto CLI_ARGS`` run (no parking), e.g. the rerun after a kill."""
    return [sys.executable, "-c", _PLAIN, *cli_args]


def parked_cli(patch: str, marker: Path, *cli_args: str) -> list[str]:
    """The command line of ``openpluto CLI_ARGS`` with ``patch`` (Python source calling ``park(text)``
    where the run should stop) applied first; ``park`` writes ``text`` to ``marker``, then sleeps."""
    return [sys.executable, "-c", _SCRIPT.format(patch=patch), str(marker), *cli_args]


def wait_until_parked(proc: subprocess.Popen, marker: Path, guard_s: float = 1800) -> str:
    """Wait for ``marker`` (the run has parked) and return its text; fails if the run ended first.
    ``guard_s`` only guards against a hang: no verdict depends on speed."""
    deadline = time.monotonic() + guard_s
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"the run did not park (exit code {proc.poll()})"
    return marker.read_text()

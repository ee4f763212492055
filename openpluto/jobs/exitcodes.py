"""Exit codes of the slide-stage commands (``tissue``, ``tiles``, ``embed``, ``embed-pca``).

| code | meaning |
|---|---|
| 0 | every slide is done (now or by an earlier run) |
| 3 | some slides failed (listed in ``errors.csv``); the others are done |
| 1 | no slide done, or bad usage / input (one ``error:`` line; nothing is written) |
| 130 | interrupted (Ctrl-C / SIGINT) |
| 143 | terminated (SIGTERM, e.g. a Slurm pre-emption or time limit) |

After SIGINT/SIGTERM the finished slides stay finished and a rerun resumes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator

from openpluto.errors import OpenPlutoError

OK = 0
NONE_DONE = 1
SOME_FAILED = 3
INTERRUPTED = 130
TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM, so ``finally`` blocks run (workers are killed, parts written)."""


def batch_exit_code(done: int, failed: int) -> int:
    """0 when nothing failed, 3 when some slides failed and some are done, 1 when none is done."""
    if failed == 0:
        return OK
    return SOME_FAILED if done > 0 else NONE_DONE


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the block runs (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_stage(fn: Callable[[], int], debug: bool = False) -> int:
    """Run a stage command with the codes above: user errors print one ``error:`` line and give 1."""
    debug = debug or os.environ.get("OPENPLUTO_DEBUG") == "1"
    try:
        with sigterm_raises():
            return int(fn() or 0)
    except OpenPlutoError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return NONE_DONE
    except Terminated:
        print(
            "terminated (SIGTERM): finished slides are kept; rerun the same command to resume",
            file=sys.stderr,
        )
        return TERMINATED
    except KeyboardInterrupt:
        print("interrupted: finished slides are kept; rerun the same command to resume", file=sys.stderr)
        return INTERRUPTED

"""Per-slide isolation now lives in :mod:`openpluto.jobs.isolate` (shared by tissue, tiles and embed)."""

from openpluto.jobs.isolate import Outcome, run_isolated

__all__ = ["Outcome", "run_isolated"]

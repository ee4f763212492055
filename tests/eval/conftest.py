"""Fixtures of the eval tests (helpers live in ``_eval_utils``)."""

from __future__ import annotations

import pytest
import torch
from _eval_utils import TinyEncoder


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The eval tests run tiny models; one thread avoids OpenMP spin-waiting on busy 2-core runners.
    Restored afterwards so other areas' tests keep their setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def encoder() -> TinyEncoder:
    return TinyEncoder()

"""Fixtures of the SSL tests."""

from __future__ import annotations

import pytest
from ssl_helpers import tiny_ssl_config

from openpluto.ssl import SSLConfig


@pytest.fixture
def tiny_cfg() -> SSLConfig:
    return tiny_ssl_config()

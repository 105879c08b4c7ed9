"""The registry suite runs against every backend: the same tests, parametrised."""

from __future__ import annotations

import pytest

from iotauth.config import Home
from tests.fixtures.postgres import BACKENDS, backend_url


@pytest.fixture(params=BACKENDS)
def registry_url(request: pytest.FixtureRequest, home: Home) -> str:
    return backend_url(request, home)

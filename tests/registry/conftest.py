"""The registry suite runs against every backend: the same tests, parametrised."""

from __future__ import annotations

import pytest

from iotauth.config import Home


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, home: Home) -> str:
    if request.param == "sqlite":
        return str(home.registry_db)
    url: str = request.getfixturevalue("postgres_database")
    return url

"""The registry suite runs against every backend: the same tests, parametrised."""

from __future__ import annotations

import asyncio

import pytest

from iotauth.config import Home
from iotauth.registry import open_registry


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, home: Home) -> str:
    if request.param == "sqlite":
        return str(home.registry_db)
    url: str = request.getfixturevalue("postgres_database")
    asyncio.run(_create_schema(url))  # what 'iotauth init --registry URL' does for a new PostgreSQL database
    return url


async def _create_schema(url: str) -> None:
    async with await open_registry(url, create=True):
        pass

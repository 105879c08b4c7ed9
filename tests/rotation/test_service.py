"""``iotauth renewer`` as a service: it is ready only once the broker granted its subscription to the requests.

A refused subscription would read nothing, silently: a renewer whose profile
lacks the right (or, on a managed Mosquitto, whose client the follower has
not created yet) must say so and keep trying, never report itself running.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from iotauth.authority import open_authority
from iotauth.config import Home
from iotauth.errors import IotAuthError
from iotauth.registry import open_registry
from iotauth.rotation.service import RenewerOptions, RenewerService, ensure_identity
from tests.fixtures.broker import configured_home, running_broker

DEAF_RENEWER = """
[profiles.renewer]
publish = ["devices/+/rotation/response", "devices/+/commands/rotate"]
subscribe = ["devices/+/telemetry/#"]
"""


def test_a_renewer_whose_subscription_is_refused_never_reports_itself_ready(tmp_path: Path) -> None:
    home = configured_home(tmp_path / "deaf", extra=DEAF_RENEWER)
    with running_broker(home) as (broker, _):
        asyncio.run(start_deaf(home, broker.port))


async def start_deaf(home: Home, port: int) -> None:
    async with await open_registry(home.registry_db) as registry:
        authority = await open_authority(home, registry)
        identity = await ensure_identity(authority, home, "renewer@test")
        service = RenewerService(RenewerOptions(home, broker=("127.0.0.1", port)), authority, identity,
                                 "renewer@test")
        service.link.resubscribe_after = 0.2
        try:
            with pytest.raises(IotAuthError, match="subscription to devices/\\+/rotation/request was refused"):
                await service.start(connect_timeout=3.0)
            assert service.link.subscription_refusals >= 2  # it kept trying
        finally:
            await service.close()

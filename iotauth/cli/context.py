"""What every command shares: the chosen home and registry, and how to run async work."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from iotauth.authority import Authority, open_authority
from iotauth.config import Home, Settings, load_settings, registry_location
from iotauth.registry import Registry, open_registry

T = TypeVar("T")


@dataclass(frozen=True)
class CliContext:
    home: Home
    registry_url: str | None

    async def open_registry(self) -> Registry:
        self.home.require_initialised()
        return await open_registry(registry_location(self.home, self.registry_url))

    def settings(self) -> Settings:
        return load_settings(self.home)

    async def with_registry(self, work: Callable[[Registry], Awaitable[T]]) -> T:
        registry = await self.open_registry()
        async with registry:
            return await work(registry)

    async def with_authority(
        self, work: Callable[[Authority], Awaitable[T]], *, signing_optional: bool = False
    ) -> T:
        """Run ``work`` with the home's Authority; ``signing_optional``: also when the CA key is locked."""

        async def run(registry: Registry) -> T:
            return await work(await open_authority(self.home, registry, signing_optional=signing_optional))

        return await self.with_registry(run)


pass_cli = click.make_pass_decorator(CliContext)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)

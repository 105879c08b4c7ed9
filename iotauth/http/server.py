"""Assemble and run the HTTP service for a home directory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from iotauth.authority import open_authority
from iotauth.castore import client_verifier, load_ocsp_responder
from iotauth.config import Home, Settings, load_settings, parse_bind, registry_location
from iotauth.errors import ConfigError
from iotauth.http.access import AccessPolicy
from iotauth.http.app import ServiceState, create_app
from iotauth.http.brokers import BrokerFrontEnd, broker_routes
from iotauth.http.crl import CrlSource
from iotauth.http.push import EmqxKicker, push_revocations
from iotauth.http.rabbitmq import RabbitmqAuthorizer, rabbitmq_routes
from iotauth.policy import PolicySet
from iotauth.registry import Registry, open_registry

log = logging.getLogger("iotauth.http")


@dataclass(frozen=True)
class ServeOptions:
    bind: str | None = None
    tls: bool = True
    certfile: Path | None = None
    keyfile: Path | None = None
    admin_tokens: tuple[str, ...] = ()


async def build_app(home: Home, registry: Registry, settings: Settings, options: ServeOptions) -> Starlette:
    """The complete application for ``home``: every route, wired to ``registry``."""
    app = create_app(await build_state(home, registry, settings, options))
    app.state.brokers = broker_front_end(home, registry, settings)
    app.state.rabbitmq = RabbitmqAuthorizer(app.state.brokers, home, settings.rabbitmq)
    return app


async def build_state(home: Home, registry: Registry, settings: Settings, options: ServeOptions) -> ServiceState:
    authority = await open_authority(home, registry, signing_optional=True)
    if authority.signing_unavailable is not None:
        log.warning("CRL signing disabled (%s); serving the CRL last published by 'iotauth crl'",
                    authority.signing_unavailable)
    access = AccessPolicy.build(
        settings.serve.admin_token_sha256, options.admin_tokens, settings.serve.broker_networks, options.tls
    )
    if not access.admin_digests:
        log.warning("no admin token configured: the admin API is disabled ('iotauth serve token' makes one)")
    elif not options.tls:
        log.warning("plain HTTP: the admin API is disabled (tokens are never accepted without TLS)")
    return ServiceState(
        authority=authority,
        access=access,
        crl=CrlSource(authority, home),
        ocsp=load_ocsp_responder(home),
        extra_routes=[*broker_routes(), *rabbitmq_routes()],
    )


def broker_front_end(home: Home, registry: Registry, settings: Settings) -> BrokerFrontEnd:
    return BrokerFrontEnd(
        registry=registry,
        policies=PolicySet.from_profiles(settings.profiles.values()),
        verifier=client_verifier(home, settings),
    )


async def serve(home: Home, registry_url: str | None, options: ServeOptions) -> None:
    """Run until SIGINT/SIGTERM (uvicorn installs the handlers and drains connections)."""
    settings = load_settings(home)
    host, port = parse_bind(options.bind or settings.serve.bind, 8443)
    certfile = options.certfile or home.server_cert
    keyfile = options.keyfile or home.server_key
    async with await open_registry(registry_location(home, registry_url)) as registry:
        config = uvicorn.Config(
            await build_app(home, registry, settings, options),
            host=host,
            port=port,
            ssl_certfile=str(certfile) if options.tls else None,
            ssl_keyfile=str(keyfile) if options.tls else None,
            log_level="warning",
            lifespan="off",
            timeout_keep_alive=30,
            server_header=False,
        )
        server = uvicorn.Server(config)
        log.info("iotauth serve on %s://%s:%d", "https" if options.tls else "http", host, port)
        pusher = _start_push(settings, registry)
        try:
            await server.serve()
        finally:
            if pusher is not None:
                pusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pusher


def _start_push(settings: Settings, registry: Registry) -> asyncio.Task[None] | None:
    emqx = settings.emqx
    if not emqx.base_url:
        return None
    secret = os.environ.get(emqx.api_secret_env)
    if not emqx.api_key or not secret:
        raise ConfigError(f"[emqx] base_url is set: also set [emqx] api_key and the secret in ${emqx.api_secret_env}")
    kicker = EmqxKicker(emqx.base_url, emqx.api_key, secret)
    log.info("pushing revocations to EMQX at %s", emqx.base_url)
    return asyncio.get_running_loop().create_task(push_revocations(registry, kicker), name="iotauth-emqx-push")

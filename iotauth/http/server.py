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
from iotauth.errors import ConfigError, RegistryError
from iotauth.export.follower import PushFollower
from iotauth.http.access import AccessPolicy, parse_networks
from iotauth.http.app import ServiceState, create_app
from iotauth.http.brokers import BrokerFrontEnd, broker_routes
from iotauth.http.crl import CrlSource
from iotauth.http.emqx import EmqxOptions, emqx_routes
from iotauth.http.push import EmqxTarget
from iotauth.http.rabbitmq import RabbitmqAuthorizer, rabbitmq_routes
from iotauth.policy import PolicySet
from iotauth.registry import Registry, open_registry
from iotauth.registry.expiry import expire_pending_forever

log = logging.getLogger("iotauth.http")
REGISTRY_WATCH_INTERVAL = 0.25  # seconds; a stat() and one indexed read


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
    app.state.emqx = EmqxOptions(require_certificate=settings.emqx.require_certificate)
    app.state.rabbitmq = RabbitmqAuthorizer(app.state.brokers, home, settings.rabbitmq)
    return app


async def build_state(home: Home, registry: Registry, settings: Settings, options: ServeOptions) -> ServiceState:
    authority = await open_authority(home, registry, signing_optional=True)
    if authority.signing_unavailable is not None:
        log.warning("CRL signing disabled (%s); serving the CRL last published by 'iotauth crl'",
                    authority.signing_unavailable)
    access = AccessPolicy.build(
        settings.serve.admin_token_sha256, options.admin_tokens, settings.serve.broker_networks, options.tls,
        settings.serve.metrics_networks,
    )
    parse_networks(settings.serve.trusted_proxies, "[serve] trusted_proxies")
    if not access.broker_networks:
        log.warning("[serve] broker_networks is empty: the broker-facing endpoints answer nobody")
    if not access.admin_digests:
        log.warning("no admin token configured: the admin API is disabled ('iotauth serve token' makes one)")
    elif not options.tls:
        log.warning("plain HTTP: the admin API is disabled (tokens are never accepted without TLS)")
    return ServiceState(
        authority=authority,
        access=access,
        crl=CrlSource(authority, home),
        ocsp=load_ocsp_responder(home),
        extra_routes=[*broker_routes(), *emqx_routes(), *rabbitmq_routes()],
    )


def broker_front_end(home: Home, registry: Registry, settings: Settings) -> BrokerFrontEnd:
    return BrokerFrontEnd(
        registry=registry,
        policies=PolicySet.from_profiles(settings.profiles.values()),
        verifier=client_verifier(home, settings),
        renewal_ttl=settings.pending_ttl,
    )


async def serve(home: Home, registry_url: str | None, options: ServeOptions) -> None:
    """Run until SIGINT/SIGTERM (uvicorn installs the handlers and drains connections)."""
    settings = load_settings(home)
    host, port = parse_bind(options.bind or settings.serve.bind, 8443)
    certfile = options.certfile or home.server_cert
    keyfile = options.keyfile or home.server_key
    async with await open_registry(registry_location(home, registry_url)) as registry:
        app = await build_app(home, registry, settings, options)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            ssl_certfile=str(certfile) if options.tls else None,
            ssl_keyfile=str(keyfile) if options.tls else None,
            log_level="warning",
            lifespan="off",
            timeout_keep_alive=30,
            server_header=False,
            # Never uvicorn's default (trust 127.0.0.1, or $FORWARDED_ALLOW_IPS, which containers often set to *):
            # X-Forwarded-For decides who is a broker, so only the proxies named in iotauth.toml may set it.
            proxy_headers=bool(settings.serve.trusted_proxies),
            forwarded_allow_ips=list(settings.serve.trusted_proxies),
        )
        server = uvicorn.Server(config)
        log.info("iotauth serve on %s://%s:%d", "https" if options.tls else "http", host, port)
        followers = push_followers(settings, registry)
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(watch_registry(registry), name="iotauth-registry-watch"),
                 loop.create_task(expire_pending_forever(registry, settings.pending_ttl, actor="iotauth-serve"),
                                  name="iotauth-expiry")]
        for follower in followers:
            app.state.iotauth.push.append(follower.health)
            name = f"iotauth-push-{follower.target.name}"
            tasks.append(loop.create_task(follower.run(), name=name))
        try:
            await server.serve()
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for follower in followers:
                await follower.aclose()


async def watch_registry(registry: Registry, interval: float = REGISTRY_WATCH_INTERVAL) -> None:
    """Notice a replaced registry database: reopen a copy of it, fail closed on anything else (logged once)."""
    while True:
        with contextlib.suppress(RegistryError):  # given up: the registry logged why and refuses every request
            await registry.ensure_identity()
        await asyncio.sleep(interval)


def push_followers(settings: Settings, registry: Registry) -> list[PushFollower]:
    """Every revocation push ``iotauth.toml`` configures (each follows the feed with its own cursor)."""
    emqx = emqx_push(settings, registry)
    return [emqx] if emqx is not None else []


def emqx_push(settings: Settings, registry: Registry) -> PushFollower | None:
    """The follower that pushes revocations to EMQX, if ``[emqx] base_url`` is set."""
    emqx = settings.emqx
    if not emqx.base_url:
        return None
    secret = os.environ.get(emqx.api_secret_env)
    if not emqx.api_key or not secret:
        raise ConfigError(f"[emqx] base_url is set: also set [emqx] api_key and the secret in ${emqx.api_secret_env}")
    target = EmqxTarget(
        emqx.base_url, emqx.api_key, secret, registry, ban=emqx.ban, reset_node_cache=emqx.reset_node_cache
    )
    log.info("pushing revocations to EMQX at %s (ban: %s, node cache reset: %s)",
             emqx.base_url, emqx.ban, emqx.reset_node_cache)
    return PushFollower(registry, target)

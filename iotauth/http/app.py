"""The Starlette application behind ``iotauth serve``.

Stateless by design: every decision reads the registry (or a session policy
compiled from it), so any number of replicas can run behind a load balancer.
Request bodies are capped (413); JSON bodies are bounded in size and nesting
depth before they are parsed, and bad input is a 400 with a message. Nothing
here needs the issuing CA key except CRL signing (optional; see
:mod:`iotauth.http.crl`).
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from cryptography.x509 import ocsp
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iotauth import safejson
from iotauth.authority import Authority
from iotauth.errors import BadRequest, Conflict, InvalidIdentity, IotAuthError, NotFound, RegistryError
from iotauth.http.access import AccessPolicy
from iotauth.http.crl import CrlSource
from iotauth.http.metrics import MetricsMiddleware, ServeMetrics, metrics_endpoint
from iotauth.pki.ocsp import CertificateStatusAnswer, OcspResponder
from iotauth.registry import CertificateStatus, DeviceStatus, Registry, RevocationReason
from iotauth.registry.models import CRL_REASONS

log = logging.getLogger("iotauth.http")
MAX_BODY = 64 * 1024
MAX_JSON_BYTES = 16 * 1024  # an EMQX authn body with a certificate PEM is 1-3 KiB
MAX_JSON_DEPTH = 16  # every body iotauth reads is flat

Handler = Callable[[Request], Awaitable[Response]]


class ComponentHealth(Protocol):
    """A background part of the service that ``/healthz`` reports on (the revocation push)."""

    @property
    def healthy(self) -> bool: ...

    def as_dict(self) -> dict[str, object]: ...


@dataclass
class ServiceState:
    authority: Authority
    access: AccessPolicy
    crl: CrlSource
    ocsp: OcspResponder
    extra_routes: list[BaseRoute] = field(default_factory=list)
    push: list[ComponentHealth] = field(default_factory=list)
    metrics: ServeMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ServeMetrics(lambda: self.push)

    @property
    def registry(self) -> Registry:
        return self.authority.registry


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def read_json(request: Request) -> Mapping[str, Any]:
    """Parse a JSON object body (size-capped by the app), or raise :class:`BadRequest`."""
    try:
        body = await request.body()
    except HTTPException:  # 413 when the body exceeds the cap: Starlette answers it
        raise
    except (ClientDisconnect, ValueError) as exc:
        raise BadRequest(f"cannot read request body: {exc}") from exc
    if not body:
        return {}
    try:
        data = safejson.loads(body, max_bytes=MAX_JSON_BYTES, max_depth=MAX_JSON_DEPTH)
    except safejson.JsonRefused as exc:
        raise BadRequest(f"body refused: {exc}") from exc
    except ValueError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def error_status(exc: IotAuthError) -> int:
    """The HTTP status a domain error answers with."""
    if isinstance(exc, BadRequest | InvalidIdentity):
        return 400
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict):
        return 409
    return 503


def answer_errors(handler: Handler) -> Handler:
    """The service's one error boundary: domain errors become JSON answers with their status, never a trace."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except IotAuthError as exc:
            status = error_status(exc)
            if status == 503:
                log.warning("request failed: %s", exc)
            return error(status, str(exc))

    return wrapped


def state_of(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.iotauth
    return state


# -- CRL and OCSP (public: their content is signed) -------------------------------------


async def crl_der(request: Request) -> Response:
    document = await state_of(request).crl.current()
    return Response(document.der, media_type="application/pkix-crl", headers={"Cache-Control": "no-cache"})


async def crl_pem(request: Request) -> Response:
    document = await state_of(request).crl.current()
    return Response(document.pem, media_type="application/x-pem-file", headers={"Cache-Control": "no-cache"})


async def ocsp_post(request: Request) -> Response:
    body = await request.body()
    return await _ocsp(request, body)


async def ocsp_get(request: Request) -> Response:
    try:
        body = base64.b64decode(request.path_params["encoded"], validate=False)
    except (binascii.Error, ValueError):
        body = b""
    return await _ocsp(request, body)


async def _ocsp(request: Request, body: bytes) -> Response:
    state = state_of(request)

    async def lookup(serial: str) -> CertificateStatusAnswer:
        return await certificate_status(state.registry, serial)

    answer = await state.ocsp.respond(body, lookup)
    return Response(answer, media_type="application/ocsp-response")


async def certificate_status(registry: Registry, serial: str) -> CertificateStatusAnswer:
    """The OCSP view of a serial, consistent with the CRL (pending and suspended are on hold)."""
    try:
        record = await registry.get_certificate(serial)
    except NotFound:
        return CertificateStatusAnswer(ocsp.OCSPCertStatus.UNKNOWN)
    if record.status is CertificateStatus.REVOKED and record.revoked_at and record.revocation_reason:
        return CertificateStatusAnswer(
            ocsp.OCSPCertStatus.REVOKED,
            datetime.fromisoformat(record.revoked_at),
            CRL_REASONS[record.revocation_reason.value],
        )
    device = await registry.get_device(record.device_id)
    if record.status is CertificateStatus.PENDING or device.status is not DeviceStatus.ACTIVE:
        return CertificateStatusAnswer(
            ocsp.OCSPCertStatus.REVOKED,
            datetime.fromisoformat(record.issued_at),
            CRL_REASONS["certificate-hold"],
        )
    return CertificateStatusAnswer(ocsp.OCSPCertStatus.GOOD)


# -- admin API (bearer token over TLS) --------------------------------------------------


def admin(handler: Callable[[Request, str], Awaitable[Response]]) -> Handler:
    async def wrapped(request: Request) -> Response:
        actor = state_of(request).access.admin_actor(request.headers.get("authorization"))
        if actor is None:
            return error(403, "admin API: a valid 'Authorization: Bearer <token>' over TLS is required")
        return await handler(request, actor)

    return answer_errors(wrapped)


async def list_devices(request: Request, actor: str) -> Response:
    status = request.query_params.get("status")
    try:
        chosen = DeviceStatus(status) if status else None
    except ValueError as exc:
        raise BadRequest(f"unknown status {status!r}") from exc
    devices = await state_of(request).registry.list_devices(chosen)
    return JSONResponse([d.as_dict() for d in devices])


async def show_device(request: Request, actor: str) -> Response:
    registry = state_of(request).registry
    device_id = request.path_params["device_id"]
    device = await registry.get_device(device_id)
    certificates = await registry.certificates_of(device_id)
    return JSONResponse({"device": device.as_dict(), "certificates": [c.as_dict() for c in certificates]})


async def revoke_device(request: Request, actor: str) -> Response:
    body = await read_json(request)
    reason_text = body.get("reason", RevocationReason.UNSPECIFIED.value)
    try:
        reason = RevocationReason(reason_text)
    except ValueError as exc:
        choices = ", ".join(r.value for r in RevocationReason)
        raise BadRequest(f"unknown reason {reason_text!r}; use one of {choices}") from exc
    done = await state_of(request).authority.revoke_device(request.path_params["device_id"], reason, actor=actor)
    return JSONResponse(
        {
            "device_id": request.path_params["device_id"],
            "reason": reason.value,
            "revoked_serials": [c.serial for c in done.certificates],
        }
    )


async def suspend_device(request: Request, actor: str) -> Response:
    done = await state_of(request).authority.suspend_device(request.path_params["device_id"], actor=actor)
    return JSONResponse(done.device.as_dict())


async def resume_device(request: Request, actor: str) -> Response:
    done = await state_of(request).authority.resume_device(request.path_params["device_id"], actor=actor)
    return JSONResponse(done.device.as_dict())


async def health(request: Request) -> Response:
    """200 when the registry is readable and still the one opened, and every push is healthy; else 503, saying why.

    A registry replaced by a copy of itself is reopened here (and by the
    service's watcher); one that is gone or foreign makes this a 503 that
    says why, and every decision fails closed meanwhile.
    """
    state = state_of(request)
    registry = state.registry
    try:
        await registry.ensure_identity()
        await registry.last_event_id()
    except RegistryError as exc:
        return JSONResponse({"ok": False, "registry": str(exc)}, status_code=503)
    body: dict[str, object] = {"ok": True, "registry_instance": registry.instance_id}
    if state.push:
        healthy = all(p.healthy for p in state.push)
        body.update(ok=healthy, push=[p.as_dict() for p in state.push])
        if not healthy:
            return JSONResponse(body, status_code=503)
    return JSONResponse(body)


def create_app(state: ServiceState) -> Starlette:
    routes: list[BaseRoute] = [
        Route("/healthz", answer_errors(health)),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/crl.der", answer_errors(crl_der)),
        Route("/crl.pem", answer_errors(crl_pem)),
        Route("/ocsp", answer_errors(ocsp_post), methods=["POST"]),
        Route("/ocsp/{encoded:path}", answer_errors(ocsp_get), methods=["GET"]),
        Route("/admin/devices", admin(list_devices)),
        Route("/admin/devices/{device_id}", admin(show_device)),
        Route("/admin/devices/{device_id}/revoke", admin(revoke_device), methods=["POST"]),
        Route("/admin/devices/{device_id}/suspend", admin(suspend_device), methods=["POST"]),
        Route("/admin/devices/{device_id}/resume", admin(resume_device), methods=["POST"]),
        *state.extra_routes,
    ]
    app = Starlette(routes=routes, max_body_size=MAX_BODY,
                    middleware=[Middleware(MetricsMiddleware, metrics=state.metrics)])
    app.state.iotauth = state
    return app

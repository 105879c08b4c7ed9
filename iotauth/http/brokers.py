"""Broker-facing decisions, and the mosquitto-go-auth endpoints (EMQX's are in :mod:`iotauth.http.emqx`).

One decision engine, several front ends: :class:`~iotauth.policy.PolicySet` is
the same one the amqtt broker uses, bound per request to the device's current
profile; the registry is read on every request, so a revocation or a
suspension takes effect at the next CONNECT or topic check (nothing is cached
here; what the *broker* caches is its own business, see the README).

Identity comes from the broker's TLS layer, never from the client's own
claims: the broker passes the certificate (EMQX's ``${cert_pem}``) or at least
its CN, and the MQTT client id must equal the device id in the certificate.
With the certificate iotauth decides per certificate; without it, only per
device, which :class:`WithoutCertificate` makes an explicit choice.

With the certificate, a *pending* renewal (issued over MQTT by ``iotauth
renewer``) of an active device is activated by its first authentication, as
``iotauth broker`` does (:mod:`iotauth.broker.admission`): one registry
transaction makes it active and revokes the certificate it replaces; the
broker's own session takeover (the client id is the device id) closes the
old session.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iotauth.errors import BadRequest, CertificateRejected, InvalidIdentity, NotFound, PolicyDenied, RenewalRefused
from iotauth.http.app import Handler, answer_errors, read_json, state_of
from iotauth.http.metrics import Result, decided
from iotauth.identity import validate_device_id
from iotauth.pki.verify import ClientCertificateVerifier
from iotauth.policy import Action, PolicySet, SessionPolicy
from iotauth.registry import CertificateStatus, Credential, Device, DeviceStatus, Registry
from iotauth.registry.events import ACTIVATED_AT_CONNECT

log = logging.getLogger("iotauth.http.brokers")

# mosquitto-go-auth's 'acc' bit values.
GO_AUTH_ACCESS = {
    1: (Action.RECEIVE,),
    2: (Action.PUBLISH,),
    3: (Action.RECEIVE, Action.PUBLISH),
    4: (Action.SUBSCRIBE,),
}


class WithoutCertificate(StrEnum):
    """What :meth:`BrokerFrontEnd.authenticate` does when the broker passed no certificate."""

    REFUSE = "refuse"
    """No certificate, no entry (EMQX by default: ``[emqx] require_certificate = true``)."""
    UNAMBIGUOUS = "unambiguous"
    """Decide per device, but only while every unexpired certificate of the device is active, so the CN
    cannot belong to a pending or revoked one (EMQX with ``require_certificate = false``)."""
    PER_DEVICE = "per-device"
    """Decide per device (mosquitto-go-auth: Mosquitto itself checks the chain and the CRL)."""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str
    policy: SessionPolicy | None = None
    expires_at: datetime | None = None


@dataclass
class BrokerFrontEnd:
    """What the broker-facing endpoints need, built once per service.

    Compiled policies are cached per (profile, device): they are a pure
    function of the configuration, unlike the device's status, which is read
    from the registry on every request so that revocation is never delayed.
    """

    registry: Registry
    policies: PolicySet
    verifier: ClientCertificateVerifier
    renewal_ttl: timedelta | None = None
    """Pending renewals younger than this are activated by their first authentication; None: refused."""
    _compiled: dict[tuple[str, str], SessionPolicy | None] = field(default_factory=dict)

    async def authenticate(
        self, client_id: object, common_name: object, der: bytes | None, without: WithoutCertificate
    ) -> Verdict:
        """May this MQTT client connect? Bound to the certificate (DER) when the broker passes it.

        Args:
            client_id: the MQTT client id, which must be the device id.
            common_name: the certificate CN as the broker read it (``""``/None: not passed).
            der: the client certificate the broker passed, or None.
            without: what to do when ``der`` is None.
        """
        try:
            device_id = validate_device_id(client_id)
        except InvalidIdentity as exc:
            return Verdict(False, f"client id: {exc}")
        if common_name not in (None, "") and common_name != device_id:
            return Verdict(False, "client id does not match the certificate common name")
        if der is not None:
            return await self._by_certificate(der, device_id)
        if without is WithoutCertificate.REFUSE:
            return Verdict(False, "the broker passed no client certificate (cert_pem) and one is required")
        if common_name in (None, ""):
            return Verdict(False, "no client certificate identity was passed by the broker")
        return await self.device_level(device_id, unambiguous=without is WithoutCertificate.UNAMBIGUOUS)

    async def _by_certificate(self, der: bytes, device_id: str) -> Verdict:
        try:
            identity = self.verifier.verify_der(der)
        except (ValueError, CertificateRejected) as exc:
            return Verdict(False, f"certificate rejected: {exc}")
        if identity.device_id != device_id:
            return Verdict(False, "client id does not match the certificate identity")
        credential = await self.registry.find_credential(identity.fingerprint)
        if credential is None:
            return Verdict(False, "certificate unknown to the registry")
        if (self.renewal_ttl is not None and credential.device.device_id == device_id
                and credential.activatable(datetime.now().astimezone(), self.renewal_ttl)):
            try:
                done = await self.registry.activate_renewal(
                    credential.certificate.serial, device_id=device_id, actor=f"serve@{socket.gethostname()}"[:128],
                    via=ACTIVATED_AT_CONNECT, max_age=self.renewal_ttl)
            except RenewalRefused as exc:
                return Verdict(False, f"pending renewal not activated: {exc}")
            log.info("activated renewal %s of %s at its first authentication", done.certificate.serial, device_id)
            credential = Credential(done.certificate, credential.device)
        return self._usable(credential, device_id)

    def _usable(self, credential: Credential, device_id: str) -> Verdict:
        if credential.device.device_id != device_id:
            return Verdict(False, "certificate belongs to another device")
        if not credential.usable:
            return Verdict(
                False, f"certificate {credential.certificate.status.value}, device {credential.device.status.value}"
            )
        expires = datetime.fromisoformat(credential.certificate.not_after)
        if expires <= datetime.now(expires.tzinfo):
            return Verdict(False, "certificate expired")
        return Verdict(True, "ok", self._policy(credential.device.profile, device_id), expires)

    async def active_device(self, device_id: str) -> Device | Verdict:
        try:
            device = await self.registry.get_device(device_id)
        except NotFound:
            return Verdict(False, "unknown device")
        if device.status is not DeviceStatus.ACTIVE:
            return Verdict(False, f"device {device.status.value}")
        return device

    async def device_level(self, device_id: str, *, unambiguous: bool) -> Verdict:
        device = await self.active_device(device_id)
        if isinstance(device, Verdict):
            return device
        now = datetime.now().astimezone()
        certificates = await self.registry.certificates_of(device_id)
        unexpired = [c for c in certificates if datetime.fromisoformat(c.not_after) > now]
        active = [c for c in unexpired if c.status is CertificateStatus.ACTIVE]
        if not active:
            return Verdict(False, "device has no active certificate")
        if unambiguous and len(active) != len(unexpired):
            # A pending or revoked certificate of this device is still within its validity: its CN alone
            # cannot tell it from the active one, so only the certificate itself could decide.
            return Verdict(False, "device has a pending or revoked certificate; the broker must pass cert_pem")
        expires = max(datetime.fromisoformat(c.not_after) for c in active)
        return Verdict(
            True,
            "ok (device-level: the broker did not pass the certificate)",
            self._policy(device.profile, device_id),
            expires,
        )

    def _policy(self, profile: str, device_id: str) -> SessionPolicy | None:
        key = (profile, device_id)
        if key not in self._compiled:
            if len(self._compiled) > 100_000:
                self._compiled.clear()
            try:
                self._compiled[key] = self.policies.bind(profile, device_id)
            except (PolicyDenied, InvalidIdentity):  # unknown profile: no rights (fail closed)
                self._compiled[key] = None
        return self._compiled[key]

    async def authorize(self, client_id: object, action: Action, topic: object) -> Verdict:
        """May an (already connected) client do ``action`` on ``topic`` right now?"""
        try:
            device_id = validate_device_id(client_id)
        except InvalidIdentity as exc:
            return Verdict(False, f"client id: {exc}")
        if not isinstance(topic, str):
            return Verdict(False, "topic missing")
        device = await self.active_device(device_id)
        if isinstance(device, Verdict):
            return device
        policy = self._policy(device.profile, device_id)
        if policy is None:
            return Verdict(False, f"profile {device.profile!r} is not configured")
        reason = policy.explain(action, topic)
        return Verdict(reason is None, reason or "ok", policy)


def front_end(request: Request) -> BrokerFrontEnd:
    front: BrokerFrontEnd = request.app.state.brokers
    return front


def broker_peer_allowed(request: Request) -> bool:
    """Whether the caller is on ``[serve] broker_networks``."""
    host = request.client.host if request.client else None
    return state_of(request).access.broker_allowed(host)


def broker_only(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        if not broker_peer_allowed(request):
            decided(request, Result.OUTSIDE_NETWORKS)
            return JSONResponse(
                {"result": "deny", "error": "this endpoint only answers the broker's network"}, status_code=403
            )
        decided(request, Result.ERROR)  # until the handler answers: bad input is a 400 (a deny for the broker)
        return await handler(request)

    return answer_errors(wrapped)


def _go_auth(request: Request, verdict: Verdict) -> Response:
    decided(request, Result.ALLOW if verdict.allowed else Result.DENY)
    return JSONResponse(
        {"Ok": verdict.allowed, "Error": "" if verdict.allowed else verdict.reason},
        status_code=200 if verdict.allowed else 403,
    )


async def go_auth_user(request: Request) -> Response:
    body = await read_json(request)
    # With use_identity_as_username the username is the certificate CN; the client id must match it.
    username, client_id = body.get("username"), body.get("clientid") or body.get("username")
    if username != client_id:
        return _go_auth(request, Verdict(False, "client id does not match the certificate identity"))
    verdict = await front_end(request).authenticate(client_id, username, None, WithoutCertificate.PER_DEVICE)
    return _go_auth(request, verdict)


async def go_auth_superuser(request: Request) -> Response:
    await read_json(request)
    return _go_auth(request, Verdict(False, "devices are never superusers"))


async def go_auth_acl(request: Request) -> Response:
    body = await read_json(request)
    access = body.get("acc")
    if not isinstance(access, int) or access not in GO_AUTH_ACCESS:
        raise BadRequest(f"acc must be 1 (read), 2 (write), 3 (readwrite) or 4 (subscribe), got {access!r}")
    username, client_id = body.get("username"), body.get("clientid")
    if client_id not in (None, "", username):
        return _go_auth(request, Verdict(False, "client id does not match the certificate identity"))
    verdict = Verdict(True, "ok")
    for action in GO_AUTH_ACCESS[access]:
        verdict = await front_end(request).authorize(username, action, body.get("topic"))
        if not verdict.allowed:
            break
    return _go_auth(request, verdict)


def broker_routes() -> list[BaseRoute]:
    return [
        Route("/mosquitto/user", broker_only(go_auth_user), methods=["POST"]),
        Route("/mosquitto/superuser", broker_only(go_auth_superuser), methods=["POST"]),
        Route("/mosquitto/acl", broker_only(go_auth_acl), methods=["POST"]),
    ]

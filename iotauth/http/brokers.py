"""Broker-facing endpoints: EMQX HTTP authentication/authorization and mosquitto-go-auth.

One decision engine, two front ends: :class:`~iotauth.policy.PolicySet` is the
same one the amqtt broker uses, bound per request to the device's current
profile; the registry is read on every request, so a revocation or a
suspension takes effect at the next CONNECT or topic check (nothing is cached).

Identity comes from the broker's TLS layer, never from the client's own
claims: EMQX passes the certificate's CN (``${cert_common_name}``) and,
recommended, its PEM or SHA-256 fingerprint; the MQTT client id must equal
the device id in the certificate. Without the certificate itself iotauth can
only decide per device, not per certificate; configure EMQX to forward it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iotauth.errors import BadRequest, CertificateRejected, InvalidIdentity, NotFound, PolicyDenied
from iotauth.http.app import Handler, answer_errors, read_json, state_of
from iotauth.identity import validate_device_id
from iotauth.pki.verify import ClientCertificateVerifier
from iotauth.policy import Action, PolicySet, SessionPolicy
from iotauth.registry import CertificateStatus, Credential, Device, DeviceStatus, Registry

log = logging.getLogger("iotauth.http.brokers")

# mosquitto-go-auth's 'acc' bit values.
GO_AUTH_ACCESS = {
    1: (Action.RECEIVE,),
    2: (Action.PUBLISH,),
    3: (Action.RECEIVE, Action.PUBLISH),
    4: (Action.SUBSCRIBE,),
}


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
    _compiled: dict[tuple[str, str], SessionPolicy | None] = field(default_factory=dict)

    async def authenticate(
        self, client_id: object, common_name: object, cert_pem: object, cert_fingerprint: object
    ) -> Verdict:
        """May this MQTT client connect? Bound to the certificate when the broker passes it."""
        try:
            device_id = validate_device_id(client_id)
        except InvalidIdentity as exc:
            return Verdict(False, f"client id: {exc}")
        if common_name not in (None, "") and common_name != device_id:
            return Verdict(False, "client id does not match the certificate common name")
        fingerprint = await self._fingerprint(cert_pem, cert_fingerprint, device_id)
        if isinstance(fingerprint, Verdict):
            return fingerprint
        if fingerprint is not None:
            credential = await self.registry.find_credential(fingerprint)
            if credential is None:
                return Verdict(False, "certificate unknown to the registry")
            return self._usable(credential, device_id)
        if common_name in (None, ""):
            return Verdict(False, "no client certificate identity was passed by the broker")
        return await self._device_only(device_id)

    async def _fingerprint(self, cert_pem: object, cert_fingerprint: object, device_id: str) -> str | Verdict | None:
        if isinstance(cert_pem, str) and cert_pem.strip():
            try:
                identity = self.verifier.verify(x509.load_pem_x509_certificate(cert_pem.encode()))
            except (ValueError, CertificateRejected) as exc:
                return Verdict(False, f"certificate rejected: {exc}")
            if identity.device_id != device_id:
                return Verdict(False, "client id does not match the certificate identity")
            return identity.fingerprint
        if isinstance(cert_fingerprint, str) and cert_fingerprint.strip():
            return cert_fingerprint.strip().lower().replace(":", "")
        return None

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

    async def _active_device(self, device_id: str) -> Device | Verdict:
        try:
            device = await self.registry.get_device(device_id)
        except NotFound:
            return Verdict(False, "unknown device")
        if device.status is not DeviceStatus.ACTIVE:
            return Verdict(False, f"device {device.status.value}")
        return device

    async def _device_only(self, device_id: str) -> Verdict:
        device = await self._active_device(device_id)
        if isinstance(device, Verdict):
            return device
        now = datetime.now().astimezone()
        active = [
            c
            for c in await self.registry.certificates_of(device_id)
            if c.status is CertificateStatus.ACTIVE and datetime.fromisoformat(c.not_after) > now
        ]
        if not active:
            return Verdict(False, "device has no active certificate")
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
        device = await self._active_device(device_id)
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


def broker_only(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        host = request.client.host if request.client else None
        if not state_of(request).access.broker_allowed(host):
            return JSONResponse(
                {"result": "deny", "error": "this endpoint only answers the broker's network"}, status_code=403
            )
        return await handler(request)

    return answer_errors(wrapped)


def _emqx_acl(policy: SessionPolicy | None) -> list[dict[str, str]]:
    rules = [
        {"permission": "allow", "action": rule.action.value, "topic": rule.topic_filter}
        for rule in (policy.rules() if policy else ())
    ]
    return [*rules, {"permission": "deny", "action": "all", "topic": "#"}]


async def emqx_authenticate(request: Request) -> Response:
    body = await read_json(request)
    verdict = await front_end(request).authenticate(
        body.get("clientid"), body.get("cert_common_name"), body.get("cert_pem"), body.get("cert_fingerprint")
    )
    log.info("emqx authn %s: %s", body.get("clientid"), verdict.reason)
    if not verdict.allowed:
        return JSONResponse({"result": "deny", "reason": verdict.reason})
    answer: dict[str, Any] = {"result": "allow", "is_superuser": False, "acl": _emqx_acl(verdict.policy)}
    if verdict.expires_at is not None:
        answer["expire_at"] = int(verdict.expires_at.timestamp())
    return JSONResponse(answer)


async def emqx_authorize(request: Request) -> Response:
    body = await read_json(request)
    action_text = body.get("action")
    if action_text not in ("publish", "subscribe"):
        raise BadRequest(f"action must be 'publish' or 'subscribe', got {action_text!r}")
    verdict = await front_end(request).authorize(body.get("clientid"), Action(action_text), body.get("topic"))
    return JSONResponse({"result": "allow" if verdict.allowed else "deny"})


def _go_auth(verdict: Verdict) -> Response:
    return JSONResponse(
        {"Ok": verdict.allowed, "Error": "" if verdict.allowed else verdict.reason},
        status_code=200 if verdict.allowed else 403,
    )


async def go_auth_user(request: Request) -> Response:
    body = await read_json(request)
    # With use_identity_as_username the username is the certificate CN; the client id must match it.
    username, client_id = body.get("username"), body.get("clientid") or body.get("username")
    if username != client_id:
        return _go_auth(Verdict(False, "client id does not match the certificate identity"))
    return _go_auth(await front_end(request).authenticate(client_id, username, None, None))


async def go_auth_superuser(request: Request) -> Response:
    await read_json(request)
    return _go_auth(Verdict(False, "devices are never superusers"))


async def go_auth_acl(request: Request) -> Response:
    body = await read_json(request)
    access = body.get("acc")
    if not isinstance(access, int) or access not in GO_AUTH_ACCESS:
        raise BadRequest(f"acc must be 1 (read), 2 (write), 3 (readwrite) or 4 (subscribe), got {access!r}")
    username, client_id = body.get("username"), body.get("clientid")
    if client_id not in (None, "", username):
        return _go_auth(Verdict(False, "client id does not match the certificate identity"))
    verdict = Verdict(True, "ok")
    for action in GO_AUTH_ACCESS[access]:
        verdict = await front_end(request).authorize(username, action, body.get("topic"))
        if not verdict.allowed:
            break
    return _go_auth(verdict)


def broker_routes() -> list[BaseRoute]:
    return [
        Route("/emqx/authn", broker_only(emqx_authenticate), methods=["POST"]),
        Route("/emqx/authz", broker_only(emqx_authorize), methods=["POST"]),
        Route("/mosquitto/user", broker_only(go_auth_user), methods=["POST"]),
        Route("/mosquitto/superuser", broker_only(go_auth_superuser), methods=["POST"]),
        Route("/mosquitto/acl", broker_only(go_auth_acl), methods=["POST"]),
    ]

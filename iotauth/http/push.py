"""Push revocations to an EMQX cluster through its REST API: ban, reset the node caches, kick.

EMQX keeps an authenticated session until the client disconnects: its HTTP
authenticator is asked again only at the next CONNECT, and the ACL iotauth put
in the authentication answer lives as long as the connection. So ``iotauth
serve`` follows the registry's change feed (:class:`iotauth.export.follower.PushFollower`,
persisted cursor, retries, audit) and, for every revoked or suspended device,
drives this target. Every request and answer below is EMQX's own, read from
github.com/emqx/emqx at tag v5.8.0 (e5ed59de) unless another ref is named:

* **Credentials.** HTTP Basic with an API key and secret
  (``apps/emqx_dashboard/src/emqx_dashboard.erl`` ``authorize/1`` and
  ``api_key_authorize/3``, lines 288-340). 401 for a missing header
  (``AUTHORIZATION_HEADER_ERROR``) or a bad key (``BAD_API_KEY_OR_SECRET``);
  403 ``UNAUTHORIZED_ROLE`` when an Enterprise key's role may not do this (kick
  and ban need ``administrator``). Both are :class:`PushUnauthorized`: loud.
* **Ban** (``[emqx] ban = true``, the default), sent first:
  ``POST /api/v5/banned`` with ``{"as": "clientid", "who", "by", "reason",
  "until"}``, ``until`` being the device's last certificate's notAfter in RFC
  3339 (``apps/emqx_management/src/emqx_mgmt_api_banned.erl`` ``schema("/banned")``
  and ``banned/2``, lines 57-182). 200 with the ban; 400 ``ALREADY_EXISTS`` when
  an unexpired ban exists (``apps/emqx/src/emqx_banned.erl`` ``create/1``): done
  either way. Bans are checked at CONNECT *before* authentication
  (``apps/emqx/src/emqx_channel.erl`` ``check_banned/2``, CONNECT pipeline lines
  347-369), so no authn cache can re-admit the device, and a clientid ban kicks
  the live session at once (``emqx_banned.erl`` ``on_banned/1``). On resume
  (``device.active``) the ban is lifted: ``DELETE /api/v5/banned/clientid/{who}``,
  204, or 404 when there is none (``delete_banned/2``).
* **Node caches** (``[emqx] reset_node_cache = true``, the default), once per
  batch, before the kicks: ``POST /api/v5/authentication/node_cache/reset`` and
  ``POST /api/v5/authorization/node_cache/reset``, 204 (tag 6.2.2,
  ``apps/emqx_auth/src/emqx_authn/emqx_authn_api.erl``
  ``authentication_node_cache_reset/2``, lines 845-855;
  ``apps/emqx_auth/src/emqx_authz/emqx_authz_api_cache.erl``
  ``node_cache_reset/2``, lines 173-183). EMQX before e5.9.0 has no node cache
  and no such route: 404 from ``emqx_dashboard_not_found:init/2``, which is fine.
* **Kick:** ``DELETE /api/v5/clients/{clientid}``, 204, or 404
  ``CLIENTID_NOT_FOUND`` when the client is not connected
  (``apps/emqx_management/src/emqx_mgmt_api_clients.erl`` ``schema("/clients/:clientid")``
  and ``kickout/1``, lines 204-234 and 1215-1221). The client id is the device
  id (the authenticator enforces it), so every replica may send it.

Statuses 429 and 5xx, timeouts and refused connections are
:class:`PushUnavailable` (retried); any other unexpected status is
:class:`PushRejected` (audited and skipped).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from iotauth.errors import NotFound, PushRejected, PushUnauthorized, PushUnavailable
from iotauth.identity import validate_device_id
from iotauth.registry import AuditEvent, CertificateRecord, Device, DeviceStatus, EventKind
from iotauth.registry.events import EMQX_KICKS, PUSH_RESTORES, superseded_at_connect

log = logging.getLogger("iotauth.http.push")
TIMEOUT = 10.0
BAN_MARGIN = timedelta(minutes=1)  # a ban shorter than this is pointless: the certificate is about to expire


class DeviceState(Protocol):
    """The registry reads the target makes (``iotauth.registry.Registry`` has them)."""

    async def get_device(self, device_id: str) -> Device: ...

    async def certificates_of(self, device_id: str) -> list[CertificateRecord]: ...

    async def events(
        self, *, after_id: int = 0, since: str | None = None, device_id: str | None = None, limit: int | None = None
    ) -> list[AuditEvent]: ...


@dataclass
class EmqxTarget:
    """The EMQX REST API as a :class:`~iotauth.export.follower.PushTarget`.

    Args:
        base_url: the dashboard/API listener, e.g. ``https://emqx:18084``.
        api_key, api_secret: an API key with the ``administrator`` role (EE) or any key (CE).
        registry: where the device's current status and certificates are read.
        ban: also ban revoked and suspended devices by client id (and lift the ban on resume).
        reset_node_cache: reset EMQX's authn/authz node caches before each batch of kicks.
    """

    base_url: str
    api_key: str
    api_secret: str
    registry: DeviceState
    ban: bool = True
    reset_node_cache: bool = True
    _client: httpx.AsyncClient | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return "emqx"

    def relevant(self, event: AuditEvent) -> bool:
        if superseded_at_connect(event.kind, event.data):  # EMQX took the old session over itself: a kick by
            return False  # client id would close the device's new session on its renewed certificate
        return event.kind in EMQX_KICKS or (self.ban and event.kind in PUSH_RESTORES)

    async def prepare(self, events: Sequence[AuditEvent]) -> Mapping[str, object]:
        if not self.reset_node_cache or not any(e.kind in EMQX_KICKS for e in events):
            return {}
        answers = {}
        for kind in ("authentication", "authorization"):
            status = await self._call("POST", f"/api/v5/{kind}/node_cache/reset")
            if status not in (204, 404):
                raise PushRejected(f"EMQX answered HTTP {status} to the {kind} node cache reset")
            answers[f"{kind}_node_cache_reset"] = status
        return answers

    async def apply(self, device_id: str, events: Sequence[AuditEvent]) -> Mapping[str, object]:
        device_id = validate_device_id(device_id)
        try:
            device = await self.registry.get_device(device_id)
        except NotFound as exc:
            raise PushRejected(f"device {device_id!r} is not in the registry") from exc
        answers: dict[str, object] = {}
        if device.status is not DeviceStatus.ACTIVE:
            if self.ban:
                answers["ban"] = await self._ban(device, await self.registry.certificates_of(device_id))
            answers["kick"] = await self._kick(device_id)
            return answers
        if any(e.kind in EMQX_KICKS for e in events):  # one certificate revoked: the device may use another
            answers["kick"] = await self._kick(device_id)
        if self.ban and any(e.kind in PUSH_RESTORES for e in events) and await self._was_suspended(device_id):
            answers["unban"] = await self._expect(
                "DELETE", f"/api/v5/banned/clientid/{_path(device_id)}", (204, 404), "lift the ban of"
            )
        return answers

    async def _was_suspended(self, device_id: str) -> bool:
        """Only a device that was ever suspended can hold a ban iotauth would lift (revocation is final), so a
        first activation on the production line costs no call to EMQX."""
        history = await self.registry.events(device_id=device_id)
        return any(e.kind == EventKind.DEVICE_SUSPENDED for e in history)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _kick(self, device_id: str) -> int:
        return await self._expect("DELETE", f"/api/v5/clients/{_path(device_id)}", (204, 404), "kick")

    async def _ban(self, device: Device, certificates: Sequence[CertificateRecord]) -> object:
        now = datetime.now(UTC)
        until = max((datetime.fromisoformat(c.not_after) for c in certificates), default=now)
        if until <= now + BAN_MARGIN:
            return "not needed: no certificate of the device is still valid"
        body = {
            "as": "clientid",
            "who": device.device_id,
            "by": "iotauth",
            "reason": f"iotauth: device {device.status.value}",
            "until": until.astimezone(UTC).replace(microsecond=0).isoformat(),
        }
        status, answer = await self._request("POST", "/api/v5/banned", body)
        if status == 200:
            return 200
        if status == 400 and _error_code(answer) == "ALREADY_EXISTS":
            return "already banned"
        raise PushRejected(f"EMQX refused to ban {device.device_id!r}: HTTP {status} {answer.text[:200]!r}")

    async def _expect(self, method: str, path: str, accepted: tuple[int, ...], what: str) -> int:
        status = await self._call(method, path)
        if status not in accepted:
            raise PushRejected(f"EMQX answered HTTP {status} to {what} {path.rsplit('/', 1)[-1]!r}")
        return status

    async def _call(self, method: str, path: str) -> int:
        status, _ = await self._request(method, path, None)
        return status

    async def _request(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, httpx.Response]:
        """One call; 401/403 raise :class:`PushUnauthorized`, 429/5xx and network errors :class:`PushUnavailable`."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=TIMEOUT, headers={"accept": "application/json"})
        url = f"{self.base_url.rstrip('/')}{path}"
        try:
            answer = await self._client.request(method, url, json=body, auth=(self.api_key, self.api_secret))
        except httpx.HTTPError as exc:
            raise PushUnavailable(f"EMQX {method} {path}: {type(exc).__name__}: {exc}") from exc
        status = answer.status_code
        log.info("EMQX %s %s: HTTP %d", method, path, status)
        if status in (401, 403):
            raise PushUnauthorized(f"EMQX {method} {path}: HTTP {status} {_error_code(answer) or ''}".strip())
        if status == 429 or status >= 500:
            raise PushUnavailable(f"EMQX {method} {path}: HTTP {status}")
        return status, answer


def _path(device_id: str) -> str:
    return quote(validate_device_id(device_id), safe="")


def _error_code(answer: httpx.Response) -> str | None:
    """The ``code`` of EMQX's error body ``{"code": ..., "message": ...}``, if it is one."""
    try:
        data = answer.json()
    except ValueError:
        return None
    code = data.get("code") if isinstance(data, dict) else None
    return code if isinstance(code, str) else None

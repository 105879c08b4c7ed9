"""RabbitMQ's HTTP auth backend: ``/rabbitmq/user``, ``/vhost``, ``/resource`` and ``/topic``.

The contract, cited from RabbitMQ 3.10.8 (``rabbitmq/rabbitmq-server`` at
``v3.10.8``, ``deps/rabbitmq_auth_backend_http/src/rabbit_auth_backend_http.erl``):

* Requests are GET with a query string or POST with the same fields
  form-encoded (``do_http_req/2``, ``auth_http.http_method``); values are
  ``quote_plus`` escaped (``q/1``); a map-valued field such as the topic
  check's ``variable_map`` becomes ``variable_map.<key>=<value>`` fields
  (``escape/2``).
* The answer is plain text, read lower-cased and stripped (``parse_resp/1``)
  with status 200 or 201: ``allow`` (user path: followed by tags, such as
  ``allow administrator``) or ``deny``. Any other status, body or error
  refuses too (``{error, ...}`` from ``bool_req/2`` and
  ``user_login_authentication/2``), but differently logged and sometimes by
  crashing the client's process, so every answer here is 200 and exactly
  ``allow`` or ``deny``: bad input, a registry failure or a caller outside
  ``[serve] broker_networks`` is ``deny``.

What is asked (measured against the real cluster; ``tests/export/test_rabbitmq_cluster.py``):

* ``user``: ``username`` only for a certificate login (the CN); ``username``,
  ``password``, ``vhost`` and ``client_id`` for an MQTT password login, which
  RabbitMQ lets override the certificate (it asks about *that* username);
  ``username`` and ``password`` for a management API login.
* ``vhost``: ``username, vhost, ip, tags, client_id`` (the MQTT client id).
* ``resource``: the subscription queues (configure, read, write) and the
  ``amq.topic`` exchange (read on SUBSCRIBE, write on PUBLISH).
* ``topic``: the routing key (see :mod:`iotauth.rabbitmq` for the
  translation) with ``permission`` write (PUBLISH) or read (SUBSCRIBE).

Decisions: a request carrying a password is denied, except the management
identity with the right password and no MQTT client id; devices are decided
from the registry and the policy engine, bound to the username (the
certificate's CN, a device id RabbitMQ can keep apart); the client id must
equal it, which also stops one device from kicking another by reusing its
client id. RabbitMQ caches allow answers per connection (topics, 12 entries,
until the connection idles), so only a kick ends a busy live session: the
revocation follower in :mod:`iotauth.export.rabbitmq` does that.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from iotauth.config import Home, RabbitmqSettings
from iotauth.errors import InvalidIdentity
from iotauth.http.app import state_of
from iotauth.http.brokers import BrokerFrontEnd, Verdict
from iotauth.http.metrics import Result, decided
from iotauth.identity import validate_device_id
from iotauth.rabbitmq import ADMIN_USER, EXCHANGE, VHOST, admin_secret, subscription_queues, topic_request

log = logging.getLogger("iotauth.http.rabbitmq")

MAX_FIELDS = 32
MAX_REQUEST = 16 * 1024  # RabbitMQ's requests are a few hundred bytes
ALLOW, DENY, ALLOW_ADMIN = "allow", "deny", "allow administrator"
QUEUE_PERMISSIONS = frozenset({"configure", "read", "write"})
EXCHANGE_PERMISSIONS = frozenset({"read", "write"})

Params = Mapping[str, str]


@dataclass(frozen=True)
class Answer:
    """What RabbitMQ is told (``text``) and why (``reason``, for the log only)."""

    text: str
    reason: str


def deny(reason: str) -> Answer:
    return Answer(DENY, reason)


@dataclass
class RabbitmqAuthorizer:
    """The four decisions, over the same registry reads and compiled policies as the EMQX endpoints."""

    front: BrokerFrontEnd
    home: Home
    settings: RabbitmqSettings

    def _device(self, params: Params) -> str | Answer:
        """The username as a device id RabbitMQ can keep apart, or why not."""
        if not self.settings.enabled:
            return deny("[rabbitmq] enabled = false in iotauth.toml")
        try:
            return validate_device_id(params.get("username"), rabbitmq=True)
        except InvalidIdentity as exc:
            return deny(f"username: {exc}")

    async def user(self, params: Params) -> Answer:
        if "password" in params:
            return self._admin_login(params)
        device_id = self._device(params)
        if isinstance(device_id, Answer):
            return device_id
        if params.get("client_id", device_id) != device_id:
            return deny("client id differs from the certificate's device id")
        # RabbitMQ never passes the certificate: decide per device; its CRL check refuses revoked and pending
        # certificates at TLS (the follower keeps it current), so a pending renewal does not lock the device out.
        verdict = await self.front.device_level(device_id, unambiguous=False)
        return Answer(ALLOW, verdict.reason) if verdict.allowed else deny(verdict.reason)

    def _admin_login(self, params: Params) -> Answer:
        """Only iotauth's management identity may log in with a password, and not over MQTT."""
        if not self.settings.enabled or params.get("username") != ADMIN_USER:
            return deny("password logins are refused: devices log in with their certificate only")
        if "client_id" in params:
            return deny("the management identity may not connect over MQTT")
        expected = admin_secret(self.home, self.settings)
        if expected is None:
            return deny("no management secret configured (run 'iotauth export rabbitmq')")
        given = hashlib.sha256(params["password"].encode()).digest()
        if not hmac.compare_digest(given, hashlib.sha256(expected.encode()).digest()):
            return deny("wrong management password")
        return Answer(ALLOW_ADMIN, "iotauth's management identity")

    async def vhost(self, params: Params) -> Answer:
        device_id = self._device(params)
        if isinstance(device_id, Answer):
            return device_id
        if params.get("vhost") != VHOST:
            return deny(f"devices use only the vhost {VHOST!r}")
        if params.get("client_id") != device_id:
            return deny("MQTT client id must equal the device id")
        return await self._active(device_id)

    async def resource(self, params: Params) -> Answer:
        device_id = self._device(params)
        if isinstance(device_id, Answer):
            return device_id
        if params.get("vhost") != VHOST or params.get("client_id", device_id) != device_id:
            return deny("another vhost or client id")
        kind, name, permission = params.get("resource"), params.get("name"), params.get("permission")
        if kind == "queue" and name in subscription_queues(device_id) and permission in QUEUE_PERMISSIONS:
            return await self._active(device_id)
        if kind == "exchange" and name == EXCHANGE and permission in EXCHANGE_PERMISSIONS:
            return await self._active(device_id)
        return deny(f"{kind} {name!r} ({permission}) is not this device's")

    async def topic(self, params: Params) -> Answer:
        device_id = self._device(params)
        if isinstance(device_id, Answer):
            return device_id
        if params.get("vhost") != VHOST or params.get("resource") != "topic" or params.get("name") != EXCHANGE:
            return deny(f"only topics of {EXCHANGE!r} in vhost {VHOST!r}")
        if params.get("variable_map.client_id") != device_id:
            return deny("MQTT client id must equal the device id")
        if params.get("variable_map.username", device_id) != device_id:
            return deny("variable_map names another user")
        request = topic_request(params.get("permission", ""), params.get("routing_key", ""))
        if request is None:
            return deny("not an MQTT publish or subscription")
        action, topic = request
        verdict = await self.front.authorize(device_id, action, topic)
        return Answer(ALLOW, verdict.reason) if verdict.allowed else deny(f"{action.value} {topic!r}: {verdict.reason}")

    async def _active(self, device_id: str) -> Answer:
        device = await self.front.active_device(device_id)
        return deny(device.reason) if isinstance(device, Verdict) else Answer(ALLOW, "ok")


def parse_fields(text: str) -> dict[str, str] | None:
    """RabbitMQ's fields, or ``None`` for anything it would not send (malformed, repeated, too many)."""
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=MAX_FIELDS,
                          errors="strict")
    except (ValueError, UnicodeDecodeError):
        return None
    fields = dict(pairs)
    return fields if len(fields) == len(pairs) else None


async def read_capped(request: Request) -> str | None:
    """The form body, or ``None`` past :data:`MAX_REQUEST` (read no further) or if it is not UTF-8."""
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_REQUEST:
            return None
        chunks.append(chunk)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        return None


Decision = Callable[[RabbitmqAuthorizer, Params], Awaitable[Answer]]


def endpoint(decide: Decision) -> Callable[[Request], Awaitable[Response]]:
    """Every answer is 200 ``allow``/``deny``; nothing that goes wrong here can become an allow."""

    async def handler(request: Request) -> Response:
        path = request.url.path
        try:
            host = request.client.host if request.client else None
            if not state_of(request).access.broker_allowed(host):
                answer, outcome = deny(f"caller {host} is outside [serve] broker_networks"), Result.OUTSIDE_NETWORKS
            else:
                text = request.url.query if request.method == "GET" else await read_capped(request)
                fields = None if text is None or len(text) > MAX_REQUEST else parse_fields(text)
                authorizer: RabbitmqAuthorizer = request.app.state.rabbitmq
                answer = deny("malformed request") if fields is None else await decide(authorizer, fields)
                outcome = (Result.ERROR if fields is None
                           else Result.DENY if answer.text == DENY else Result.ALLOW)
        except Exception as exc:  # the boundary: a failure is a deny, said loudly
            log.warning("rabbitmq %s: deny after an error: %s: %s", path, type(exc).__name__, exc)
            answer, outcome = deny("error"), Result.ERROR
        log.info("rabbitmq %s: %s (%s)", path, answer.text, answer.reason)
        decided(request, outcome)
        return PlainTextResponse(answer.text)

    return handler


def rabbitmq_routes() -> list[BaseRoute]:
    """The four paths. Their own body cap (:func:`read_capped`) replaces the app's, whose 413 is no answer
    RabbitMQ reads as a plain deny."""
    decisions: dict[str, Decision] = {
        "user": RabbitmqAuthorizer.user,
        "vhost": RabbitmqAuthorizer.vhost,
        "resource": RabbitmqAuthorizer.resource,
        "topic": RabbitmqAuthorizer.topic,
    }
    return [
        Route(f"/rabbitmq/{name}", endpoint(decide), methods=["GET", "POST"], max_body_size=2**62)
        for name, decide in decisions.items()
    ]

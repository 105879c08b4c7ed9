"""EMQX's HTTP authenticator and authorizer: ``/emqx/authn`` and ``/emqx/authz``, answered the way EMQX reads them.

Every answer is **HTTP 200 with a JSON body**, ``{"result": "allow"|"deny", ...}``,
including for every error on either side (bad or oversized input, an unknown
device, the registry down, a caller outside ``[serve] broker_networks``, a
wrong path or method under ``/emqx/``). Why, from EMQX's own source
(github.com/emqx/emqx, tag v5.8.0 unless another ref is named):

* EMQX's HTTP connector turns every non-2xx status, timeout and refused
  connection into an error (``apps/emqx_bridge_http/src/emqx_bridge_http_connector.erl``
  ``transform_result/1``). The **authorizer** answers that with ``ignore``
  (``apps/emqx_auth_http/src/emqx_authz_http.erl`` ``authorize/4``) and the
  chain moves on to the next source (``emqx_authz.erl`` ``do_authorize/4``):
  ``acl.conf``, whose default ends ``{allow, all}``, then ``no_match``, ``allow``
  on 5.x. A 4xx or 5xx from iotauth would *allow*. Only 200 ``deny`` denies.
* The **authenticator** answers a non-200 (and a 200 without
  ``content-type: application/json``) with ``ignore``: next authenticator
  (``apps/emqx_auth_http/src/emqx_authn_http.erl`` ``authenticate/2``,
  ``handle_response/2``); with none left, the client is refused
  (``emqx_authn_chains.erl``). iotauth answers 200 ``deny`` instead, the one
  answer that denies whatever else is configured after it. The cost: EMQX 6.2+
  keeps 200 answers in its authn node cache (a registry outage's denials are
  remembered up to ``cache_ttl``); disable that cache anyway (README).

The authentication answer is ``{"result": "allow", "is_superuser": false,
"expire_at": <notAfter, integer Unix seconds>, "acl": [...]}``:
``is_superuser`` is always false (true skips every authorization,
``emqx_authz.erl`` ``authorize/5``); ``expire_at`` must be integer seconds in
the future or EMQX *refuses the login* (``emqx_authn_http.erl`` ``expire_sec/1``),
and EMQX disconnects the client at that time; the ACL is
:func:`iotauth.http.emqx_acl.render_acl`'s.

Requests may be POST JSON (recommended), POST form or GET query string, the
three shapes EMQX can send (``apps/emqx_auth/src/emqx_auth_utils.erl``
``generate_request/2``); every value EMQX renders is a string. ``cert_pem`` is
what EMQX 5.7.1+ sends for ``${cert_pem}``: standard base64 of the leaf's DER,
*no* PEM armour (``emqx_auth_utils.erl`` ``render_var/2``:
``base64:encode(Value)``; ``apps/emqx/src/emqx_channel.erl`` ``maybe_add_cert/2``).
A PEM block is accepted too. ``""`` (no client certificate, TLS terminated by a
proxy, ``emqx_auth_utils.erl`` ``render_var(_, undefined) -> <<>>``) and the
literal ``${cert_pem}`` (EMQX 5.7.0 and older send unknown placeholders as is,
``handle_disallowed_placeholders/3``) both mean "no certificate presented":
refused unless ``[emqx] require_certificate = false``
(:class:`~iotauth.http.brokers.WithoutCertificate`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iotauth.errors import BadRequest
from iotauth.http.brokers import WithoutCertificate, broker_peer_allowed, front_end
from iotauth.http.emqx_acl import render_acl
from iotauth.http.metrics import Result, decided
from iotauth.policy import Action

log = logging.getLogger("iotauth.http.emqx")

MAX_BODY = 16 * 1024  # EMQX's own body is a few strings and one certificate (base64 DER, ~1 KiB)
MAX_FIELDS = 32
NOT_RENDERED = "${cert_pem}"
ROUTE_BODY_CEILING = 1 << 40
"""Route-level body limit: lifts Starlette's app-wide one for these routes, whose 413 EMQX would read as
"ignore"; :func:`_read_body` enforces :data:`MAX_BODY` itself and answers deny."""

Params = Mapping[str, Any]
Decide = Callable[[Request, Params], Awaitable[dict[str, Any]]]
DENY: dict[str, Any] = {"result": "deny"}


@dataclass(frozen=True)
class EmqxOptions:
    """``[emqx]`` settings the endpoints use (the push has its own)."""

    require_certificate: bool = True

    @property
    def without_certificate(self) -> WithoutCertificate:
        return WithoutCertificate.REFUSE if self.require_certificate else WithoutCertificate.UNAMBIGUOUS


def options_of(request: Request) -> EmqxOptions:
    options = getattr(request.app.state, "emqx", None)
    return options if isinstance(options, EmqxOptions) else EmqxOptions()


# -- the endpoints ---------------------------------------------------------------------------


async def authenticate(request: Request, params: Params) -> dict[str, Any]:
    client_id = params.get("clientid")
    password = params.get("password")
    if password not in (None, ""):
        return _deny("authn", client_id, "a password was sent: devices authenticate with their certificate only")
    der = decode_cert_pem(params.get("cert_pem"))
    options = options_of(request)
    if der is None and options.require_certificate:
        _warn_once("no-cert", "EMQX passed no certificate (empty or literal ${cert_pem}): see the README, EMQX section")
    verdict = await front_end(request).authenticate(
        client_id, params.get("cert_common_name"), der, options.without_certificate
    )
    if not verdict.allowed:
        return _deny("authn", client_id, verdict.reason)
    answer: dict[str, Any] = {"result": "allow", "is_superuser": False}
    if verdict.expires_at is not None:
        expire_at = int(verdict.expires_at.timestamp())
        if expire_at <= int(time.time()):  # EMQX refuses a past expire_at; say why ourselves
            return _deny("authn", client_id, "certificate expired")
        answer["expire_at"] = expire_at
    acl = render_acl(verdict.policy)
    if acl.narrowed:
        _warn_once(f"narrowed:{acl.narrowed}", f"EMQX gets these rules only as exact filters: {list(acl.narrowed)}")
    answer["acl"] = acl.rules
    log.info("emqx authn %s: allow (%s)", client_id, verdict.reason)
    return answer


async def authorize(request: Request, params: Params) -> dict[str, Any]:
    client_id, action = params.get("clientid"), params.get("action")
    if action not in (Action.PUBLISH.value, Action.SUBSCRIBE.value):
        raise BadRequest(f"action must be 'publish' or 'subscribe', got {str(action)[:20]!r}")
    common_name = params.get("cert_common_name")
    if common_name not in (None, "") and common_name != client_id:
        return _deny("authz", client_id, "client id does not match the certificate common name")
    verdict = await front_end(request).authorize(client_id, Action(action), params.get("topic"))
    return {"result": "allow" if verdict.allowed else "deny"}


async def refuse(request: Request, params: Params) -> dict[str, Any]:
    """Anything else under ``/emqx/`` (a typo in EMQX's URL): a 404 there would read as "ignore"."""
    _warn_once(f"path:{request.url.path[:64]}", f"EMQX called an unknown path {request.url.path[:64]!r}: denied")
    return DENY


def emqx_routes() -> list[BaseRoute]:
    methods = ["GET", "POST"]
    return [
        Route("/emqx/authn", emqx_endpoint(authenticate), methods=methods, max_body_size=ROUTE_BODY_CEILING),
        Route("/emqx/authz", emqx_endpoint(authorize), methods=methods, max_body_size=ROUTE_BODY_CEILING),
        Route(
            "/emqx/{rest:path}",
            emqx_endpoint(refuse),
            methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            max_body_size=ROUTE_BODY_CEILING,
        ),
    ]


def emqx_endpoint(decide: Decide) -> Callable[[Request], Awaitable[Response]]:
    """The error boundary: whatever goes wrong, the answer is 200 ``{"result": "deny"}``."""

    async def endpoint(request: Request) -> Response:
        try:
            if not broker_peer_allowed(request):
                log.info("emqx %s from %s: not on [serve] broker_networks: deny", request.url.path[:64],
                         request.client.host if request.client else "?")
                decided(request, Result.OUTSIDE_NETWORKS)
                return JSONResponse(DENY)
            answer = await decide(request, await read_params(request))
            decided(request, Result.ALLOW if answer.get("result") == "allow" else Result.DENY)
            return JSONResponse(answer)
        except Exception as exc:  # every failure is a deny: see the module docstring
            log.info("emqx %s: deny on error: %s", request.url.path[:64], str(exc)[:200])
            decided(request, Result.ERROR)
            return JSONResponse(DENY)

    return endpoint


# -- input -----------------------------------------------------------------------------------


def decode_cert_pem(value: object) -> bytes | None:
    """The DER of the certificate EMQX passed in ``cert_pem``, or None when none was presented.

    Raises:
        BadRequest: neither base64 DER nor PEM, or another unrendered placeholder.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest("cert_pem must be text")
    text = value.strip()
    if text in ("", NOT_RENDERED):
        return None
    if text.startswith("-----BEGIN"):
        try:
            return x509.load_pem_x509_certificate(text.encode("ascii")).public_bytes(Encoding.DER)
        except (ValueError, UnicodeEncodeError) as exc:
            raise BadRequest("cert_pem is not a valid PEM certificate") from exc
    if text.startswith("${"):
        raise BadRequest(f"cert_pem is the unrendered placeholder {text[:40]!r}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest("cert_pem is neither base64 DER nor PEM") from exc


async def read_params(request: Request) -> dict[str, Any]:
    """The request's fields: the query string (GET), or the JSON or form body (POST)."""
    if request.method == "GET":
        return _form(request.url.query)
    body = await _read_body(request)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/x-www-form-urlencoded":
        try:
            return _form(body.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise BadRequest("form body is not UTF-8") from exc
    try:
        data = json.loads(body) if body else {}
    except (ValueError, RecursionError) as exc:
        raise BadRequest("body is not valid JSON") from exc
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def _form(text: str) -> dict[str, Any]:
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_FIELDS)
    except ValueError as exc:
        raise BadRequest(f"too many fields: {exc}") from exc
    fields: dict[str, Any] = {}
    for key, value in pairs:
        if key in fields:  # clientid=a&clientid=b: which one would EMQX have meant? Neither.
            raise BadRequest(f"field {key[:20]!r} given twice")
        fields[key] = value
    return fields


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise BadRequest(f"body larger than {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise BadRequest(f"body larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# -- output ----------------------------------------------------------------------------------


def _deny(what: str, client_id: object, reason: str) -> dict[str, Any]:
    log.info("emqx %s %s: deny (%s)", what, str(client_id)[:64], reason)
    return dict(DENY)


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """Configuration mistakes are logged once per process, not once per connect."""
    if key not in _warned and len(_warned) < 1000:
        _warned.add(key)
        log.warning(message)

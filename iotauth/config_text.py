"""The commented ``iotauth.toml`` that ``iotauth init`` writes: every setting, its default, and why.

Kept apart from :mod:`iotauth.config` (which parses the file) because it is a document more than code.
"""

from __future__ import annotations


def default_config_text(trust_domain: str, *, rabbitmq: bool = False) -> str:
    """The commented ``iotauth.toml`` that ``iotauth init`` writes (``rabbitmq``: with ``[rabbitmq]`` enabled)."""
    return f'''# iotauth configuration. See README.md, "Configuration reference".
trust_domain = "{trust_domain}"

[ca]
# Where the CA keys live: file:PATH (relative to this home) or an RFC 7512 pkcs11: URI;
# root_key_uri = "offline" after 'init --offline-root'. A token's PIN comes from
# $IOTAUTH_PKCS11_PIN or the URI's pin-source=FILE, never from this file.
issuing_key_uri = "file:ca/issuing.key"
root_key_uri = "file:ca/root.key"
# The PKCS#11 module for pkcs11: URIs without ?module-path=...
# pkcs11_module = "/usr/lib/softhsm/libsofthsm2.so"

[crl]
# How long a published CRL stays valid (nextUpdate). Republish before it lapses.
next_update_hours = 24
# Optional URL written into each device certificate's CRL distribution point.
# distribution_url = "http://pki.example.com/crl.der"

[ocsp]
# Optional OCSP responder URL written into each device certificate's AIA.
# url = "http://pki.example.com/ocsp"

[provisioning]
# Pending certificates whose delivery never reached COMMIT are revoked after this.
pending_ttl_minutes = 60
# Device ids assigned by the station; {{hardware_id}} and {{model}} are available, each
# optionally through filters: |safe maps ':' to '-' (MAC addresses) and refuses any other
# character a device id cannot hold; |mac turns aa:bb:cc:dd:ee:ff into aabbccddeeff;
# |lower and |upper change case. Device ids are at most 64 characters.
id_template = "sensor-{{hardware_id|safe}}"

[broker]
# Written to devices by the station (PUT_CONFIG).
host = "localhost"
port = 8883

[broker.limits]
# Before authentication: what anyone on the network can make 'iotauth broker' hold.
max_pending = 4096               # connections in the TLS handshake or waiting for CONNECT, in total
max_pending_per_address = 64     # ... per source address
max_pending_per_network = 256    # ... per /24 (IPv4) or /64 (IPv6)
max_waiting_per_address = 4096   # beyond those, connections wait unread (no TLS work) for their source's turn
max_waiting = 16384              # ... in total (when full, the longest queue gives way to a shorter one)
wait_timeout = 30.0              # seconds a connection may wait for its turn
failures_per_second = 20.0       # new connections per address that never authenticate (refunded on success)
failure_burst = 200
handshake_timeout = 10.0         # seconds; both deadlines shrink to min_timeout as the pending total fills up
connect_timeout = 10.0
min_timeout = 1.0
max_connect_bytes = 65536
# After authentication, per session (override any of these in [profiles.NAME.limits]).
max_packet_size = 262144         # bytes, fixed header included
max_subscriptions = 100
max_filters_per_subscribe = 16
max_inflight = 32                # unacknowledged QoS 1/2 messages in each direction
max_queued = 1000                # QoS 1/2 messages kept for a persistent session while it is offline
max_queued_bytes = 4194304
max_retained = 100               # retained messages a device may own

[serve]
# 'iotauth serve' (HTTP: EMQX / mosquitto-go-auth authorizer, CRL, OCSP, admin API).
bind = "127.0.0.1:8443"
# SHA-256 of admin API tokens ('iotauth serve token' makes one). No token, no admin API.
admin_token_sha256 = []
# Broker-facing endpoints answer only these networks ([] answers nobody).
broker_networks = ["127.0.0.0/8", "::1/128"]
# Who may read /metrics (Prometheus) ([] answers nobody).
metrics_networks = ["127.0.0.0/8", "::1/128"]
# Behind a reverse proxy: the proxies' addresses. Only their X-Forwarded-For is believed.
trusted_proxies = []

[rabbitmq]
# Devices connect to a RabbitMQ cluster authorised by 'iotauth serve' ('iotauth export rabbitmq').
# Enabling it refuses '.' in device ids: RabbitMQ reads it as a topic level break.
enabled = {"true" if rabbitmq else "false"}
# Management API of the nodes revoked devices are kicked through (any one that answers).
# management_urls = ["http://rabbit-1:15672", "http://rabbit-2:15672", "http://rabbit-3:15672"]

[rotation]
# How 'iotauth renewer' judges renewal requests over MQTT (see the README, "Certificate rotation").
max_clock_skew_seconds = 600     # a request's timestamp may be this far from the renewer's clock
max_renewals_per_hour = 3        # new certificates per device and hour (resending a pending one is free)
max_requests_per_minute = 30     # per device; beyond it requests are refused unread
renewer_id = "iotauth-renewer"   # the renewer's own identity (certificate device id and MQTT client id)

[emqx]
# /emqx/authn refuses a CONNECT for which EMQX passed no certificate (empty or literal "${{cert_pem}}").
# false: decide per device instead, only while every unexpired certificate of the device is active.
require_certificate = true
# Optional revocation push through the EMQX REST API: ban, node cache reset, kick (see the README).
# base_url = "http://emqx:18083"
# api_key = "iotauth"
# The API secret is read from this environment variable, never from this file.
api_secret_env = "IOTAUTH_EMQX_API_SECRET"
ban = true
reset_node_cache = true

# Profiles: key policy, validity and topic rights. Templates may use {{device_id}}
# and {{profile}}; everything not allowed here is denied.
[profiles.default]
validity_days = 365
key_types = ["p256", "p384"]
# Devices may renew over MQTT ('iotauth renewer') once this fraction of the validity has passed
# (0: any time); 'iotauth rotate' opens it early for the devices it names.
renew_after = 0.66
publish = ["devices/{{device_id}}/telemetry/#", "devices/{{device_id}}/state",
           "devices/{{device_id}}/rotation/request"]
subscribe = ["devices/{{device_id}}/commands/#", "devices/{{device_id}}/rotation/response"]

# The renewal service 'iotauth renewer' (built in; set [profiles.renewer] to change it) reads
# devices/+/rotation/request and answers on devices/+/rotation/response and devices/+/commands/rotate.

# A back-end service that reads every device's telemetry and sends commands.
[profiles.ingest]
validity_days = 90
key_types = ["p256", "p384"]
publish = ["devices/+/commands/#"]
subscribe = ["devices/+/telemetry/#", "devices/+/state"]

[profiles.ingest.limits]
max_subscriptions = 1000
'''

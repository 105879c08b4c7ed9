#!/bin/sh
# Install the Debian packages the test suite uses (real brokers and clients, not mocks).
# Idempotent: does nothing when everything is already present.
set -eu

missing=""
command -v mosquitto_pub >/dev/null 2>&1 || missing="$missing mosquitto-clients"
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || missing="$missing mosquitto"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
# tests/upstream applies docs/upstream/*.patch to a copy of amqtt (patch is not in every minimal image).
command -v patch >/dev/null 2>&1 || missing="$missing patch"
# nginx's DAV module stores the audit anchors that 'iotauth audit anchor' PUTs to a URL.
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing="$missing nginx-light"
# Real device stacks: the suite compiles firmware_tools/mbedtls/keygen_csr.c against mbedTLS 2.28.
command -v cc >/dev/null 2>&1 || missing="$missing gcc libc6-dev"
[ -f /usr/include/mbedtls/x509_csr.h ] || missing="$missing libmbedtls-dev"
# The registry suite runs against a real PostgreSQL server started by the tests themselves.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"
# CA keys on a PKCS#11 token: the suite initialises its own SoftHSM2 tokens (a real PKCS#11 module).
[ -e /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null 2>&1 || missing="$missing softhsm2"
# The RabbitMQ suite starts its own 3-node cluster (private epmd, ports and data in a temp dir), so a
# packaged rabbitmq service that apt may start on a systemd host does not get in its way.
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing="$missing rabbitmq-server"
# The metrics suite scrapes a running broker and 'iotauth serve' with Debian's real Prometheus (and promtool
# checks docker/prometheus.yml); the tests start it themselves on loopback, never the packaged service.
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
if [ -n "${IOTAUTH_EXTRA_DEB:-}" ]; then missing="$missing $IOTAUTH_EXTRA_DEB"; fi

if [ -z "$missing" ]; then
    echo "system packages: all present"
    exit 0
fi

echo "system packages: installing$missing"
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "error: need root (or sudo) to install:$missing" >&2
    echo "       install them yourself, e.g.: apt-get install -y$missing" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >/dev/null
# shellcheck disable=SC2086
$SUDO apt-get install -y -q --no-install-recommends $missing >/dev/null
echo "system packages: installed$missing"

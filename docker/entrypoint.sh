#!/bin/sh
# Initialise the home volume on first start (never overwrites an existing CA), then run iotauth.
#   IOTAUTH_METRICS_NETWORKS  comma-separated networks added to [serve] metrics_networks at that first start
#                             (who may read 'iotauth serve' /metrics besides loopback; Prometheus's network)
#   IOTAUTH_PUBLIC_DIR        a directory that gets a copy of the public CA chain (ca/chain.pem) at every start,
#                             for scrapers and clients that must verify iotauth's TLS (the home itself is 0700)
set -eu
if [ ! -f "$IOTAUTH_HOME/iotauth.toml" ]; then
    iotauth init --trust-domain "${IOTAUTH_TRUST_DOMAIN:-iotauth.local}" \
        --server-name "${IOTAUTH_SERVER_NAME:-localhost}" --server-name 127.0.0.1
    if [ -n "${IOTAUTH_METRICS_NETWORKS:-}" ]; then
        # Only address characters pass (no quote can reach the TOML); iotauth itself checks each network.
        extra=$(printf '%s' "$IOTAUTH_METRICS_NETWORKS" | sed 's/[^0-9A-Fa-f.:\/,]//g; s/,/", "/g')
        sed -i "s|^metrics_networks = \[\(.*\)\]\$|metrics_networks = [\1, \"$extra\"]|" "$IOTAUTH_HOME/iotauth.toml"
    fi
fi
if [ -n "${IOTAUTH_PUBLIC_DIR:-}" ] && [ -d "$IOTAUTH_PUBLIC_DIR" ]; then
    cp "$IOTAUTH_HOME/ca/chain.pem" "$IOTAUTH_PUBLIC_DIR/chain.pem.tmp"
    mv "$IOTAUTH_PUBLIC_DIR/chain.pem.tmp" "$IOTAUTH_PUBLIC_DIR/chain.pem"
fi
exec iotauth "$@"

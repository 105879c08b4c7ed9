#!/bin/sh
# Initialise the home volume on first start (never overwrites an existing CA), then run iotauth.
set -eu
if [ ! -f "$IOTAUTH_HOME/iotauth.toml" ]; then
    iotauth init --trust-domain "${IOTAUTH_TRUST_DOMAIN:-iotauth.local}" \
        --server-name "${IOTAUTH_SERVER_NAME:-localhost}" --server-name 127.0.0.1
fi
exec iotauth "$@"

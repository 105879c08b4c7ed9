"""Revoke a compromised device from your own tooling, through iotauth's library API.

    python examples/operator_revoke.py sensor-0001 --reason key-compromise [--home DIR]

What happens, in order:
1. the registry marks the device and every certificate it holds revoked (one
   durable transaction, recorded in the hash-chained audit log);
2. every running iotauth broker sees the change on the registry's change feed
   and drops the device's live session; reconnects are refused;
3. a fresh CRL is published to <home>/ca/crl.pem for other relying parties
   (this step needs the CA key; with an encrypted CA, set IOTAUTH_CA_PASSPHRASE).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from iotauth.authority import open_authority, operator_actor
from iotauth.config import Home, registry_location
from iotauth.errors import IotAuthError
from iotauth.registry import RevocationReason, open_registry


async def revoke(home: Home, device_id: str, reason: RevocationReason) -> int:
    async with await open_registry(registry_location(home)) as registry:
        # signing_optional: revoking never needs the CA key; only the CRL does.
        authority = await open_authority(home, registry, signing_optional=True)
        done = await authority.revoke_device(device_id, reason, actor=f"example:{operator_actor()}", publish_to=home)
    print(f"revoked {device_id}: {len(done.certificates)} certificate(s) {[c.serial for c in done.certificates]}")
    if done.crl is not None and done.crl.published is not None:
        published = done.crl.published
        print(f"CRL #{published.number} ({published.entries} entries) -> {done.crl.path}")
    elif done.crl is not None:
        print(f"CRL not refreshed: {done.crl.error}", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Revoke a device through the iotauth library.")
    parser.add_argument("device_id")
    parser.add_argument("--reason", default="key-compromise", choices=[r.value for r in RevocationReason])
    parser.add_argument("--home", help="iotauth home (default: $IOTAUTH_HOME or ~/.local/share/iotauth)")
    args = parser.parse_args()
    try:
        return asyncio.run(revoke(Home.resolve(args.home), args.device_id, RevocationReason(args.reason)))
    except IotAuthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

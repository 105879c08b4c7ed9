"""The iotauth MQTT broker: an mTLS gate, identity-scoped topic ACLs, live revocation, its own MQTT engine.

* :class:`Broker` -- ``iotauth broker``: the gate in front of iotauth's engine;
* :func:`serve` -- run a :class:`Broker` until SIGINT/SIGTERM, reloading policies on SIGHUP;
* :class:`IotAuthBroker`, :class:`IotAuthPlugin` -- amqtt as the host behind the same gate,
  for amqtt configurations (``iotauth.broker.IotAuthPlugin`` in amqtt's ``plugins`` table).
  Imported on first use, so the native broker never loads amqtt.

Design notes live in the module docstrings: :mod:`iotauth.broker.gate` (why
iotauth terminates TLS itself), :mod:`iotauth.broker.throttle` (admission
control before authentication), :mod:`iotauth.broker.guard` (revocation,
expiry, fail closed), :mod:`iotauth.broker.core.engine` (sessions and
delivery), :mod:`iotauth.broker.audit` (what is written to the audit log, and
when) and :mod:`iotauth.broker.amqtt_host` (the wall around amqtt).
"""

from __future__ import annotations

from typing import Any

from iotauth.broker.binding import Admission, Binding, Denial, GuardOptions
from iotauth.broker.guard import Guard
from iotauth.broker.runtime import BrokerOptions
from iotauth.broker.server import Broker, Started, serve

_AMQTT = frozenset({"IotAuthBroker", "IotAuthPlugin", "broker_config"})


def __getattr__(name: str) -> Any:
    if name in _AMQTT:
        from iotauth.broker import amqtt_host

        return getattr(amqtt_host, name)
    raise AttributeError(f"module 'iotauth.broker' has no attribute {name!r}")


__all__ = [
    "Admission",
    "Binding",
    "Broker",
    "BrokerOptions",
    "Denial",
    "Guard",
    "GuardOptions",
    "IotAuthBroker",
    "IotAuthPlugin",
    "Started",
    "broker_config",
    "serve",
]

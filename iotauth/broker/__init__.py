"""The iotauth MQTT broker: amqtt behind an mTLS gate, identity-scoped topic ACLs, live revocation.

* :class:`IotAuthBroker` -- use it where you would use ``amqtt.broker.Broker``;
* :class:`IotAuthPlugin` -- load it in amqtt's ``plugins`` table (``iotauth.broker.IotAuthPlugin``);
* :func:`broker_config` -- the amqtt config ``iotauth broker`` runs;
* :func:`serve` -- run a broker until SIGINT/SIGTERM, reloading policies on SIGHUP.

Design notes live in the module docstrings: :mod:`iotauth.broker.gate` (why
iotauth terminates TLS itself), :mod:`iotauth.broker.server` (what is changed in
amqtt), :mod:`iotauth.broker.guard` (how admission, live revocation and expiry
fit together), :mod:`iotauth.broker.admission` (the decision and its caches),
:mod:`iotauth.broker.feed` (the change feed, fail closed) and
:mod:`iotauth.broker.audit` (what is written to the audit log, and when).
"""

from iotauth.broker.binding import Admission, Binding, Denial, GuardOptions
from iotauth.broker.guard import Guard
from iotauth.broker.plugin import IotAuthPlugin
from iotauth.broker.server import IotAuthBroker, Started, broker_config, serve

__all__ = [
    "Admission",
    "Binding",
    "Denial",
    "Guard",
    "GuardOptions",
    "IotAuthBroker",
    "IotAuthPlugin",
    "Started",
    "broker_config",
    "serve",
]

"""The reference device agent for certificate rotation over MQTT (PROTOCOL.md part 2).

    python -m firmware_tools.agent --state DIR renew     # renew once: exit 0, or non-zero with the reason
    python -m firmware_tools.agent --state DIR run       # stay connected; renew when ordered or when due
    python -m firmware_tools.agent --state DIR status    # what the state directory holds (JSON)

``DIR`` is the device's state directory as the emulator and the station leave
it: ``key.pem``, ``cert.pem``, ``chain.pem``, ``fullchain.pem``, ``ca.pem`` and
``config.json`` (device id, broker host and port). The agent keeps the old key
and certificate until the new ones have worked, in a journal whose every
write is atomic (temporary file, fsync, rename, fsync of the directory):

``rotation.json`` state   files that exist besides the live ones
``keyed``                 ``next-key.pem`` (the new key, never sent anywhere)
``requested``             + the request's id and time (a retry sends a new request for the same key)
``issued``                + ``next-cert.pem``, ``next-chain.pem``, ``next-fullchain.pem``
``confirmed``             the confirmation (signed by the new key) was sent
``activated``             the renewer answered ``activated``: the new certificate is the device's current one
``switched``              the new certificate works and is active: live files replaced by the new ones
                          (the old kept as ``previous-*`` until the replacement is complete)

Killed at any point and restarted, it resumes from the journal. It promotes
the new files only once it *knows* the renewal is active: the renewer
answered ``activated`` (to a confirmation sent over the old session or over
the new one), or the new certificate is accepted while the old one is refused
as revoked. A CONNACK 0 alone proves nothing: ``iotauth broker`` activates a
renewal when it first authenticates, but a broker that only reads the CRL
(Mosquitto, RabbitMQ) accepts a pending renewal for as long as the CRL it
loaded does not list it yet. Until then the agent connects with the old
certificate, which stays valid until the renewal is activated.

The package, along its seams:

* :mod:`~firmware_tools.agent.journal` -- the state directory, its atomic files and the journal;
* :mod:`~firmware_tools.agent.session` -- one paho-mqtt session over TLS and how a connect ended;
* :mod:`~firmware_tools.agent.rotation` -- the exchange with the renewer (:class:`Agent`);
* :mod:`~firmware_tools.agent.cli` -- ``run`` (stay connected, renew when ordered or due), ``status`` and ``main``.

The broker address comes from ``config.json``; reconnects follow the
reference backoff (:mod:`firmware_tools.backoff`). Real firmware implements
the same journal with its own MQTT stack; the messages are
:mod:`iotauth.rotation.messages`, byte for byte.
"""

from firmware_tools.agent.cli import due_at, main, ordered, run_forever, status
from firmware_tools.agent.journal import (
    CRASH_POINTS,
    EXIT_REFUSED,
    EXIT_STATE,
    EXIT_UNREACHABLE,
    AgentError,
    Identity,
    StateDir,
)
from firmware_tools.agent.rotation import Agent
from firmware_tools.agent.session import TLS_REFUSED, Session

__all__ = ["CRASH_POINTS", "EXIT_REFUSED", "EXIT_STATE", "EXIT_UNREACHABLE", "TLS_REFUSED", "Agent", "AgentError",
           "Identity", "Session", "StateDir", "due_at", "main", "ordered", "run_forever", "status"]

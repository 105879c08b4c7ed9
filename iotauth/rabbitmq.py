"""What iotauth's RabbitMQ integration agrees on: names, topic translation and the management identity.

The HTTP auth backend endpoints (:mod:`iotauth.http.rabbitmq`), the exported
configuration and the revocation follower (:mod:`iotauth.export.rabbitmq`)
all use these, so they cannot drift apart. Behaviour cited from RabbitMQ
3.10.8 (``rabbitmq/rabbitmq-server`` at tag ``v3.10.8``):

* **Topics.** The MQTT plugin turns a topic into an AMQP routing key with
  ``/`` -> ``.`` and ``+`` -> ``*`` and back with ``*`` -> ``+`` and ``.`` ->
  ``/`` (``deps/rabbitmq_mqtt/src/rabbit_mqtt_util.erl``, ``to_amqp/1`` and
  ``to_mqtt/1``); ``#`` stays. Topic permissions are asked about the routing
  key (``rabbit_mqtt_processor:check_topic_access/3``), and messages are
  routed and delivered by it. So what a device really publishes is
  :func:`mqtt_topic` of the routing key, and that is what iotauth's policy
  decides on: never wider than the policy, and exactly the policy for topics
  without ``.`` and ``*`` (property-tested against :mod:`iotauth.policy`).
* **Queues.** A subscription lives in ``mqtt-subscription-<client id>qos0``
  or ``qos1`` (``rabbit_mqtt_util:subcription_queue_name/1``), bound to the
  ``amq.topic`` exchange (``mqtt.exchange``).
* **The management identity.** iotauth kicks revoked devices through the
  management API, which authenticates through the same HTTP backend (only
  ``http`` is configured: with RabbitMQ's ``internal`` backend anywhere in
  the chain, a device certificate whose CN equals an internal user's name
  logs in as that user without a password). Its name, :data:`ADMIN_USER`,
  is outside the device id alphabet, so no device certificate can carry it;
  its password is a random secret only iotauth knows (RabbitMQ never stores
  it): ``$IOTAUTH_RABBITMQ_ADMIN_SECRET``, else the home's
  ``rabbitmq/admin.secret`` (0600), created by ``iotauth export rabbitmq``.
"""

from __future__ import annotations

import os
import secrets

from iotauth.config import Home, RabbitmqSettings
from iotauth.errors import PkiError
from iotauth.files import write_secret
from iotauth.policy import Action

ADMIN_USER = "iotauth@admin"
VHOST = "/"
EXCHANGE = "amq.topic"
PLUGINS = ("rabbitmq_management", "rabbitmq_mqtt", "rabbitmq_auth_backend_http")
_SUBSCRIPTION_QUEUE = "mqtt-subscription-{client_id}qos{qos}"
# A topic check's permission: 'write' for PUBLISH (and the will), 'read' for SUBSCRIBE (rabbit_mqtt_processor).
TOPIC_ACTIONS = {"write": Action.PUBLISH, "read": Action.SUBSCRIBE}


def subscription_queues(client_id: str) -> frozenset[str]:
    """The two queues the MQTT plugin keeps a client's subscriptions in (QoS 0 and QoS 1)."""
    return frozenset(_SUBSCRIPTION_QUEUE.format(client_id=client_id, qos=qos) for qos in (0, 1))


def routing_key(topic: str) -> str:
    """An MQTT topic or filter as RabbitMQ's MQTT plugin turns it into a routing or binding key."""
    return topic.replace("/", ".").replace("+", "*")


def mqtt_topic(key: str) -> str | None:
    """The MQTT topic (or filter) a routing (or binding) key stands for, or ``None`` if MQTT cannot have made it.

    ``/`` and ``+`` never survive the plugin's translation, so a key holding
    one came from somewhere else (an AMQP client) and has no MQTT meaning.
    """
    if "/" in key or "+" in key:
        return None
    return key.replace("*", "+").replace(".", "/")


def topic_request(permission: str, key: str) -> tuple[Action, str] | None:
    """What a topic check asks of iotauth's policy: (PUBLISH, topic) or (SUBSCRIBE, filter); ``None``: refuse."""
    action = TOPIC_ACTIONS.get(permission)
    topic = mqtt_topic(key)
    return None if action is None or topic is None else (action, topic)


def admin_secret(home: Home, settings: RabbitmqSettings) -> str | None:
    """The management identity's password: the environment variable, else the home's secret file."""
    from_env = os.environ.get(settings.admin_secret_env, "").strip()
    if from_env:
        return from_env
    try:
        return home.rabbitmq_admin_secret.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PkiError(f"cannot read {home.rabbitmq_admin_secret}: {exc.strerror}") from exc


def ensure_admin_secret(home: Home, settings: RabbitmqSettings) -> str:
    """The management password, created (256 random bits, mode 0600) the first time it is needed."""
    existing = admin_secret(home, settings)
    if existing is not None:
        return existing
    value = secrets.token_urlsafe(32)
    write_secret(home.rabbitmq_admin_secret, value.encode())
    return value

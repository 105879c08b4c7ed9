"""Mosquitto's dynamic-security state as the registry wants it, and the commands that get it there.

Pure values and plans: no I/O, no MQTT. Everything here follows what
Mosquitto 2.0.11's ``mosquitto_dynamic_security.so`` was measured to do
(``/work/notes/mosquitto_dynsec.md`` in the project history; the upstream
source is cited where it decides):

* **One role per device.** 2.0.11 ACLs have no ``%u`` substitution, so a
  device's topic rules are rendered for it, from the same policy engine the
  iotauth broker uses. The role is named ``dev:<device id>:<8 hex of its
  ACLs>``, so a profile change is *create the new role, point the client at
  it, delete the old one*: one kick of that device only, where editing a
  shared role would kick every holder.
* **Clients** are named by the device id, which Mosquitto takes from the
  certificate CN (``use_identity_as_username``). They have no password, so the
  password path can never log a device in, and no ``clientid``
  (``use_username_as_clientid`` binds it).
* **Never** ``createClient`` with ``roles``: that path links client to role
  but not role to client (``clients.c`` -> ``rolelist.c``), so later role
  changes do not kick and ``deleteRole`` leaves a dangling pointer that
  crashed the broker. Clients are created bare, then ``addClientRole``.
* **Reserved names contain ':'**, outside the device-id alphabet, so no device
  certificate can ever carry the admin's (or the marker's) name as its CN.
* A disabled client keeps its roles' rights when it reconnects (``disabled``
  is only checked on the password path), so a device that must lose access
  is *deleted*; disabling it first only makes the kick happen before the
  (slow) save of the state file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from iotauth.errors import InvalidIdentity, PolicyDenied
from iotauth.policy import Action, PolicySet, SessionPolicy
from iotauth.registry import Device, DeviceStatus

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
RESERVED_PREFIX = "iotauth:"
ADMIN_USERNAME = "iotauth:follower"
MARKER_USERNAME = "iotauth:state"  # textdescription: the registry event id the state was last reconciled to
ADMIN_ROLE = "iotauth:admin"
ROLE_PREFIX = "dev:"
PASSWORD_ITERATIONS = 10_000
SALT_BYTES, HASH_BYTES = 12, 64  # dynsec silently skips a client whose salt or hash has any other length

Acl = tuple[str, str, bool, int]
"""(acltype, topic, allow, priority): one dynamic-security ACL entry, comparable."""

DEFAULT_ACL_TYPES = ("publishClientSend", "publishClientReceive", "subscribe", "unsubscribe")

ADMIN_ACLS: tuple[Acl, ...] = (  # narrower than mosquitto_ctrl's admin role, which may read '#'
    ("publishClientSend", CONTROL_TOPIC, True, 0),
    ("subscribeLiteral", RESPONSE_TOPIC, True, 0),
    ("publishClientReceive", RESPONSE_TOPIC, True, 0),
    ("subscribePattern", "$SYS/broker/#", True, 0),
    ("publishClientReceive", "$SYS/broker/#", True, 0),
    ("unsubscribePattern", "#", True, 0),
)

Command = dict[str, Any]


def acl_json(acls: Iterable[Acl]) -> list[dict[str, Any]]:
    return [{"acltype": t, "topic": topic, "allow": allow, "priority": p} for t, topic, allow, p in acls]


def acls_for(policy: SessionPolicy) -> tuple[Acl, ...]:
    """A device's compiled rules as dynamic-security ACLs; everything else stays denied by default.

    Publish rules allow sending; subscribe rules allow subscribing to any
    filter the rule covers (``subscribePattern`` has iotauth's coverage
    semantics: a wider filter is refused with SUBACK 0x80), receiving what
    matches, and unsubscribing again.
    """
    acls: list[Acl] = []
    for rule in policy.rules():
        if rule.action is Action.PUBLISH:
            acls.append(("publishClientSend", rule.topic_filter, True, 0))
        else:
            acls += [
                ("subscribePattern", rule.topic_filter, True, 0),
                ("publishClientReceive", rule.topic_filter, True, 0),
                ("unsubscribePattern", rule.topic_filter, True, 0),
            ]
    return tuple(acls)


@dataclass(frozen=True)
class DeviceRole:
    """The role (and client) one active device should have in Mosquitto."""

    device_id: str
    acls: tuple[Acl, ...]

    @property
    def rolename(self) -> str:
        digest = hashlib.sha256(json.dumps(sorted(self.acls)).encode()).hexdigest()[:8]
        return f"{ROLE_PREFIX}{self.device_id}:{digest}"


def desired_roles(devices: Iterable[Device], policies: PolicySet) -> dict[str, DeviceRole]:
    """The role of every *active* device whose profile is configured (an unknown profile gets nothing)."""
    wanted: dict[str, DeviceRole] = {}
    for device in devices:
        role = desired_role(device, policies)
        if role is not None:
            wanted[device.device_id] = role
    return wanted


def desired_role(device: Device, policies: PolicySet) -> DeviceRole | None:
    """The role ``device`` should have, or None: it must not be in Mosquitto at all (fail closed)."""
    if device.status is not DeviceStatus.ACTIVE:
        return None
    try:
        return DeviceRole(device.device_id, acls_for(policies.bind(device.profile, device.device_id)))
    except (PolicyDenied, InvalidIdentity):
        return None


def owner_of_role(rolename: str) -> str | None:
    """The device id in a ``dev:<id>:<hash>`` role name, or None for any other role."""
    if not rolename.startswith(ROLE_PREFIX):
        return None
    device_id, _, digest = rolename[len(ROLE_PREFIX) :].rpartition(":")
    return device_id or None if digest else None


# -- what Mosquitto holds -------------------------------------------------------------------


@dataclass(frozen=True)
class ClientState:
    """A dynamic-security client as ``getClient``/``listClients`` (verbose) report it."""

    username: str
    roles: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    disabled: bool = False
    textdescription: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClientState:
        return cls(
            username=str(data["username"]),
            roles=tuple(sorted(str(r["rolename"]) for r in data.get("roles") or ())),
            groups=tuple(sorted(str(g["groupname"]) for g in data.get("groups") or ())),
            disabled=bool(data.get("disabled", False)),
            textdescription=data.get("textdescription"),
        )


@dataclass(frozen=True)
class RoleState:
    """A dynamic-security role as ``getRole``/``listRoles`` (verbose) report it."""

    rolename: str
    acls: frozenset[Acl]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoleState:
        return cls(
            str(data["rolename"]),
            frozenset(
                (str(a["acltype"]), str(a["topic"]), bool(a.get("allow", False)), int(a.get("priority", 0)))
                for a in data.get("acls") or ()
            ),
        )


# -- plans ----------------------------------------------------------------------------------


@dataclass
class Plan:
    """What to send, in three phases.

    ``withdraw`` (device ids to kick and delete) runs only *after* a new CRL
    is proven loaded, so a kicked device cannot get back in through the old
    one. ``grant_groups`` (per device: its role, then its client) follow, in
    small messages that urgent revocations may overtake; a device the new CRL
    already lets in before its client exists has no rights, and is kicked into
    them by ``addClientRole``/``modifyClient``. ``cleanup`` (stale roles) runs last.
    """

    grant_groups: list[tuple[str, list[Command]]] = field(default_factory=list)
    withdraw: list[str] = field(default_factory=list)
    existing: set[str] = field(default_factory=set)
    cleanup: list[Command] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    repaired_roles: list[str] = field(default_factory=list)

    @property
    def grants(self) -> list[Command]:
        return [command for _, commands in self.grant_groups for command in commands]

    @property
    def commands(self) -> int:
        return len(self.grants) + len(withdrawal_commands(self.withdraw, self.existing)) + len(self.cleanup)


def plan(
    desired: Mapping[str, DeviceRole],
    clients: Mapping[str, ClientState],
    roles: Mapping[str, RoleState],
    *,
    scope: Iterable[str] | None = None,
    kick_missing: Iterable[str] = (),
) -> Plan:
    """The commands that turn ``clients``/``roles`` into ``desired``.

    Args:
        desired: device id -> role, for the devices that must be in Mosquitto.
        clients, roles: what Mosquitto holds (all of it, or at least every
            client and role named in ``scope``).
        scope: only these device ids (an event batch); None: everything (a
            reconcile), which also withdraws every client nobody asked for.
            Reserved (``iotauth:``) clients are left to :func:`reserved_repairs`.
        kick_missing: devices to withdraw even if they have no client (their
            status just changed: a session may exist without one).
    """
    result = Plan()
    names = set(scope) if scope is not None else set(desired) | set(clients)
    must_kick = set(kick_missing)
    wanted_roles: set[str] = set()
    for name in sorted(names):
        if name.startswith(RESERVED_PREFIX):
            continue
        current = clients.get(name)
        role = desired.get(name)
        if role is None:
            if current is not None or name in must_kick:
                result.withdraw.append(name)
                if current is not None:
                    result.existing.add(name)
            continue
        rolename = role.rolename
        wanted_roles.add(rolename)
        have_role = roles.get(rolename)
        commands: list[Command] = []
        repaired = False
        if have_role is None:
            commands.append({"command": "createRole", "rolename": rolename, "acls": acl_json(role.acls)})
        elif have_role.acls != frozenset(role.acls):  # edited behind our back: rebuild (kicks its holder)
            commands += [
                {"command": "deleteRole", "rolename": rolename},
                {"command": "createRole", "rolename": rolename, "acls": acl_json(role.acls)},
            ]
            result.repaired_roles.append(rolename)
            repaired = True
        if current is None:
            commands += [
                {"command": "createClient", "username": name},
                {"command": "addClientRole", "username": name, "rolename": rolename},
            ]
            result.created.append(name)
        elif current.roles != (rolename,) or current.groups or current.disabled:
            if current.disabled:
                commands.append({"command": "enableClient", "username": name})
            commands.append({"command": "modifyClient", "username": name, "roles": [{"rolename": rolename}],
                             "groups": []})
            result.changed.append(name)
        elif repaired:
            commands.append({"command": "addClientRole", "username": name, "rolename": rolename})
        if commands:
            result.grant_groups.append((name, commands))
    stale = {r for r in roles if owner_of_role(r) is not None and r not in wanted_roles}
    if scope is not None:  # only the roles of devices in scope
        stale = {r for r in stale if owner_of_role(r) in names}
    result.cleanup = [{"command": "deleteRole", "rolename": r} for r in sorted(stale)]
    return result


def withdrawal_commands(usernames: Sequence[str], existing: set[str]) -> list[Command]:
    """Kick every session of ``usernames`` and leave no client behind: all kicks first.

    ``disableClient`` kicks before it saves (0.5 ms at 10k clients) where
    ``deleteClient`` saves first (75 ms). A name with no client is created for
    a moment, because ``disableClient`` on a missing client kicks nobody,
    and a session may exist without one (connected in a gap, with no rights).
    """
    creates = [{"command": "createClient", "username": u} for u in usernames if u not in existing]
    disables = [{"command": "disableClient", "username": u} for u in usernames]
    deletes = [{"command": "deleteClient", "username": u} for u in usernames]
    return creates + disables + deletes


def kick_commands(usernames: Sequence[str]) -> list[Command]:
    """Drop the live sessions of clients that keep their rights (a superseded certificate): they reconnect."""
    return [{"command": "disableClient", "username": u} for u in usernames] + [
        {"command": "enableClient", "username": u} for u in usernames
    ]


def reserved_repairs(
    clients: Mapping[str, ClientState], roles: Mapping[str, RoleState], default_access: Mapping[str, bool]
) -> tuple[list[Command], list[str]]:
    """Commands that restore iotauth's own entries, and reserved-looking clients to withdraw.

    The admin role and client keep exactly their rights, and every default ACL
    access stays *deny*. Any other ``iotauth:`` client than the admin and the
    marker was not made by iotauth and is withdrawn.
    """
    commands: list[Command] = []
    admin_role = roles.get(ADMIN_ROLE)
    if admin_role is None:
        commands.append({"command": "createRole", "rolename": ADMIN_ROLE, "acls": acl_json(ADMIN_ACLS)})
    elif admin_role.acls != frozenset(ADMIN_ACLS):
        commands += [{"command": "deleteRole", "rolename": ADMIN_ROLE},
                     {"command": "createRole", "rolename": ADMIN_ROLE, "acls": acl_json(ADMIN_ACLS)}]
    admin = clients.get(ADMIN_USERNAME)
    if admin is not None and (admin.roles != (ADMIN_ROLE,) or admin.groups or commands):
        commands.append({"command": "modifyClient", "username": ADMIN_USERNAME,
                         "roles": [{"rolename": ADMIN_ROLE}], "groups": []})
    if any(default_access.get(kind, True) for kind in DEFAULT_ACL_TYPES):
        commands.append({"command": "setDefaultACLAccess",
                         "acls": [{"acltype": kind, "allow": False} for kind in DEFAULT_ACL_TYPES]})
    strangers = sorted(
        name for name in clients
        if name.startswith(RESERVED_PREFIX) and name not in (ADMIN_USERNAME, MARKER_USERNAME)
    )
    return commands, strangers


def marker_command(clients: Mapping[str, ClientState], generation: str) -> Command | None:
    """Record ``generation`` (the event id the state is in step with) on the marker client, if it differs."""
    marker = clients.get(MARKER_USERNAME)
    if marker is None:
        return {"command": "createClient", "username": MARKER_USERNAME, "textdescription": generation}
    if marker.textdescription != generation or marker.roles or marker.groups:
        return {"command": "modifyClient", "username": MARKER_USERNAME, "textdescription": generation,
                "roles": [], "groups": []}
    return None


# -- the state file (written while Mosquitto is stopped, or before its first start) -------------


def password_entry(
    password: str, *, iterations: int = PASSWORD_ITERATIONS, salt: bytes | None = None
) -> dict[str, Any]:
    """What dynsec stores for a password: PBKDF2-HMAC-SHA512, 64-byte hash, 12-byte salt, base64.

    Computed here so no ``mosquitto_ctrl`` run (or plaintext on a command
    line) is ever needed (``clients.c``: ``dynsec_auth__pw_hash``).
    """
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    return {"password": base64.b64encode(digest).decode(), "salt": base64.b64encode(salt).decode(),
            "iterations": iterations}


def bootstrap_state(admin_password: str, devices: Iterable[DeviceRole], generation: str) -> dict[str, Any]:
    """The whole ``dynamic-security.json``: admin, deny-by-default, one role and client per device, marker.

    Loading 10,000 devices from this file takes Mosquitto 0.13 s; creating
    them through the control API takes minutes (every command rewrites the file).
    """
    clients: list[dict[str, Any]] = [
        {"username": ADMIN_USERNAME, "textname": "iotauth follower", **password_entry(admin_password),
         "roles": [{"rolename": ADMIN_ROLE}]},
        {"username": MARKER_USERNAME, "textdescription": generation, "roles": []},
    ]
    roles: list[dict[str, Any]] = [{"rolename": ADMIN_ROLE, "acls": acl_json(ADMIN_ACLS)}]
    for device in devices:
        roles.append({"rolename": device.rolename, "acls": acl_json(device.acls)})
        clients.append({"username": device.device_id, "roles": [{"rolename": device.rolename}]})
    return {"defaultACLAccess": {kind: False for kind in DEFAULT_ACL_TYPES}, "clients": clients, "groups": [],
            "roles": roles}


def state_problems(document: Mapping[str, Any]) -> list[str]:
    """Why dynsec would load ``document`` other than as written (it skips bad entries silently)."""
    problems: list[str] = []
    roles = [r.get("rolename") for r in document.get("roles", [])]
    if len(roles) != len(set(roles)):
        problems.append("duplicate role names")
    known = set(roles)
    users = [c.get("username") for c in document.get("clients", [])]
    if len(users) != len(set(users)):
        problems.append("duplicate client names")
    for client in document.get("clients", []):
        for role in client.get("roles", []):
            if role.get("rolename") not in known:
                problems.append(f"client {client.get('username')!r} names unknown role {role.get('rolename')!r}")
        if "password" in client:
            try:
                salt = base64.b64decode(client["salt"], validate=True)
                digest = base64.b64decode(client["password"], validate=True)
            except (KeyError, ValueError):
                problems.append(f"client {client.get('username')!r} has a malformed password entry")
                continue
            if len(salt) != SALT_BYTES or len(digest) != HASH_BYTES or int(client.get("iterations", 0)) < 1:
                problems.append(f"client {client.get('username')!r}: salt, hash or iterations out of range")
    if any(document.get("defaultACLAccess", {}).get(kind, False) for kind in DEFAULT_ACL_TYPES):
        problems.append("default ACL access must deny everything")
    return problems

"""The dynamic-security plans, checked without a broker: what gets sent, in which order, and what never does.

The behaviour they rely on (createClient with roles corrupts dynsec, disabled
clients keep their rights, reserved names) is exercised against the real
Mosquitto in test_managed.py.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import replace

import pytest

from iotauth.config import DEFAULT_DEVICE_PROFILE, Profile
from iotauth.export.managed.state import (
    ADMIN_ACLS,
    ADMIN_ROLE,
    ADMIN_USERNAME,
    DEFAULT_ACL_TYPES,
    MARKER_USERNAME,
    ClientState,
    DeviceRole,
    RoleState,
    bootstrap_state,
    desired_role,
    desired_roles,
    marker_command,
    owner_of_role,
    password_entry,
    plan,
    reserved_repairs,
    state_problems,
    withdrawal_commands,
)
from iotauth.policy import PolicySet
from iotauth.registry import Device, DeviceStatus

POLICIES = PolicySet.from_profiles([DEFAULT_DEVICE_PROFILE, Profile("ingest", subscribe=("devices/+/telemetry/#",))])


def device(device_id: str, status: DeviceStatus = DeviceStatus.ACTIVE, profile: str = "default") -> Device:
    return Device(device_id, None, profile, status, "t", "t")


def role(device_id: str, profile: str = "default") -> DeviceRole:
    found = desired_role(device(device_id, profile=profile), POLICIES)
    assert found is not None
    return found


def have(roles: list[DeviceRole]) -> dict[str, RoleState]:
    return {r.rolename: RoleState(r.rolename, frozenset(r.acls)) for r in roles}


def test_a_device_role_holds_exactly_its_profile_rules() -> None:
    acls = set(role("sensor-1").acls)
    assert acls == {
        ("publishClientSend", "devices/sensor-1/telemetry/#", True, 0),
        ("publishClientSend", "devices/sensor-1/state", True, 0),
        ("subscribePattern", "devices/sensor-1/commands/#", True, 0),
        ("publishClientReceive", "devices/sensor-1/commands/#", True, 0),
        ("unsubscribePattern", "devices/sensor-1/commands/#", True, 0),
        ("publishClientSend", "devices/sensor-1/rotation/request", True, 0),
        ("subscribePattern", "devices/sensor-1/rotation/response", True, 0),
        ("publishClientReceive", "devices/sensor-1/rotation/response", True, 0),
        ("unsubscribePattern", "devices/sensor-1/rotation/response", True, 0),
    }
    assert role("sensor-1").rolename.startswith("dev:sensor-1:")
    assert owner_of_role(role("sensor-1").rolename) == "sensor-1"
    assert owner_of_role(ADMIN_ROLE) is None and owner_of_role("dev:nohash") is None
    assert role("sensor-1").rolename != role("sensor-1", "ingest").rolename  # rules are part of the name


def test_only_active_devices_with_a_known_profile_get_a_role() -> None:
    wanted = desired_roles(
        [device("a"), device("b", DeviceStatus.SUSPENDED), device("c", DeviceStatus.PENDING),
         device("d", DeviceStatus.REVOKED), device("e", profile="removed-from-toml")],
        POLICIES,
    )
    assert list(wanted) == ["a"]


def test_a_new_device_gets_a_bare_client_then_its_role() -> None:
    # createClient with "roles" links only one way in 2.0.11 and later crashed the broker: never send it.
    todo = plan({"s1": role("s1")}, {}, {})
    commands = [c["command"] for c in todo.grants]
    assert commands == ["createRole", "createClient", "addClientRole"]
    assert all("roles" not in c for c in todo.grants if c["command"] == "createClient")
    assert todo.created == ["s1"] and not todo.withdraw


def test_a_profile_change_moves_the_client_to_a_new_role_and_deletes_the_old_one() -> None:
    old, new = role("s1"), role("s1", "ingest")
    todo = plan({"s1": new}, {"s1": ClientState("s1", (old.rolename,))}, have([old]))
    assert [c["command"] for c in todo.grants] == ["createRole", "modifyClient"]
    assert todo.grants[1]["roles"] == [{"rolename": new.rolename}] and todo.grants[1]["groups"] == []
    assert todo.cleanup == [{"command": "deleteRole", "rolename": old.rolename}]
    assert todo.changed == ["s1"]


def test_drift_is_repaired_and_nothing_else_is_touched() -> None:
    r1, r2, r3 = role("s1"), role("s2"), role("s3")
    tampered = RoleState(r2.rolename, frozenset({*r2.acls, ("subscribePattern", "#", True, 0)}))
    clients = {
        "s1": ClientState("s1", (r1.rolename,)),  # in step
        "s2": ClientState("s2", (r2.rolename,)),  # its role widened behind our back
        "s3": ClientState("s3", (r3.rolename,), disabled=True),  # disabled keeps rights: enable + reassert
        "intruder": ClientState("intruder"),  # nobody asked for it
    }
    todo = plan({"s1": r1, "s2": r2, "s3": r3}, clients, {**have([r1, r3]), r2.rolename: tampered})
    assert [c["command"] for c in todo.grants] == [
        "deleteRole", "createRole", "addClientRole", "enableClient", "modifyClient"]
    assert todo.repaired_roles == [r2.rolename]
    assert todo.withdraw == ["intruder"] and todo.existing == {"intruder"}
    assert todo.commands == 5 + 2


def test_scope_limits_a_batch_to_the_devices_it_names() -> None:
    r1 = role("s1")
    clients = {"s1": ClientState("s1", (r1.rolename,)), "other": ClientState("other")}
    todo = plan({}, clients, have([r1]), scope=["s1"])
    assert todo.withdraw == ["s1"]  # the revoked device, not the unrelated client
    assert todo.cleanup == [{"command": "deleteRole", "rolename": r1.rolename}]
    # A device whose status just changed is kicked even without a client (a rightless session may exist).
    assert plan({}, {}, {}, scope=["gone"], kick_missing=["gone"]).withdraw == ["gone"]
    assert plan({}, {}, {}, scope=["new"]).withdraw == []  # a pending device that never had a client


def test_withdrawal_kicks_everyone_before_any_slow_save() -> None:
    commands = withdrawal_commands(["a", "b"], existing={"a"})
    assert [(c["command"], c["username"]) for c in commands] == [
        ("createClient", "b"),  # disableClient on a missing client kicks nobody
        ("disableClient", "a"), ("disableClient", "b"),
        ("deleteClient", "a"), ("deleteClient", "b"),
    ]


def test_reserved_names_are_never_devices_and_strangers_among_them_are_removed() -> None:
    clients = {
        ADMIN_USERNAME: ClientState(ADMIN_USERNAME, (ADMIN_ROLE,)),
        MARKER_USERNAME: ClientState(MARKER_USERNAME, textdescription="7"),
        "iotauth:backdoor": ClientState("iotauth:backdoor", (ADMIN_ROLE,)),
    }
    roles = {ADMIN_ROLE: RoleState(ADMIN_ROLE, frozenset(ADMIN_ACLS))}
    todo = plan({}, clients, roles)
    assert todo.withdraw == [] and todo.grants == []
    repairs, strangers = reserved_repairs(clients, roles, dict.fromkeys(DEFAULT_ACL_TYPES, False))
    assert repairs == [] and strangers == ["iotauth:backdoor"]
    assert marker_command(clients, "7") is None
    assert marker_command(clients, "8") == {"command": "modifyClient", "username": MARKER_USERNAME,
                                            "textdescription": "8", "roles": [], "groups": []}


def test_a_widened_admin_role_or_an_open_default_is_put_back() -> None:
    clients = {ADMIN_USERNAME: ClientState(ADMIN_USERNAME, (ADMIN_ROLE, "extra"))}
    roles = {ADMIN_ROLE: RoleState(ADMIN_ROLE, frozenset({*ADMIN_ACLS, ("subscribePattern", "#", True, 0)}))}
    repairs, _ = reserved_repairs(clients, roles, {**dict.fromkeys(DEFAULT_ACL_TYPES, False), "subscribe": True})
    assert [c["command"] for c in repairs] == ["deleteRole", "createRole", "modifyClient", "setDefaultACLAccess"]
    assert all(not acl["allow"] for acl in repairs[-1]["acls"])


def test_the_state_file_is_what_dynsec_loads_and_the_admin_hash_matches_pbkdf2() -> None:
    document = bootstrap_state("s3cret-password-of-enough-length-000", [role("s1"), role("s2")], "42")
    assert state_problems(document) == []
    admin = next(c for c in document["clients"] if c["username"] == ADMIN_USERNAME)
    salt = base64.b64decode(admin["salt"])
    expected = hashlib.pbkdf2_hmac("sha512", b"s3cret-password-of-enough-length-000", salt, admin["iterations"], 64)
    assert base64.b64decode(admin["password"]) == expected
    assert "s3cret" not in str(document)
    assert all(value is False for value in document["defaultACLAccess"].values())
    marker = next(c for c in document["clients"] if c["username"] == MARKER_USERNAME)
    assert marker["textdescription"] == "42" and "password" not in marker
    devices = [c for c in document["clients"] if not c["username"].startswith("iotauth:")]
    assert all("password" not in c for c in devices)  # the password path can never log a device in


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda d: d["clients"][0].update(salt=base64.b64encode(b"short").decode()), "out of range"),
        (lambda d: d["clients"].append(dict(d["clients"][2])), "duplicate client"),
        (lambda d: d["clients"][2]["roles"].append({"rolename": "dev:ghost:00000000"}), "unknown role"),
        (lambda d: d["defaultACLAccess"].update(subscribe=True), "deny everything"),
    ],
)
def test_state_problems_catches_what_dynsec_would_silently_skip(damage: object, problem: str) -> None:
    document = bootstrap_state("x" * 40, [role("s1")], "1")
    damage(document)  # type: ignore[operator]
    assert any(problem in p for p in state_problems(document))


def test_password_entry_is_salted() -> None:
    assert password_entry("a")["salt"] != password_entry("a")["salt"]
    fixed = password_entry("a", salt=b"0" * 12, iterations=101)
    assert fixed == password_entry("a", salt=b"0" * 12, iterations=101)
    assert replace(role("s1")).rolename == role("s1").rolename

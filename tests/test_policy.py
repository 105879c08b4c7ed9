"""The topic policy engine: templates, identity binding, publish/subscribe/receive decisions.

The property tests state the security claim directly: a filter the policy lets
a session subscribe to never matches a topic the session may not receive, and
every decision agrees with a brute-force reference built on MQTT matching.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from iotauth.config import DEFAULT_DEVICE_PROFILE, Profile
from iotauth.errors import ConfigError, InvalidIdentity, PolicyDenied
from iotauth.policy import (
    Action,
    PolicySet,
    ProfilePolicy,
    covers,
    deny_all,
    filter_problem,
    matches,
    topic_problem,
)

INGEST = Profile("ingest", publish=("devices/+/commands/#",), subscribe=("devices/+/telemetry/#", "devices/+/state"))


@dataclass(frozen=True)
class Rules:
    name: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


@pytest.fixture
def policies() -> PolicySet:
    return PolicySet.from_profiles([DEFAULT_DEVICE_PROFILE, INGEST])


# -- the default device profile ------------------------------------------------------------


def test_default_profile_is_scoped_to_the_device(policies: PolicySet) -> None:
    p = policies.bind("default", "dev1")
    assert p.allows_publish("devices/dev1/telemetry/temp")
    assert p.allows_publish("devices/dev1/telemetry")  # 'a/#' matches 'a'
    assert p.allows_publish("devices/dev1/telemetry/a/b/c")
    assert p.allows_publish("devices/dev1/state")
    assert not p.allows_publish("devices/dev1/state/x")
    assert not p.allows_publish("devices/dev2/telemetry/temp")
    assert not p.allows_publish("devices/dev1/commands/reboot")
    assert not p.allows_publish("devices/dev1/telemetryX")
    assert p.allows_receive("devices/dev1/commands/reboot")
    assert not p.allows_receive("devices/dev2/commands/reboot")
    assert not p.allows_receive("devices/dev1/telemetry/temp")


@pytest.mark.parametrize(
    "allowed",
    ["devices/dev1/commands/#", "devices/dev1/commands", "devices/dev1/commands/+", "devices/dev1/commands/+/#",
     "devices/dev1/commands/reboot", "devices/dev1/commands/a/+/c"],
)
def test_device_may_subscribe_inside_its_commands(policies: PolicySet, allowed: str) -> None:
    assert policies.bind("default", "dev1").allows_subscribe(allowed)


@pytest.mark.parametrize(
    "refused",
    [
        "devices/+/commands/#",  # other devices' commands
        "#",
        "+/dev1/commands/#",
        "+/+/+/+",
        "devices/#",
        "devices/dev1/#",  # would include telemetry it may not read
        "devices/dev1/+",
        "devices/dev1/+/reboot",
        "devices/dev2/commands/#",
        "$SYS/#",
        "$SYS/broker/clients",
        "$share/g/devices/dev1/commands/#",
        "devices/dev1/commands/#/x",  # malformed
        "devices/dev1/commands/a#",  # malformed
        "devices/dev1/commands/a+",  # malformed
        "devices/dev1/commands/\x00",
        "",
    ],
)
def test_device_may_not_widen_its_subscription(policies: PolicySet, refused: str) -> None:
    p = policies.bind("default", "dev1")
    assert not p.allows_subscribe(refused)
    assert p.explain(Action.SUBSCRIBE, refused) is not None
    with pytest.raises(PolicyDenied):
        p.require(Action.SUBSCRIBE, refused)


def test_ingest_profile_reads_every_device_but_no_system_topics(policies: PolicySet) -> None:
    p = policies.bind("ingest", "ingest-1")
    assert p.allows_subscribe("devices/+/telemetry/#")
    assert p.allows_subscribe("devices/dev9/telemetry/temp")
    assert p.allows_subscribe("devices/+/state")
    assert not p.allows_subscribe("devices/#")
    assert not p.allows_subscribe("#")
    assert p.allows_receive("devices/dev9/telemetry/x")
    assert not p.allows_receive("devices/dev9/commands/x")
    assert p.allows_publish("devices/dev9/commands/reboot")
    assert not p.allows_publish("devices/dev9/telemetry/fake")
    assert not p.allows_receive("$SYS/broker/load")


@pytest.mark.parametrize(
    "topic",
    ["$SYS/x", "$anything", "devices/dev1/telemetry/+", "devices/dev1/telemetry/#", "", "devices/dev1/state\x00",
     "devices/dev1/telemetry/\u0085", "devices/dev1/telemetry/\ud800"],
)
def test_malformed_and_system_topics_are_never_published(topic: str) -> None:
    p = PolicySet.from_profiles([Rules("open", ("#",), ("#",))]).bind("open", "dev1")
    assert not p.allows_publish(topic)
    assert not p.allows_receive(topic)
    assert p.explain(Action.PUBLISH, topic) is not None


def test_oversize_topics_are_malformed() -> None:
    p = PolicySet.from_profiles([Rules("open", ("#",), ("#",))]).bind("open", "dev1")
    assert p.allows_publish("a" * 65_535)
    assert not p.allows_publish("a" * 65_536)
    assert not p.allows_publish("é" * 40_000)  # 80 000 bytes of UTF-8
    assert topic_problem("é" * 40_000) is not None


def test_non_text_and_unknown_actions_are_denied(policies: PolicySet) -> None:
    p = policies.bind("default", "dev1")
    assert not p.allows_publish(b"devices/dev1/state")  # type: ignore[arg-type]
    assert not p.allows(Action.PUBLISH, None)  # type: ignore[arg-type]
    assert not p.allows("delete", "devices/dev1/state")
    assert p.explain("delete", "devices/dev1/state") is not None


# -- identity values and templates ---------------------------------------------------------


@pytest.mark.parametrize("hostile", ["+", "#", "a/b", "dev1/#", "$SYS", "", "x" * 65, "dev\x00", ".hidden", "a+b"])
def test_hostile_identities_cannot_be_bound(policies: PolicySet, hostile: str) -> None:
    with pytest.raises(InvalidIdentity):
        policies.bind("default", hostile)


def test_profile_placeholder_is_filled_with_the_profile_name() -> None:
    p = PolicySet.from_profiles([Rules("fleet", ("fleet/{profile}/{device_id}/up",), ())]).bind("fleet", "d1")
    assert p.allows_publish("fleet/fleet/d1/up")
    assert [r.topic_filter for r in p.rules()] == ["fleet/fleet/d1/up"]


def test_unknown_profile_has_no_rights(policies: PolicySet) -> None:
    with pytest.raises(PolicyDenied):
        policies.bind("admin", "dev1")
    nothing = deny_all("dev1", "gone")
    assert not nothing.allows_publish("devices/dev1/state")
    assert not nothing.allows_subscribe("devices/dev1/commands/#")


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("devices/{device}/x", "unknown placeholder"),
        ("devices/{0}/x", "unknown placeholder"),
        ("devices/{}/x", "unknown placeholder"),
        ("devices/{device_id!r}/x", "unknown placeholder"),
        ("devices/{device_id:>9}/x", "unknown placeholder"),
        ("devices/{device_id.__class__}/x", "unknown placeholder"),
        ("devices/{device_id", "malformed"),
        ("devices/#/x", "not a valid topic filter"),
        ("devices/a+/x", "not a valid topic filter"),
        ("$SYS/#", "system topic"),
        ("", "not a valid topic filter"),
    ],
)
def test_malformed_templates_are_refused_at_load(template: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        PolicySet.from_profiles([Rules("bad", (template,), ())])


def test_rendering_for_other_brokers_keeps_their_variables() -> None:
    parsed = ProfilePolicy.parse(DEFAULT_DEVICE_PROFILE)
    assert parsed.render({"device_id": "%c", "profile": "default"}) == {
        "publish": ["devices/%c/telemetry/#", "devices/%c/state", "devices/%c/rotation/request"],
        "subscribe": ["devices/%c/commands/#", "devices/%c/rotation/response"],
    }
    compiled = parsed.bind("dev1")
    assert [(r.action.value, r.topic_filter) for r in compiled.rules()] == [
        ("publish", "devices/dev1/telemetry/#"),
        ("publish", "devices/dev1/state"),
        ("publish", "devices/dev1/rotation/request"),
        ("subscribe", "devices/dev1/commands/#"),
        ("subscribe", "devices/dev1/rotation/response"),
    ]
    assert compiled.as_dict()["subscribe"] == ["devices/dev1/commands/#", "devices/dev1/rotation/response"]


# -- reference matching --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "topic_filter", "expected"),
    [
        ("a", "a/#", True),
        ("a/b/c", "a/#", True),
        ("a", "#", True),
        ("a/b", "+", False),
        ("a/b", "+/+", True),
        ("a//b", "a/+/b", True),
        ("/a", "+/a", True),
        ("$SYS/x", "#", False),
        ("$SYS/x", "+/x", False),
        ("$SYS/x", "$SYS/#", True),
        ("ab", "a/#", False),
    ],
)
def test_mqtt_matching(topic: str, topic_filter: str, expected: bool) -> None:
    assert matches(topic, topic_filter) is expected


# -- properties ----------------------------------------------------------------------------

LEVELS = ["a", "b", "dev1", "dev2", "", "commands", "x"]
_level = st.sampled_from(LEVELS)
_topic = st.lists(st.sampled_from([*LEVELS, "$SYS"]), min_size=1, max_size=5).map("/".join)


@st.composite
def _filters(draw: st.DrawFn, allow_dollar: bool = False) -> str:
    pool = [*LEVELS, "+", "{device_id}"] + (["$SYS"] if allow_dollar else [])
    levels = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=5))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels) or "a"  # a single empty level would be an empty (invalid) filter


_identity = st.sampled_from(["dev1", "dev2", "x"])


@settings(max_examples=600, deadline=None)
@given(rule=_filters(), topic_filter=_filters(), topic=_topic)
def test_coverage_is_sound(rule: str, topic_filter: str, topic: str) -> None:
    rule, topic_filter = rule.replace("{device_id}", "dev1"), topic_filter.replace("{device_id}", "dev1")
    if covers(tuple(rule.split("/")), tuple(topic_filter.split("/"))) and matches(topic, topic_filter):
        assert matches(topic, rule)


@settings(max_examples=800, deadline=None)
@given(
    subscribe=st.lists(_filters(), min_size=0, max_size=3),
    identity=_identity,
    topic_filter=_filters(allow_dollar=True),
    topic=_topic,
)
def test_a_permitted_filter_never_matches_a_forbidden_topic(
    subscribe: list[str], identity: str, topic_filter: str, topic: str
) -> None:
    assume(topic_problem(topic) is None)  # MQTT matching is defined for valid topic names only
    policy = PolicySet.from_profiles([Rules("p", (), tuple(subscribe))]).bind("p", identity)
    concrete = topic_filter.replace("{device_id}", identity)
    if policy.allows_subscribe(concrete) and matches(topic, concrete):
        assert policy.allows_receive(topic), (subscribe, concrete, topic)


@settings(max_examples=800, deadline=None)
@given(publish=st.lists(_filters(), min_size=0, max_size=3), identity=_identity, topic=_topic)
def test_publish_decisions_agree_with_the_reference(publish: list[str], identity: str, topic: str) -> None:
    policy = PolicySet.from_profiles([Rules("p", tuple(publish), tuple(publish))]).bind("p", identity)
    rules = [t.replace("{device_id}", identity) for t in publish]
    expected = bool(topic) and not topic.startswith("$") and any(matches(topic, r) for r in rules)
    assert policy.allows_publish(topic) is expected
    assert policy.allows_receive(topic) is expected


@settings(max_examples=300, deadline=None)
@given(subscribe=st.lists(_filters(), min_size=1, max_size=3), identity=_identity)
def test_every_rule_may_be_subscribed_as_written(subscribe: list[str], identity: str) -> None:
    policy = PolicySet.from_profiles([Rules("p", (), tuple(subscribe))]).bind("p", identity)
    for rule in subscribe:
        assert policy.allows_subscribe(rule.replace("{device_id}", identity))


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(["a", "/", "+", "#", "$", "\x00", "é"]), max_size=8))
def test_filter_validation_matches_the_mqtt_grammar(text: str) -> None:
    levels = text.split("/")
    valid = bool(text) and "\x00" not in text and all(
        (("#" not in lv) or (lv == "#" and i == len(levels) - 1)) and (("+" not in lv) or lv == "+")
        for i, lv in enumerate(levels)
    )
    assert (filter_problem(text) is None) is valid

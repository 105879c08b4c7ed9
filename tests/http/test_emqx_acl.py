"""The ``acl`` in the EMQX authentication answer, evaluated by a transcription of EMQX's own matcher.

The EMQX side is :mod:`tests.fixtures.emqx` (``emqx_topic:match/2`` at v5.8.0 and
at v5.8.2+, ``emqx_authz_rule_raw`` / ``emqx_authz_rule``, the authorization
chain with the default ``acl.conf``); the iotauth side is :mod:`iotauth.policy`.
The property: whatever profile rules an operator writes, EMQX never allows
more than iotauth, and allows exactly as much except for the rules
:func:`render_acl` reports as narrowed.

EMQX source: github.com/emqx/emqx, tag v5.8.0 (commit e5ed59deb633) unless a test names another ref
(v5.8.2 cbf64766e2b3, 6.2.2 f7b2e6d8e2c5, HEAD 50e04386de84).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotauth.http.emqx_acl import SYSTEM_PREFIXES, render_acl
from iotauth.policy import ProfilePolicy, SessionPolicy, filter_problem
from tests.fixtures import emqx

DEVICE = "dev-1"
VERSIONS = ("5.8.0", "5.8.2")  # before and after commit 12fe8e22a5 ($-topics and wildcards in match_words)


@dataclass(frozen=True)
class Rules:
    name: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def bind(publish: tuple[str, ...] = (), subscribe: tuple[str, ...] = ()) -> SessionPolicy:
    return ProfilePolicy.parse(Rules("p", publish, subscribe)).bind(DEVICE)


def emqx_decision(policy: SessionPolicy, action: str, topic: str, version: str) -> str:
    """What EMQX decides from the authn ACL alone: allow, deny or nomatch (falls through to the chain)."""
    return emqx.evaluate(emqx.parse_and_compile_rules(render_acl(policy).rules, version), action, topic,
                         version=version, client={"clientid": DEVICE, "username": DEVICE})


def iotauth_allows(policy: SessionPolicy, action: str, topic: str) -> bool:
    return policy.allows_publish(topic) if action == "publish" else policy.allows_subscribe(topic)


# -- examples -----------------------------------------------------------------------------------


def test_the_default_profile_renders_system_denies_first_and_a_final_deny_all() -> None:
    acl = render_acl(bind(("devices/{device_id}/telemetry/#", "devices/{device_id}/state"),
                          ("devices/{device_id}/commands/#",)))
    assert acl.rules == [
        *({"permission": "deny", "action": "all", "topic": f"{p}/#"} for p in SYSTEM_PREFIXES),
        {"permission": "allow", "action": "publish", "topic": "devices/dev-1/telemetry/#"},
        {"permission": "allow", "action": "publish", "topic": "devices/dev-1/state"},
        {"permission": "allow", "action": "subscribe", "topic": "devices/dev-1/commands/#"},
        {"permission": "deny", "action": "all", "topic": "#"},
    ]
    assert acl.narrowed == ()
    # Every rule passes EMQX's own parser (a bad rule would deny the login: emqx_authn_http.erl lines 224-227).
    assert len(emqx.parse_and_compile_rules(acl.rules)) == len(acl.rules)


def test_no_rights_is_still_a_complete_list() -> None:
    """An unknown profile: EMQX must deny everything, not fall through to acl.conf's {allow, all}."""
    rules = render_acl(None).rules
    assert rules[-1] == {"permission": "deny", "action": "all", "topic": "#"}
    compiled = emqx.parse_and_compile_rules(rules)
    for version in VERSIONS:
        assert emqx.evaluate(compiled, "publish", "devices/dev-1/state", version=version) == "deny"
        assert emqx.evaluate(compiled, "subscribe", "$SYS/brokers", version=version) == "deny"


@pytest.mark.parametrize("version", VERSIONS)
def test_a_trailing_plus_would_admit_a_hash_subscription_and_is_guarded(version: str) -> None:
    """``emqx_topic.erl`` 5.8.0 line 95, ``match([_H | T1], ['+' | T2])``: rule ``a/+`` admits ``a/#``."""
    naive = emqx.parse_and_compile_rules([{"permission": "allow", "action": "subscribe", "topic": "devices/dev-1/+"}])
    assert emqx.evaluate(naive, "subscribe", "devices/dev-1/#", version=version) == "allow"  # the hazard is real
    policy = bind(subscribe=("devices/{device_id}/+",))
    acl = render_acl(policy)
    assert {"permission": "deny", "action": "subscribe", "topic": "eq devices/dev-1/#"} in acl.rules
    assert emqx_decision(policy, "subscribe", "devices/dev-1/#", version) == "deny"
    assert emqx_decision(policy, "subscribe", "devices/dev-1/x", version) == "allow"
    assert emqx_decision(policy, "subscribe", "devices/dev-1/+", version) == "allow"


def test_the_guard_is_left_out_when_iotauth_allows_that_filter_anyway() -> None:
    policy = bind(subscribe=("devices/{device_id}/+", "devices/{device_id}/#"))
    assert all("eq" not in rule["topic"] for rule in render_acl(policy).rules)
    assert emqx_decision(policy, "subscribe", "devices/dev-1/#", "5.8.2") == "allow"


def test_unbounded_widening_is_sent_as_the_exact_filter_only() -> None:
    policy = bind(subscribe=("+/{device_id}/+",))
    acl = render_acl(policy)
    assert {"permission": "allow", "action": "subscribe", "topic": "eq +/dev-1/+"} in acl.rules
    assert acl.narrowed == ("subscribe +/dev-1/+",)
    assert emqx_decision(policy, "subscribe", "a/dev-1/#", "5.8.2") == "deny"  # iotauth: deny
    assert emqx_decision(policy, "subscribe", "+/dev-1/+", "5.8.2") == "allow"
    assert emqx_decision(policy, "subscribe", "a/dev-1/b", "5.8.2") == "deny"  # iotauth allows: narrower


@pytest.mark.parametrize("version", VERSIONS)
def test_placeholders_and_eq_prefixes_in_rules_are_not_interpreted(version: str) -> None:
    """``emqx_authz_rule:compile_topic/1`` (5.8.0 lines 256-267) would render ``${clientid}`` per client."""
    policy = bind(publish=("x/${{clientid}}", "eq y/#"), subscribe=("x/${{clientid}}/#",))
    acl = render_acl(policy)
    assert {"permission": "allow", "action": "publish", "topic": "eq x/${clientid}"} in acl.rules
    assert acl.narrowed == ("publish eq y/#", "subscribe x/${clientid}/#")
    assert emqx_decision(policy, "publish", "x/dev-1", version) == "deny"
    assert emqx_decision(policy, "publish", "x/${clientid}", version) == "allow"
    assert emqx_decision(policy, "publish", "y/z", version) == "deny"


def test_system_topics_on_either_side_of_5_8_2() -> None:
    """5.8.0/5.8.1: ``#`` matches ``$SYS``; 5.8.2+: no wildcard matches a ``$`` first level."""
    policy = bind(publish=("devices/{device_id}/state",))
    for version in VERSIONS:
        for prefix in SYSTEM_PREFIXES:
            assert emqx_decision(policy, "publish", f"{prefix}/x", version) == "deny"
    assert emqx_decision(policy, "subscribe", "$other/x", "5.8.0") == "deny"
    assert emqx_decision(policy, "subscribe", "$other/x", "5.8.2") == "nomatch"  # to the chain: iotauth's authz


# -- properties -------------------------------------------------------------------------------------

_RULE_LEVELS = st.sampled_from(["a", "b", "{device_id}", "+", "+", "x.y", "eq a", "${{clientid}}", ""])
_TOPIC_LEVELS = st.sampled_from(["a", "b", DEVICE, "other", "+", "#", "x.y", "eq a", "${clientid}", ""])
_FIRST = st.sampled_from(["a", DEVICE, "+", "#", "$SYS", "$share", "$queue", "$exclusive", "$delayed", "$other",
                          "eq a", ""])


@st.composite
def rule_texts(draw: st.DrawFn) -> str:
    levels = draw(st.lists(_RULE_LEVELS, min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str]:
    action = draw(st.sampled_from(["publish", "subscribe"]))
    return _shape(action, [draw(_FIRST), *draw(st.lists(_TOPIC_LEVELS, max_size=4))])


def _shape(action: str, levels: list[str]) -> tuple[str, str]:
    """A well-formed name or filter from ``levels``: cut after the first ``#``; no wildcards in names."""
    if "#" in levels:
        levels = levels[: levels.index("#") + 1]
    if action == "publish":
        levels = ["p" if level == "+" else "h" if level == "#" else level for level in levels]
    return action, "/".join(levels) or "a"


@st.composite
def _near(draw: st.DrawFn, policy: SessionPolicy) -> tuple[str, str]:
    """A request close to one of the policy's rules (where decisions are interesting): the rule itself,
    its wildcards filled in or kept, a level added or cut, ``#`` (anywhere, or for the last level) or a
    ``$`` level put in."""
    rules = list(policy.rules())
    if not rules:
        return draw(requests())
    rule = draw(st.sampled_from(rules))
    out: list[str] = []
    for level in rule.topic_filter.split("/"):
        if level in ("+", "#"):
            out.extend(draw(st.lists(_TOPIC_LEVELS, min_size=0 if level == "#" else 1, max_size=1 if level == "+"
                                     else 3)))
        else:
            out.append(draw(st.sampled_from([level, level, level, "other", "#", "+"])))
    edit = draw(st.sampled_from(["none", "hash", "last", "cut", "dollar", "add"]))
    if edit == "last":  # the trailing-plus hazard: a rule's last '+' consuming a '#'
        out[-1] = "#"
    elif edit == "hash":
        out = [*out[: draw(st.integers(0, len(out)))], "#"]
    elif edit == "cut" and len(out) > 1:
        out = out[:-1]
    elif edit == "dollar":
        out = [draw(_FIRST), *out[1:]]
    elif edit == "add":
        out.append(draw(_TOPIC_LEVELS))
    return _shape(draw(st.sampled_from(["publish", "subscribe"])), out)


def _valid(action: str, topic: str) -> bool:
    """EMQX refuses malformed names and filters at the packet level, before authorization."""
    return filter_problem(topic) is None and (action == "subscribe" or not any(c in topic for c in "+#"))


def _policy_or_none(publish: list[str], subscribe: list[str]) -> SessionPolicy | None:
    try:
        return bind(tuple(publish), tuple(subscribe))
    except Exception:  # a template the configuration loader refuses: not a policy anyone can run
        return None


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.lists(rule_texts(), max_size=4), st.lists(rule_texts(), max_size=4), st.data())
def test_emqx_is_never_wider_than_iotauth(publish: list[str], subscribe: list[str], data: st.DataObject) -> None:
    policy = _policy_or_none(publish, subscribe)
    if policy is None:
        return
    asked = data.draw(st.lists(st.one_of(requests(), _near(policy), _near(policy)), min_size=6, max_size=20))
    rendered = render_acl(policy)
    wildcard_first = any(r.topic_filter.split("/")[0] in ("+", "#") for r in policy.rules())
    for action, topic in asked:
        if not _valid(action, topic):
            continue
        allowed = iotauth_allows(policy, action, topic)
        first = topic.split("/")[0]
        for version in VERSIONS:
            decision = emqx_decision(policy, action, topic, version)
            if decision == "allow" and not allowed:
                # The one documented gap: on 5.8.0/5.8.1 an allow rule starting with a wildcard also
                # matches a '$' name EMQX gives no meaning to (the README says: use 5.8.2 or later).
                assert version == "5.8.0" and wildcard_first and first.startswith("$")
                assert first not in SYSTEM_PREFIXES
            if decision == "nomatch":  # only unknown '$' names fall through, and only from 5.8.2
                assert version == "5.8.2" and first.startswith("$") and first not in SYSTEM_PREFIXES
            if allowed and decision != "allow":
                assert rendered.narrowed, (action, topic, rendered.rules)


@settings(max_examples=300, deadline=None)
@given(st.lists(rule_texts(), max_size=4), st.lists(rule_texts(), max_size=4), st.data())
def test_with_iotauths_authorizer_next_in_the_chain_the_final_answer_is_iotauths(
    publish: list[str], subscribe: list[str], data: st.DataObject
) -> None:
    """The whole chain on 5.8.2+ (authn ACL, iotauth's HTTP authorizer, default acl.conf, no_match=allow)."""
    policy = _policy_or_none(publish, subscribe)
    if policy is None:
        return
    asked = data.draw(st.lists(st.one_of(requests(), _near(policy), _near(policy)), min_size=6, max_size=20))
    acl = emqx.parse_and_compile_rules(render_acl(policy).rules, "5.8.2")
    narrowed = bool(render_acl(policy).narrowed)
    for action, topic in asked:
        if not _valid(action, topic):
            continue
        allowed = iotauth_allows(policy, action, topic)
        http = "allow" if allowed else "deny"  # iotauth's /emqx/authz answers 200 with this result
        final = emqx.authorize_chain(acl, http, action, topic, version="5.8.2")
        assert final == ("allow" if allowed else "deny") or (narrowed and allowed and final == "deny")

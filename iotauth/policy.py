"""Topic authorization: profile templates compiled into per-session allow lists.

Pure by design: no amqtt, no database, no I/O. The same engine decides for
the amqtt broker, and is what the EMQX HTTP authorizer and the Mosquitto ACL
exporter render from ("one implementation, several front ends").

Model
-----
A profile lists allow *templates* for publish and for subscribe, e.g.
``devices/{device_id}/telemetry/#``. :class:`PolicySet` parses every profile
once (at start and at each reload) and rejects malformed templates with a
:class:`~iotauth.errors.ConfigError`. :meth:`ProfilePolicy.bind` then fills
in ``{device_id}`` and ``{profile}`` -- only after
:func:`~iotauth.identity.validate_device_id` /
:func:`~iotauth.identity.validate_profile_name`, whose alphabets cannot express
``/``, ``+``, ``#``, ``$`` or NUL, so an identity value can never add a level or
a wildcard -- and yields a :class:`SessionPolicy`, compiled once per session.

Decisions (everything not allowed is denied):

* PUBLISH ``topic``: ``topic`` is a valid topic name, does not start with
  ``$`` and matches a publish rule.
* RECEIVE ``topic`` (delivery to the session): the same against the
  subscribe rules, so a subscription that somehow outlived its right (a
  resumed session, a reload) still delivers nothing it should not.
* SUBSCRIBE ``filter``: the filter is well formed, does not start with ``$``
  and is *covered* by a single subscribe rule: every topic the filter can
  match is matched by that rule. Coverage is decided level by level: a literal
  filter level needs the same literal or ``+`` in the rule; ``+`` in the
  filter needs ``+`` or ``#`` in the rule; ``#`` in the filter needs ``#`` in
  the rule at that depth; a rule ending in ``#`` covers everything below (and
  the parent level itself, since ``a/#`` also matches ``a``). This is sound
  (a permitted filter never matches a forbidden topic; property-tested) and
  deliberately not complete: a filter that only the *union* of several rules
  would cover is refused.

``$``-topics (``$SYS`` and friends) are never allowed to anyone holding a
:class:`SessionPolicy`; templates starting with ``$`` are refused at load.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from iotauth.errors import ConfigError, InvalidIdentity, PolicyDenied
from iotauth.identity import validate_device_id, validate_profile_name

MAX_TOPIC_BYTES = 65_535
PLACEHOLDERS = frozenset({"device_id", "profile"})
# C0 and C1 controls, NUL, DEL, and lone surrogates: MQTT forbids NUL and advises against the rest.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NOT_IN_NAMES = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff+#]")  # _FORBIDDEN plus the wildcards
_SAMPLE = {"device_id": "x", "profile": "x"}


class Action(StrEnum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"


class ProfileRules(Protocol):
    """What the engine needs from a profile (``iotauth.config.Profile`` has it)."""

    @property
    def name(self) -> str: ...

    @property
    def publish(self) -> tuple[str, ...]: ...

    @property
    def subscribe(self) -> tuple[str, ...]: ...


# -- topic names and filters --------------------------------------------------------------


def topic_problem(topic: object) -> str | None:
    """Why ``topic`` is not a valid MQTT topic *name* (for PUBLISH), or ``None``."""
    problem = _text_problem(topic, "topic")
    if problem is None and ("+" in topic or "#" in topic):  # type: ignore[operator]
        return "topic names cannot contain wildcards"
    return problem


def filter_problem(topic_filter: object) -> str | None:
    """Why ``topic_filter`` is not a valid MQTT topic *filter* (for SUBSCRIBE), or ``None``."""
    problem = _text_problem(topic_filter, "filter")
    if problem is not None:
        return problem
    assert isinstance(topic_filter, str)
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def _text_problem(value: object, what: str) -> str | None:
    if not isinstance(value, str):
        return f"{what} must be text"
    if not value:
        return f"{what} is empty"
    if _FORBIDDEN.search(value):
        return f"{what} contains a control character, NUL or a lone surrogate"
    if len(value) * 4 > MAX_TOPIC_BYTES and len(value.encode("utf-8")) > MAX_TOPIC_BYTES:
        return f"{what} is longer than {MAX_TOPIC_BYTES} bytes"
    return None


def _valid_name(topic: str) -> bool:
    """Hot-path equivalent of ``topic_problem(topic) is None`` for a non-empty ``str``."""
    if _NOT_IN_NAMES.search(topic) is not None:
        return False
    return len(topic) * 4 <= MAX_TOPIC_BYTES or len(topic.encode("utf-8", "surrogatepass")) <= MAX_TOPIC_BYTES


def matches(topic: str, topic_filter: str) -> bool:
    """MQTT 3.1.1 matching of a topic name against a filter (4.7), including the ``$`` rule.

    Both arguments must already be valid; this is the reference the policy's
    own decisions are tested against.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    return _levels_match(topic.split("/"), tuple(topic_filter.split("/")))


def _levels_match(topic: list[str], rule: tuple[str, ...]) -> bool:
    last = len(rule) - 1
    for index, level in enumerate(rule):
        if level == "#":
            return True  # '#' matches the parent level too: 'a/#' matches 'a'
        if index >= len(topic):
            return False
        if level != "+" and level != topic[index]:
            return False
        if index == last:
            return len(topic) == len(rule)
    return len(topic) == len(rule)


def covers(rule: tuple[str, ...], topic_filter: tuple[str, ...]) -> bool:
    """Whether every topic matched by ``topic_filter`` is matched by ``rule`` (both as level tuples)."""
    for index, level in enumerate(rule):
        if level == "#":
            return True
        if index >= len(topic_filter):
            return False  # the filter stops here, the rule wants more levels
        wanted = topic_filter[index]
        if wanted == "#":
            return False  # the filter matches any depth from here, the rule does not
        if wanted == "+":
            if level != "+":
                return False
        elif level != "+" and level != wanted:
            return False
    return len(topic_filter) == len(rule)


# -- templates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """One allow rule as written in ``iotauth.toml`` (parsed, not yet bound to an identity)."""

    text: str
    fields: frozenset[str]

    @classmethod
    def parse(cls, text: object, where: str) -> Template:
        if not isinstance(text, str):
            raise ConfigError(f"{where}: topic rule must be text, got {type(text).__name__}")
        names: set[str] = set()
        try:
            for _literal, name, spec, conversion in string.Formatter().parse(text):
                if name is None:
                    continue
                if name not in PLACEHOLDERS or spec or conversion:
                    raise ConfigError(
                        f"{where}: unknown placeholder {{{name}}} in {text!r}; use {{device_id}} or {{profile}}"
                    )
                names.add(name)
        except ValueError as exc:
            raise ConfigError(f"{where}: malformed rule {text!r} ({exc}); write a literal brace as '{{{{'") from exc
        rendered = text.format_map(_SAMPLE)
        problem = filter_problem(rendered)
        if problem is not None:
            raise ConfigError(f"{where}: rule {text!r} is not a valid topic filter: {problem}")
        if rendered.startswith("$"):
            raise ConfigError(f"{where}: rule {text!r} names a '$' system topic; devices never get those")
        return cls(text, frozenset(names))

    def render(self, values: Mapping[str, str]) -> str:
        """Fill in the placeholders verbatim. Decisions never use this; exporters do.

        Exporters for other brokers pass that broker's own variables (for
        example ``{"device_id": "%c"}`` for Mosquitto); :meth:`ProfilePolicy.bind`
        is the only path that fills in identity values for decisions.
        """
        return self.text.format_map(values)


@dataclass(frozen=True)
class ProfilePolicy:
    """A profile's parsed rules; :meth:`bind` compiles them for one identity."""

    profile: str
    publish: tuple[Template, ...]
    subscribe: tuple[Template, ...]

    @classmethod
    def parse(cls, rules: ProfileRules) -> ProfilePolicy:
        try:
            name = validate_profile_name(rules.name)
        except InvalidIdentity as exc:
            raise ConfigError(str(exc)) from exc
        where = f"profiles.{name}"
        return cls(
            name,
            tuple(Template.parse(t, f"{where}.publish") for t in rules.publish),
            tuple(Template.parse(t, f"{where}.subscribe") for t in rules.subscribe),
        )

    def bind(self, device_id: str) -> SessionPolicy:
        """Compile this profile for ``device_id`` (validated here; raises :class:`InvalidIdentity`)."""
        values = {"device_id": validate_device_id(device_id), "profile": self.profile}
        return SessionPolicy(
            device_id=values["device_id"],
            profile=self.profile,
            publish=_RuleSet.build(t.render(values) for t in self.publish),
            subscribe=_RuleSet.build(t.render(values) for t in self.subscribe),
        )

    def render(self, values: Mapping[str, str]) -> dict[str, list[str]]:
        """The rules with placeholders replaced by ``values`` (for exporters), per action."""
        return {
            Action.PUBLISH.value: [t.render(values) for t in self.publish],
            Action.SUBSCRIBE.value: [t.render(values) for t in self.subscribe],
        }


@dataclass(frozen=True)
class PolicySet:
    """Every profile's rules, parsed and checked once; immutable, swapped whole on reload."""

    profiles: Mapping[str, ProfilePolicy]

    @classmethod
    def from_profiles(cls, profiles: Iterable[ProfileRules]) -> PolicySet:
        parsed = {p.profile: p for p in (ProfilePolicy.parse(r) for r in profiles)}
        return cls(parsed)

    def bind(self, profile: str, device_id: str) -> SessionPolicy:
        """The compiled policy of ``device_id`` under ``profile``.

        Raises:
            PolicyDenied: the profile is not configured (fail closed: no rights).
            InvalidIdentity: ``device_id`` is not a safe device id.
        """
        policy = self.profiles.get(profile)
        if policy is None:
            raise PolicyDenied("unknown profile", profile)
        return policy.bind(device_id)


# -- compiled per-session rules ------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One compiled allow rule: a concrete topic filter."""

    action: Action
    topic_filter: str


@dataclass(frozen=True, slots=True)
class _RuleSet:
    """Rules of one action, arranged for fast matching and a small footprint (one per live session).

    Wildcard-free rules are compared whole; ``literal/prefix/#`` rules become a
    string prefix test; only rules with ``+`` (or a bare ``#``) are matched level
    by level. Coverage (SUBSCRIBE, rare) splits the filters on demand.
    """

    filters: tuple[str, ...]
    exact: tuple[str, ...] | frozenset[str]
    prefixes: tuple[str, ...]  # "parent/": matches "parent" and everything below
    general: re.Pattern[str] | None  # every rule with '+' (or a bare '#'), as one anchored pattern

    @classmethod
    def build(cls, filters: Iterable[str]) -> _RuleSet:
        unique = tuple(dict.fromkeys(filters))
        exact: list[str] = []
        prefixes: list[str] = []
        general: list[tuple[str, ...]] = []
        for text in unique:
            problem = filter_problem(text)
            if problem is not None or text.startswith("$"):  # unreachable after Template.parse
                raise ConfigError(f"compiled rule {text!r} is not a valid non-system filter")
            levels = tuple(text.split("/"))
            if "+" not in levels and "#" not in levels:
                exact.append(text)
            elif "+" not in levels and levels[-1] == "#" and len(levels) > 1:
                prefixes.append(text[:-1])
            else:
                general.append(levels)
        pattern = re.compile("|".join(_rule_pattern(levels) for levels in general), re.DOTALL) if general else None
        return cls(unique, tuple(exact) if len(exact) <= 8 else frozenset(exact), tuple(prefixes), pattern)

    def match(self, topic: str) -> bool:
        if topic in self.exact:
            return True
        for prefix in self.prefixes:
            if topic.startswith(prefix) or (len(topic) == len(prefix) - 1 and prefix.startswith(topic)):
                return True
        return self.general is not None and self.general.fullmatch(topic) is not None

    def cover(self, topic_filter: str) -> bool:
        wanted = tuple(topic_filter.split("/"))
        return any(covers(tuple(rule.split("/")), wanted) for rule in self.filters)


def _rule_pattern(levels: tuple[str, ...]) -> str:
    """A regular expression equivalent to MQTT matching against one filter (``$`` topics are excluded earlier).

    ``+`` is one level (``[^/]*``); a trailing ``#`` is "this level and everything below", which also
    matches the parent itself (``a/#`` matches ``a``); a bare ``#`` matches any topic.
    """
    if levels == ("#",):
        return "(?:.*)"
    parts = ["[^/]*" if level == "+" else re.escape(level) for level in levels if level != "#"]
    body = "/".join(parts)
    return f"(?:{body}(?:/.*)?)" if levels[-1] == "#" else f"(?:{body})"


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """One identity's compiled rights. Decisions are pure and take microseconds.

    The ``allows_*`` methods are the hot path (a ``bool``, no exceptions);
    :meth:`explain` says why something was denied, for logs and the audit trail;
    :meth:`require` raises :class:`~iotauth.errors.PolicyDenied` for API callers.
    """

    device_id: str
    profile: str
    publish: _RuleSet
    subscribe: _RuleSet

    def allows_publish(self, topic: str) -> bool:
        if not isinstance(topic, str) or not topic or topic[0] == "$":
            return False
        return self.publish.match(topic) and _valid_name(topic)

    def allows_receive(self, topic: str) -> bool:
        if not isinstance(topic, str) or not topic or topic[0] == "$":
            return False
        return self.subscribe.match(topic) and _valid_name(topic)

    def allows_subscribe(self, topic_filter: str) -> bool:
        if not isinstance(topic_filter, str) or not topic_filter or topic_filter[0] == "$":
            return False
        return filter_problem(topic_filter) is None and self.subscribe.cover(topic_filter)

    def allows(self, action: Action | str, topic: str) -> bool:
        """Dispatch on ``action`` (``publish``, ``subscribe`` or ``receive``); unknown actions are denied."""
        if action == Action.PUBLISH:
            return self.allows_publish(topic)
        if action == Action.SUBSCRIBE:
            return self.allows_subscribe(topic)
        if action == Action.RECEIVE:
            return self.allows_receive(topic)
        return False

    def explain(self, action: Action | str, topic: str) -> str | None:
        """``None`` if allowed, else a short reason (``malformed ...``, ``system topic``, ``no matching rule``)."""
        return None if self.allows(action, topic) else self.denial_reason(action, topic)

    def denial_reason(self, action: Action | str, topic: str) -> str:
        """Why ``action`` on ``topic`` is denied, for a caller that has already found it denied."""
        if action not in (Action.PUBLISH, Action.SUBSCRIBE, Action.RECEIVE):
            return f"unknown action {str(action)[:20]!r}"
        problem = filter_problem(topic) if action == Action.SUBSCRIBE else topic_problem(topic)
        if problem is not None:
            return f"malformed: {problem}"
        if topic.startswith("$"):
            return "system topics are never allowed"
        if action == Action.SUBSCRIBE:
            return "filter is not covered by a single subscribe rule"
        return f"no {'publish' if action == Action.PUBLISH else 'subscribe'} rule matches the topic"

    def require(self, action: Action | str, topic: str) -> None:
        """Raise :class:`PolicyDenied` unless ``action`` on ``topic`` is allowed."""
        reason = self.explain(action, topic)
        if reason is not None:
            raise PolicyDenied(f"{action} denied for {self.device_id!r}: {reason}", topic)

    def rules(self) -> Iterator[Rule]:
        """The compiled allow rules (concrete filters), publish first: for renderers and ``acl`` answers."""
        for text in self.publish.filters:
            yield Rule(Action.PUBLISH, text)
        for text in self.subscribe.filters:
            yield Rule(Action.SUBSCRIBE, text)

    def as_dict(self) -> dict[str, object]:
        return {
            "device_id": self.device_id,
            "profile": self.profile,
            "publish": list(self.publish.filters),
            "subscribe": list(self.subscribe.filters),
        }


DENY_ALL = _RuleSet.build(())


def deny_all(device_id: str, profile: str) -> SessionPolicy:
    """A policy that allows nothing (a session whose profile disappeared on reload)."""
    return SessionPolicy(device_id, profile, DENY_ALL, DENY_ALL)

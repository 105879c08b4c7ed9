"""The ``acl`` list in iotauth's EMQX authentication answer, rendered so EMQX is never wider than iotauth.

EMQX compiles the list (``emqx_authz_rule_raw:parse_and_compile_rules/1``) and
checks it before any authorizer, first match wins; a request that matches no
rule falls through to the authorizer chain (the HTTP authorizer, ``acl.conf``,
then ``authorization.no_match``, ``allow`` on 5.x). Sources: github.com/emqx/emqx
tag v5.8.0 (e5ed59de), ``apps/emqx_auth/src/emqx_authz/sources/emqx_authz_client_info.erl``
``authorize/4`` and its module doc ("passthrough when no match"), and
``apps/emqx_auth/src/emqx_authz/emqx_authz.erl`` ``do_authorize/4``. Its topic
matching (``apps/emqx/src/emqx_topic.erl`` ``match/2``, called on word lists by
``emqx_authz_rule:match_topics/3``) differs from iotauth's decisions
(:mod:`iotauth.policy`) in ways this module closes, rule by rule:

1. **``$`` topics.** On 5.8.0 and 5.8.1 ``#`` and ``+`` in a rule *match*
   ``$``-topics (the ``$`` check is only in ``match/2``'s binary clauses); from
   5.8.2 (commit 12fe8e22a5, ``match_words/2``) they never do, so ``{deny, all,
   "#"}`` no longer covers ``$SYS``. The list therefore starts with explicit
   denies for the ``$`` prefixes EMQX gives a meaning (:data:`SYSTEM_PREFIXES`).
   Other ``$`` names match nothing from 5.8.2 on and fall through to the
   authorizer chain, where iotauth's HTTP authorizer denies them (configure it
   first, see the README). On 5.8.0/5.8.1 an allow rule whose *first* level is a
   wildcard would also admit such other ``$`` names: use 5.8.2 or later.
2. **A rule's trailing ``+`` consumes a subscription's ``#``.**
   ``match([_H | T1], ['+' | T2])`` treats the filter word ``'#'`` as one level,
   so the rule ``a/+`` admits SUBSCRIBE ``a/#``, ``a/+/#`` admits ``a/#`` and
   ``+`` admits ``#``; iotauth refuses those (a filter must be covered by a
   rule). This happens exactly when a subscribe rule ends in ``+`` or ``+/#``.
   If the levels before that ``+`` are literal, the one extra filter is denied
   with an ``eq`` rule placed before every allow rule. If they contain ``+``
   too, the extra filters are unbounded and no finite deny list exists, so the
   rule is sent only as ``eq <rule>`` (that exact filter): EMQX is then
   *narrower* than iotauth for it, never wider.
3. **Rule topics are parsed.** A leading ``eq `` means an exact comparison and
   ``${clientid}``-style placeholders are rendered per client
   (``emqx_authz_rule:compile_topic/1``, ``emqx_authz_rule_raw:validate_rule_topic/1``).
   A rule containing either is sent as ``eq <rule>`` when that is exact (no
   wildcard, or a subscription to the rule itself) and left out otherwise.

The list ends with ``{deny, all, "#"}`` so nothing iotauth did not allow falls
through to ``acl.conf`` (whose default ends ``{allow, all}``). No ``qos`` or
``retain`` is set: iotauth does not restrict them, and EMQX's defaults are
"all". ``clientid_re``/``username_re``/``ipaddr`` are never used: 5.8.x
ignores them silently (every raw rule is compiled with ``Who = all``,
``emqx_authz_rule_raw.erl`` line 67), so every rule here is concrete.
"""

from __future__ import annotations

from dataclasses import dataclass

from iotauth.policy import Action, SessionPolicy

SYSTEM_PREFIXES = ("$SYS", "$share", "$queue", "$exclusive", "$delayed")
"""``$`` first levels EMQX interprets: broker topics (``$SYS``), shared and exclusive subscriptions
(``emqx_topic:parse/2``; a SUBSCRIBE is checked on the real filter, so these rules matter for PUBLISH
names) and delayed publishing (``emqx_access_control:authorize/3`` checks ``$delayed/N/t`` as ``t``)."""

AclRule = dict[str, str]


@dataclass(frozen=True)
class EmqxAcl:
    """The rendered list, and the iotauth rules EMQX gets only in a narrower form (for logs and docs)."""

    rules: list[AclRule]
    narrowed: tuple[str, ...]


def render_acl(policy: SessionPolicy | None) -> EmqxAcl:
    """Render ``policy`` (None: no rights at all) as an EMQX ``acl`` list; see the module docstring."""
    head = [_rule("deny", "all", f"{prefix}/#") for prefix in SYSTEM_PREFIXES]
    guards: list[AclRule] = []
    allows: list[AclRule] = []
    narrowed: list[str] = []
    if policy is not None:
        for rule in policy.rules():
            action = "publish" if rule.action is Action.PUBLISH else "subscribe"
            text = rule.topic_filter
            wild = _has_wildcard(text)
            if rule.action is Action.SUBSCRIBE:
                extra = _trailing_plus_extra(text)
                if extra is _UNBOUNDED or _parsed_specially(text):
                    allows.append(_rule("allow", action, f"eq {text}"))
                    if wild:
                        narrowed.append(f"subscribe {text}")
                    continue
                if isinstance(extra, str) and not policy.allows_subscribe(extra):
                    guards.append(_rule("deny", action, f"eq {extra}"))
                allows.append(_rule("allow", action, text))
            elif _parsed_specially(text):
                if wild:
                    narrowed.append(f"publish {text}")
                else:
                    allows.append(_rule("allow", action, f"eq {text}"))
            else:
                allows.append(_rule("allow", action, text))
    tail = [_rule("deny", "all", "#")]
    return EmqxAcl([*head, *_unique(guards), *allows, *tail], tuple(narrowed))


class _Unbounded:
    pass


_UNBOUNDED = _Unbounded()


def _trailing_plus_extra(text: str) -> str | _Unbounded | None:
    """The one filter EMQX admits under this subscribe rule beyond iotauth's coverage, if any.

    A rule ``P/+`` or ``P/+/#`` admits ``Q/#`` for every ``Q`` that ``P`` matches
    level by level; with ``P`` all literal that is ``P/#`` alone.
    """
    levels = text.split("/")
    if levels[-1] == "+":
        prefix = levels[:-1]
    elif len(levels) >= 2 and levels[-2:] == ["+", "#"]:
        prefix = levels[:-2]
    else:
        return None
    if "+" in prefix:
        return _UNBOUNDED
    return "/".join([*prefix, "#"])


def _parsed_specially(text: str) -> bool:
    """EMQX would read this rule topic as ``eq`` or as a template rather than as the filter it is."""
    return text.startswith("eq ") or "${" in text


def _has_wildcard(text: str) -> bool:
    return any(level in ("+", "#") for level in text.split("/"))


def _rule(permission: str, action: str, topic: str) -> AclRule:
    return {"permission": permission, "action": action, "topic": topic}


def _unique(rules: list[AclRule]) -> list[AclRule]:
    seen: list[AclRule] = []
    for rule in rules:
        if rule not in seen:
            seen.append(rule)
    return seen

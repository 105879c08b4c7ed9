"""The topic trees against the reference matcher (``policy.matches``, MQTT 3.1.1 §4.7), property-tested."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from iotauth.broker.core.topics import SubscriptionTree, TopicStore
from iotauth.policy import matches

LEVELS = st.sampled_from(["a", "b", "$SYS", "", "c"])
TOPICS = st.lists(LEVELS, min_size=1, max_size=4).map("/".join)
FILTER_LEVELS = st.sampled_from(["a", "b", "$SYS", "", "+", "c"])


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(FILTER_LEVELS, min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(filters(), st.integers(0, 5), st.integers(0, 2)), max_size=12), TOPICS)
def test_match_is_exactly_the_reference_matcher(subscriptions: list[tuple[str, int, int]], topic: str) -> None:
    tree: SubscriptionTree[int] = SubscriptionTree()
    expected: dict[int, int] = {}
    for topic_filter, subscriber, qos in subscriptions:
        tree.add(topic_filter, subscriber, qos)
    final: dict[tuple[str, int], int] = {(f, s): q for f, s, q in subscriptions}  # the last add of a pair wins
    for (topic_filter, subscriber), qos in final.items():
        if matches(topic, topic_filter):
            expected[subscriber] = max(expected.get(subscriber, -1), qos)
    assert tree.match(topic) == expected
    assert len(tree) == len(final)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(filters(), st.integers(0, 3)), max_size=12), st.data())
def test_removal_prunes_and_leaves_the_rest(subscriptions: list[tuple[str, int]], data: st.DataObject) -> None:
    tree: SubscriptionTree[int] = SubscriptionTree()
    for topic_filter, subscriber in subscriptions:
        tree.add(topic_filter, subscriber, 1)
    present = set(subscriptions)
    gone = data.draw(st.lists(st.sampled_from(sorted(present)), unique=True)) if present else []
    for topic_filter, subscriber in gone:
        assert tree.remove(topic_filter, subscriber)
        assert not tree.remove(topic_filter, subscriber)  # twice is a no-op
    kept = present - set(gone)
    topic = data.draw(TOPICS)
    assert set(tree.match(topic)) == {s for f, s in kept if matches(topic, f)}
    if not kept:
        assert tree._root.children == {}  # every branch was pruned


@settings(max_examples=400, deadline=None)
@given(st.lists(TOPICS, max_size=12, unique=True), filters())
def test_select_is_exactly_the_reference_matcher(topics: list[str], topic_filter: str) -> None:
    store: TopicStore[str] = TopicStore()
    for topic in topics:
        store.put(topic, topic)
    assert sorted(store.select(topic_filter)) == sorted(t for t in topics if matches(t, topic_filter))
    assert sorted(store.values()) == sorted(topics)


def test_store_put_get_pop_and_counts() -> None:
    store: TopicStore[str] = TopicStore()
    assert store.put("a/b", "1") is None
    assert store.put("a/b", "2") == "1"
    assert store.put("a", "3") is None
    assert (len(store), store.get("a/b"), store.get("a"), store.get("a/c")) == (2, "2", "3", None)
    assert store.pop("a/b") == "2" and store.pop("a/b") is None
    assert store.remove_where(lambda v: v == "3") == 1
    assert len(store) == 0 and store._root.children == {}


def test_a_wide_branch_is_never_visited_by_other_topics() -> None:
    """200,000 filters of one device sit in one branch; matching elsewhere does not walk them."""
    tree: SubscriptionTree[str] = SubscriptionTree()
    for n in range(200_000):
        tree.add(f"hoard/x/{n}", "hoarder", 0)
    tree.add("devices/+/telemetry/#", "ingest", 1)
    visited = 0
    original = dict.get

    class Counting(dict):  # type: ignore[type-arg]
        def get(self, key, default=None):  # type: ignore[no-untyped-def]
            nonlocal visited
            visited += 1
            return original(self, key, default)

    def count_children(node) -> None:  # type: ignore[no-untyped-def]
        node.children = Counting(node.children)
        for child in list(node.children.values())[:5]:
            count_children(child)

    count_children(tree._root)
    assert tree.match("devices/d1/telemetry/t") == {"ingest": 1}
    assert visited < 20

"""docs/upstream/: each patch is made against the installed amqtt wheel, applies with ``patch -p1`` alone or with
the others, and has its write-up; a broker with all three still does MQTT."""

from __future__ import annotations

import compileall
import itertools
from importlib import metadata
from pathlib import Path

import pytest

from tests.fixtures.raw_mqtt import AsyncRawClient
from tests.fixtures.upstream import (
    BASE_VERSION,
    PATCHES,
    AmqttProcess,
    copy_amqtt,
    installed_files_match_the_wheel,
    patched_files,
)

NAMES = ["authenticate-first", "retained-acl", "keep-alive"]


def test_the_patches_are_all_here_and_nothing_else() -> None:
    assert sorted(p.stem for p in PATCHES.glob("*.patch")) == sorted(NAMES)
    assert sorted(p.stem for p in PATCHES.glob("*.md")) == sorted([*NAMES, "README"])
    readme = (PATCHES / "README.md").read_text(encoding="utf-8")
    assert "MIT" in readme and all(f"{name}.patch" in readme for name in NAMES)


def test_the_installed_amqtt_is_the_wheel_the_patches_were_made_from() -> None:
    """If amqtt was upgraded, the patches must be re-made against it (docs/upstream/README.md)."""
    assert metadata.version("amqtt") == BASE_VERSION
    touched = sorted({path for name in NAMES for path in patched_files(name)})
    assert touched and all(path.startswith("amqtt/") for path in touched)
    assert installed_files_match_the_wheel(touched) == [], "the installed amqtt files differ from its wheel"


@pytest.mark.parametrize("name", NAMES)
def test_each_patch_applies_alone_and_compiles(name: str, tmp_path: Path) -> None:
    root = copy_amqtt(tmp_path, [name])
    for path in patched_files(name):
        assert (root / path).read_bytes() != (Path(metadata.distribution("amqtt").locate_file(path))).read_bytes()
    assert compileall.compile_dir(root / "amqtt", quiet=1)


@pytest.mark.parametrize("order", list(itertools.permutations(NAMES)), ids="+".join)
def test_the_patches_apply_together_in_any_order(order: tuple[str, ...], tmp_path: Path) -> None:
    copy_amqtt(tmp_path, order)


async def test_the_three_patches_apply_together_and_the_broker_still_works(tmp_path: Path) -> None:
    broker = AmqttProcess(copy_amqtt(tmp_path, NAMES), {"amqtt.plugins.authentication.AnonymousAuthPlugin": {}})
    broker.start()
    try:
        subscriber = await AsyncRawClient.open(broker.port)
        assert await subscriber.connect("subscriber", keep_alive=30) == (0, False)
        assert await subscriber.subscribe([("smoke/#", 1)]) == [1]
        publisher = await AsyncRawClient.open(broker.port)
        assert (await publisher.connect("publisher"))[0] == 0
        await publisher.publish("smoke/test", b"hello", qos=1, retain=True)
        assert [(m.topic, m.payload) for m in await subscriber.messages()] == [("smoke/test", b"hello")]
        late = await AsyncRawClient.open(broker.port)
        assert (await late.connect("late"))[0] == 0
        assert await late.subscribe([("smoke/#", 0)]) == [0]
        assert [(m.topic, m.retain) for m in await late.messages()] == [("smoke/test", True)]
        for client in (subscriber, publisher, late):
            await client.disconnect()
    finally:
        broker.stop()
